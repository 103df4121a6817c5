// comfyserve: a "Restart server" button and command for the ComfyUI frontend.
// POST /api/restart re-scans the data dir and re-imports the plugins (embedded
// engine) or restarts the ComfyUI child (real-ComfyUI runtime); the result is
// reported as a toast and the node definitions are refreshed afterwards.
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

export async function restartServer() {
  let result;
  try {
    const response = await api.fetchApi("/restart", { method: "POST" });
    if (response.ok) {
      const body = await response.json();
      result = { ok: true, status: response.status, body };
      report("success", "Server restarted", "Models and plugins were reloaded.");
      await app.extensionManager?.command?.execute?.("Comfy.RefreshNodeDefinitions");
    } else {
      const message = await describeFailure(response);
      result = { ok: false, status: response.status, message };
      report(response.status === 409 ? "warn" : "error", "Restart refused", message);
    }
  } catch (error) {
    result = { ok: false, status: 0, message: String(error) };
    report("error", "Restart failed", String(error));
  }
  window.comfyserveLastRestart = result;
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
