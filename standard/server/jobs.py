"""ComfyUI's unified job view (``/jobs``) over the queue and the history.

The frontend (1.58) draws its queue and history panels from ``GET /jobs``
only, so the same data as ``/queue`` and ``/history`` is reshaped here into
job dicts: ``id, status, priority, create_time, execution_start_time,
execution_end_time, execution_error, outputs_count,
previewable_outputs_count, preview_output, workflow_id``.
"""

from __future__ import annotations

from typing import Any

PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "pending", "in_progress", "completed", "failed", "cancelled"
ALL_STATUSES: tuple[str, ...] = (PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
SORT_FIELDS = frozenset({"created_at", "execution_duration"})
PREVIEWABLE_MEDIA = frozenset({"images", "video", "audio"})
THREE_D_EXTENSIONS = (".obj", ".fbx", ".gltf", ".glb")


def _prune(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _metadata(extra_data: dict[str, Any]) -> tuple[int | None, str | None]:
    workflow = (extra_data.get("extra_pnginfo") or {}).get("workflow") or {}
    workflow_id = workflow.get("id") if isinstance(workflow, dict) else None
    return extra_data.get("create_time"), workflow_id


def _previewable(media_type: str, item: dict[str, Any]) -> bool:
    if media_type in PREVIEWABLE_MEDIA:
        return True
    fmt = str(item.get("format", ""))
    if fmt.startswith(("video/", "audio/")):
        return True
    return str(item.get("filename", "")).lower().endswith(THREE_D_EXTENSIONS)


def outputs_summary(outputs: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
    """(outputs_count, previewable_outputs_count, preview_output) — 'output' files preferred."""
    count = previewable = 0
    preview = fallback = None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    continue
                count += 1
                if not _previewable(media_type, item):
                    continue
                previewable += 1
                enriched = {**item, "nodeId": node_id, "mediaType": media_type}
                if preview is None and item.get("type") == "output":
                    preview = enriched
                elif fallback is None:
                    fallback = enriched
    return count, previewable, preview or fallback


def queue_job(item: list[Any], status: str, *, include_workflow: bool = False) -> dict[str, Any]:
    """A pending or running queue tuple as a job (with its ``workflow`` for the detail route)."""
    number, prompt_id, prompt, extra_data, _outputs = item
    create_time, workflow_id = _metadata(extra_data)
    job = _prune({
        "id": prompt_id, "status": status, "priority": number, "create_time": create_time,
        "outputs_count": 0, "previewable_outputs_count": 0, "workflow_id": workflow_id,
    })
    if include_workflow:
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def history_job(prompt_id: str, entry: dict[str, Any], *, times: tuple[int, int] | None = None,
                include_outputs: bool = False) -> dict[str, Any]:
    """A finished prompt as a job; times come from the status messages, else ``times``."""
    number, _, prompt, extra_data, _outputs = entry["prompt"]
    create_time, workflow_id = _metadata(extra_data)
    status_info = entry.get("status") or {}
    start = end = error = None
    interrupted = False
    for message in status_info.get("messages") or []:
        if not (isinstance(message, (list, tuple)) and len(message) >= 2 and isinstance(message[1], dict)):
            continue
        name, data = message[0], message[1]
        if name == "execution_start":
            start = data.get("timestamp")
        elif name in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            error = data if name == "execution_error" else error
            interrupted = interrupted or name == "execution_interrupted"
    if times is not None:
        start = start if start is not None else times[0]
        end = end if end is not None else times[1]
    if status_info.get("status_str") == "error":
        status = CANCELLED if interrupted else FAILED
    else:
        status = COMPLETED
    outputs = entry.get("outputs") or {}
    count, previewable, preview = outputs_summary(outputs)
    job = _prune({
        "id": prompt_id, "status": status, "priority": number, "create_time": create_time,
        "execution_start_time": start, "execution_end_time": end, "execution_error": error,
        "outputs_count": count, "previewable_outputs_count": previewable, "preview_output": preview,
        "workflow_id": workflow_id,
    })
    if include_outputs:
        job["outputs"] = outputs
        job["execution_status"] = status_info
        job["execution_meta"] = entry.get("meta") or {}
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def sort_jobs(jobs: list[dict[str, Any]], sort_by: str, descending: bool) -> list[dict[str, Any]]:
    if sort_by == "execution_duration":
        def key(job: dict[str, Any]) -> float:
            start, end = job.get("execution_start_time"), job.get("execution_end_time")
            return end - start if start and end else 0
    else:
        def key(job: dict[str, Any]) -> float:
            return job.get("create_time") or 0
    return sorted(jobs, key=key, reverse=descending)
