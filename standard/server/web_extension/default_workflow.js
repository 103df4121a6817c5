// comfyserve: a default workflow that runs on the runtime behind the page.
// The frontend's built-in default graph (checkpoint -> KSampler -> ...) needs nodes the
// embedded engine does not have: loaded as is (a reload after closing the template browser,
// "Load default workflow") every node is red and the missing-nodes dialog opens. When the
// graph being loaded is that built-in default and some of its nodes are unknown here, the
// beforeConfigureGraph hook swaps it, before any node is created, for the first of the
// runtime's own templates (/templates/index.json) whose nodes all exist, else a blank graph.
// With real ComfyUI behind the gateway every default node exists and nothing changes.
import { app } from "../../scripts/app.js";

const MAX_TEMPLATES_TRIED = 12;

function nodeTypes(graph) {
  return (graph?.nodes ?? []).map((node) => node.type);
}

function registered(type) {
  return !!globalThis.LiteGraph?.registered_node_types?.[type];
}

function graphKey(graph) {
  return (graph?.nodes ?? []).map((node) => `${node.id}:${node.type}`).sort().join(",");
}

// Taken now: the frontend may hand the very object to the hook, which then changes it.
const BUILT_IN_KEY = graphKey(window.comfyAPI?.defaultGraph?.defaultGraph);

function isBuiltInDefault(graph) {
  return BUILT_IN_KEY !== "" && Array.isArray(graph?.nodes) && graphKey(graph) === BUILT_IN_KEY;
}

async function fetchJson(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  return response.ok ? response.json() : null;
}

/** The first of the runtime's templates that runs here, or null. */
async function runnableTemplate() {
  try {
    const index = await fetchJson("/templates/index.json");
    const names = (Array.isArray(index) ? index : []).flatMap((group) => group?.templates ?? [])
      .map((template) => template?.name).filter((name) => typeof name === "string");
    for (const name of names.slice(0, MAX_TEMPLATES_TRIED)) {
      const graph = await fetchJson(`/templates/${encodeURIComponent(name)}.json`);
      if (graph && Array.isArray(graph.nodes) && graph.nodes.length && nodeTypes(graph).every(registered)) {
        return graph;
      }
    }
  } catch (error) {
    console.warn("comfyserve: no runnable template for the default workflow", error);
  }
  return null;
}

function replaceInPlace(target, source) {
  for (const key of Object.keys(target)) {
    delete target[key];
  }
  Object.assign(target, structuredClone(source));
}

app.registerExtension({
  name: "comfyserve.defaultWorkflow",
  async beforeConfigureGraph(graphData) {
    if (!isBuiltInDefault(graphData) || nodeTypes(graphData).every(registered)) {
      return;
    }
    const replacement = (await runnableTemplate()) ?? window.comfyAPI?.defaultGraph?.blankGraph;
    if (replacement) {
      replaceInPlace(graphData, replacement);
      window.comfyserveDefaultWorkflow = nodeTypes(graphData);
    }
  },
});
