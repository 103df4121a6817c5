// comfyserve cluster: the proxy's own WebSocket messages, registered so the frontend
// knows them (an unregistered type is logged as "Unknown message type" on every change).
//   cluster_queue       {queue: [{prompt_id, state, position, notes}]}: the user's tasks and
//                        their wait positions; kept in window.comfyserveClusterQueue.
//   cluster_task_retry  {prompt_id, attempt, reason}: a task runs again elsewhere; shown as a toast.
// A standard instance never sends them: the listeners then simply stay idle.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

window.comfyserveClusterQueue = [];

api.addEventListener("cluster_queue", (event) => {
  window.comfyserveClusterQueue = event.detail?.queue ?? [];
});

api.addEventListener("cluster_task_retry", (event) => {
  const detail = event.detail ?? {};
  app.extensionManager?.toast?.add?.({
    severity: "warn",
    summary: "Task runs again",
    detail: `${detail.reason ?? "its instance was lost"} (attempt ${detail.attempt ?? "?"})`,
    life: 6000,
  });
});

app.registerExtension({ name: "comfyserve.cluster" });
