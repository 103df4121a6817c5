// comfyserve: a "Restart server" button and command for the ComfyUI frontend.
// POST /api/restart re-scans the data dir and re-imports the plugins (embedded
// engine) or restarts the ComfyUI child (real-ComfyUI runtime); the result is
// reported as a toast and the node definitions are refreshed afterwards. In the cluster
// edition it starts a rolling restart of the pool (202, admins only; 403 for other users).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const COMMAND_ID = "Comfyserve.RestartServer";
const LABEL = "Restart server";

function report(severity, summary, detail) {
  const toast = app.extensionManager?.toast;
  if (toast?.add) {
    toast.add({ severity, summary, detail, life: 6000 });
  } else if (severity === "error") {
    console.error(`${summary}: ${detail}`);
  }
}

async function describeFailure(response) {
  try {
    const body = await response.json();
    return body?.error?.message ?? JSON.stringify(body);
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function requestRestart() {
  try {
    const response = await api.fetchApi("/restart", { method: "POST" });
    if (response.ok) {
      return { ok: true, status: response.status, body: await response.json() };
    }
    return { ok: false, status: response.status, message: await describeFailure(response) };
  } catch (error) {
    return { ok: false, status: 0, message: String(error) };
  }
}

export async function restartServer() {
  const result = await requestRestart();
  window.comfyserveLastRestart = result;
  if (result.ok && result.status === 202) {
    report("info", "Rolling restart started", result.body?.message ?? "The pool restarts one instance at a time.");
  } else if (result.ok) {
    report("success", "Server restarted", "Models and plugins were reloaded.");
    await app.extensionManager?.command?.execute?.("Comfy.RefreshNodeDefinitions");
  } else if (result.status === 409 || result.status === 403) {
    report("warn", "Restart refused", result.message);
  } else {
    report("error", "Restart failed", result.message);
  }
  return result;
}

app.registerExtension({
  name: "comfyserve.restart",
  commands: [
    { id: COMMAND_ID, label: LABEL, icon: "pi pi-refresh", function: restartServer },
  ],
  menuCommands: [{ path: ["comfyserve"], commands: [COMMAND_ID] }],
  actionBarButtons: [
    { icon: "icon-[lucide--rotate-ccw]", label: "Restart", tooltip: LABEL, onClick: restartServer },
  ],
});
