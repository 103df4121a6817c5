"""The project's error tree: every exception comfyserve defines derives from ``ComfyServeError``.

Area roots live here; an area may keep its own classes in its own module as
long as they derive from one of these roots (the editions import from this
module, never the reverse). Classes that callers also catch as a built-in keep
that base too (``PathOutsideRoot`` is a ``ValueError``)::

    ComfyServeError
     ├── PathOutsideRoot            a request path escaped its root (also ValueError)
     ├── PathTooLong                a request path is longer than the file system takes (also ValueError)
     ├── ConfigError                bad flags / environment
     │    └── StorageConfigError    bad oss:// URL, endpoint or credentials (also a StorageError)
     ├── RequestError               a request we do not take, answered 4xx (also ValueError)
     │    ├── BadJSON               standard.http_util: invalid, non-finite or too deep JSON
     │    ├── BadParam              queue_service.params: a query parameter out of range
     │    ├── GraphError            api_edition.graph: not a runnable API-format graph
     │    ├── GraphRefused          cluster_proxy.graph: a graph the cluster will not queue
     │    └── WebhookRefused        api_edition.webhook: not an allowed webhook target
     ├── StorageError               standard.storage.errors: object storage (oss2 translated there)
     │    └── StorageAuthError, ObjectNotFound, IntegrityError, CacheFullError,
     │        TransientStorageError, DownloadCancelled
     ├── EngineError                the embedded engine
     │    ├── EngineUnavailable     standard.server.prompt_server: it cannot be loaded (also RuntimeError)
     │    ├── RestartRefused        standard.server.prompt_server: /restart while a prompt runs (also RuntimeError)
     │    ├── NodeFailed            standard.engine.executor: a node raised
     │    └── InterruptProcessingException   standard.engine.context: ComfyUI's name for "interrupted"
     ├── BackendError               standard.backend: the proxy in front of a ComfyUI backend
     │    ├── BackendDown           the backend could not be reached
     │    ├── BodyTooLarge          a request body over the limit
     │    └── UpstreamFailed        standard.backend.upstream: the connection broke mid-response
     ├── InstanceError              talking to an instance failed (see standard.client)
     │    ├── InstanceUnavailable
     │    ├── PromptRejected        the instance answered 400 to /prompt
     │    └── PromptLost            a queued prompt vanished (the instance restarted)
     ├── QueueError                 queue_service.store: the queue service and its store (redis translated there)
     │    ├── QueueFull, Superseded, StoreUnavailable
     │    └── QueueClientError      queue_service.client: the service refused a call (httpx translated there)
     │         └── QueueFullError
     ├── WorkerError                the API edition's front and workers
     │    ├── Unavailable / Full    api_edition.attempts: the attempts queue
     │    ├── InboxUnavailable      api_edition.inbox
     │    ├── SinkFull, ResultTooLarge, Transient, Uncommitted   api_edition.queue_ops
     │    ├── GiveBack              api_edition.worker: hand the task to another worker
     │    └── AddressRefused        api_edition.webhook: a refused webhook address (also OSError)
     ├── ClusterError               the cluster edition
     │    ├── AccountError          cluster_proxy.accounts: a refused account change (also ValueError)
     │    ├── StateUnavailable      cluster_proxy.store: tasks/accounts storage failed (sqlite3, redis translated)
     │    ├── TransitionRefused     cluster_proxy.store
     │    └── InstanceLost          cluster_proxy.runner
     ├── JSONError                  standard.http_util: an HTTP error with ComfyUI's error body (an aiohttp
     │                              HTTPException, raised; built by json_error)
     └── RetryLater                 standard.retry: a try the retry helper should repeat

Errors of libraries underneath (redis, sqlite3, httpx, aiohttp's client,
oss2) are translated at the boundary with ``raise OurError(...) from exc``.
``tests/test_error_tree.py`` walks the packages and fails on any exception
class outside this tree.
"""

from __future__ import annotations

from typing import Any


class ComfyServeError(Exception):
    """Root of every error comfyserve raises on purpose."""


class PathOutsideRoot(ComfyServeError, ValueError):
    """A filename, subfolder or userdata path would leave its root."""


class PathTooLong(ComfyServeError, ValueError):
    """A filename, subfolder or userdata path is longer than the file system allows (answered 400)."""


class ConfigError(ComfyServeError):
    """The command line or environment asks for something impossible."""


class RequestError(ComfyServeError, ValueError):
    """A request body or parameter we do not take (answered 4xx); a ValueError for the parsers' callers."""


class EngineError(ComfyServeError):
    """The embedded engine failed or refused."""


class BackendError(ComfyServeError):
    """The proxy in front of a ComfyUI backend could not relay a request."""


class InstanceError(ComfyServeError):
    """Talking to a ComfyUI-protocol instance failed."""


class InstanceUnavailable(InstanceError):
    """The instance could not be reached (connection refused, timeout, 5xx)."""


class PromptRejected(InstanceError):
    """The instance refused a prompt (HTTP 400); ``body`` is ComfyUI's error JSON."""

    def __init__(self, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.body = body or {}


class PromptLost(InstanceError):
    """A submitted prompt is neither queued, running nor in history: the instance lost it."""


class WorkerError(ComfyServeError):
    """The API edition's front or a worker could not go on with a task."""


class ClusterError(ComfyServeError):
    """The cluster edition refused or lost something (accounts, task transitions, instances)."""


def error_body(kind: str, message: str, details: str = "",
               extra_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """ComfyUI's error object ``{"type", "message", "details", "extra_info"}`` (the value of ``"error"``).

    The one builder of that shape: HTTP errors (``standard.http_util.json_error``),
    validation reasons of the engine and the cluster's graph refusals all use it.
    """
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info or {}}
