"""Checks on a submitted workflow before it is queued.

The front cannot know which nodes every instance has (plugins differ), so it
checks only what no instance could run: bad JSON, a body that is not an
API-format graph, links to nodes that do not exist. Node names and input
values are the instance's to validate; a refusal there becomes an error result.
"""

from __future__ import annotations

from typing import Any

from standard.errors import RequestError
from standard.http_util import parse_json


class GraphError(RequestError):
    """The body is not a runnable API-format graph (answered with 400)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def parse_graph(body: bytes) -> dict[str, Any]:
    """The graph of a request body: the bare graph or ``{"prompt": graph, ...}``."""
    if not body.strip():
        raise GraphError("empty_body", "the body is empty: send the workflow graph (API format) as JSON")
    try:
        value = parse_json(body)
    except ValueError as exc:
        raise GraphError("invalid_json", f"the body is not JSON: {exc}") from None
    return graph_of(value)


def graph_of(value: Any) -> dict[str, Any]:
    """The checked graph of a parsed body: the bare graph or ``{"prompt": graph, ...}``."""
    if isinstance(value, dict) and isinstance(value.get("prompt"), dict) and _looks_wrapped(value):
        value = value["prompt"]
    check_graph(value)
    return value


def _looks_wrapped(value: dict[str, Any]) -> bool:
    """``{"prompt": {...}}`` wraps a graph unless "prompt" is itself a node of a bare graph."""
    inner = value["prompt"]
    return "class_type" not in inner


def check_graph(graph: Any) -> None:
    if not isinstance(graph, dict):
        raise GraphError("invalid_prompt", "the graph must be a JSON object of nodes (Save (API format))")
    if not graph:
        raise GraphError("invalid_prompt", "the graph has no nodes")
    for node_id, node in graph.items():
        if not isinstance(node, dict):
            raise GraphError("invalid_prompt", f"node {node_id!r} must be an object with class_type and inputs")
        class_type = node.get("class_type")
        if not isinstance(class_type, str) or not class_type:
            raise GraphError("invalid_prompt", f"node {node_id!r} has no class_type "
                             "(is this the UI format? export with Save (API format))")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise GraphError("invalid_prompt", f"node {node_id!r}: inputs must be an object")
        for name, value in inputs.items():
            if is_link(value) and str(value[0]) not in graph:
                raise GraphError("invalid_prompt",
                                 f"node {node_id!r} input {name!r} links to missing node {value[0]!r}")


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))
