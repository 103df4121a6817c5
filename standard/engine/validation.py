"""``validate_prompt``: ComfyUI's graph validation and error format, before anything is queued.

The shapes follow ComfyUI's ``execution.validate_prompt``: a top-level error
(``missing_node_type``, ``prompt_no_outputs``, ``prompt_outputs_failed_validation``)
and per-node ``node_errors`` with ``errors``/``dependent_outputs``/``class_type``.
Cycles are refused here as ``dependency_cycle`` rather than at run time.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from typing import Any

from ..errors import error_body
from . import context
from .node_class import NodeClass
from .registry import NodeRegistry

log = logging.getLogger("comfyserve.engine")

PRIMITIVES = ("INT", "FLOAT", "STRING", "BOOLEAN")
RUNTIME_HINT = ("The embedded engine runs the CPU image node set only; run this workflow on the "
                "real-ComfyUI runtime (--comfyui-dir PATH or --backend-url URL).")

Reason = dict[str, Any]
Result = tuple[bool, list[Reason], str]


def _reason(kind: str, message: str, details: str, **extra: Any) -> Reason:
    return error_body(kind, message, details, extra)


def types_compatible(received: Any, expected: Any) -> bool:
    """ComfyUI's rule: equal, a ``*`` wildcard, or overlapping ``A,B`` unions; combos take COMBO."""
    if isinstance(expected, list):
        return received in ("COMBO", "*") or isinstance(received, list)
    if not isinstance(received, str) or not isinstance(expected, str):
        return received == expected
    if received == expected or "*" in (received, expected):
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))


def combo_options(info: Any) -> list[Any] | None:
    """The allowed values of a combo input: ``([a, b],)`` or ``("COMBO", {"options": [...]})``."""
    kind = info[0] if isinstance(info, (list, tuple)) and info else None
    if isinstance(kind, list):
        return kind
    if kind == "COMBO" and len(info) > 1 and isinstance(info[1], dict):
        return list(info[1].get("options", []))
    return None


class _Validator:
    def __init__(self, registry: NodeRegistry, prompt: dict[str, Any]) -> None:
        self.registry = registry
        self.prompt = prompt
        self.validated: dict[str, Result] = {}
        self.visiting: set[str] = set()

    def node(self, unique_id: str) -> Result:
        if unique_id in self.validated:
            return self.validated[unique_id]
        self.visiting.add(unique_id)
        try:
            result = self._check(unique_id)
        finally:
            self.visiting.discard(unique_id)
        self.validated[unique_id] = result
        return result

    def _check(self, unique_id: str) -> Result:
        node = self.prompt[unique_id]
        inputs = node["inputs"]
        node_class = self.registry.node_classes[node["class_type"]]
        class_inputs = node_class.INPUT_TYPES()
        required = class_inputs.get("required", {})
        optional = class_inputs.get("optional", {})
        validate_function = getattr(node_class, "VALIDATE_INPUTS", None)
        custom_params = dict(inspect.signature(validate_function).parameters) if validate_function else {}

        errors: list[Reason] = []
        valid = True
        for name, info in list(required.items()) + list(optional.items()):
            if name not in inputs:
                if name in required:
                    errors.append(_reason("required_input_missing", "Required input is missing", name,
                                          input_name=name))
                continue
            value = inputs[name]
            input_type = info[0] if isinstance(info, (list, tuple)) and info else info
            options = info[1] if isinstance(info, (list, tuple)) and len(info) > 1 and isinstance(info[1], dict) else {}
            if isinstance(value, list):
                reason, linked_valid = self._check_link(name, info, input_type, value)
                if reason is not None:
                    errors.append(reason)
                valid = valid and linked_valid
                continue
            reason = self._check_value(inputs, name, info, input_type, options, name in custom_params)
            if reason is not None:
                errors.append(reason)

        if validate_function is not None and not errors:
            errors += self._custom_validation(node_class, validate_function, inputs, custom_params)
        if errors or not valid:
            return False, errors, unique_id
        return True, [], unique_id

    def _check_link(self, name: str, info: Any, input_type: Any, value: list[Any]) -> tuple[Reason | None, bool]:
        if len(value) != 2:
            return _reason("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                           name, input_name=name, input_config=info, received_value=value), True
        origin_id, slot = str(value[0]), value[1]
        origin = self.prompt.get(origin_id)
        if origin is None or not isinstance(slot, int) or isinstance(slot, bool):
            return _reason("bad_linked_input", "Bad linked input, the linked node or slot does not exist", name,
                           input_name=name, input_config=info, received_value=value), True
        if origin_id in self.visiting:
            return _reason("dependency_cycle", "Dependency cycle detected", f"{name}: links back to node {origin_id}",
                           input_name=name, linked_node=value), False
        return_types = getattr(self.registry.node_classes[origin["class_type"]], "RETURN_TYPES", ())
        if not 0 <= slot < len(return_types):
            return _reason("bad_linked_input", "Bad linked input, the linked node has no such output", name,
                           input_name=name, input_config=info, received_value=value), True
        received = return_types[slot]
        if not types_compatible(received, input_type):
            return _reason("return_type_mismatch", "Return type mismatch between linked nodes",
                           f"{name}, received_type({received}) mismatch input_type({input_type})",
                           input_name=name, input_config=info, received_type=received, linked_node=value), True
        try:
            linked_valid = self.node(origin_id)[0]
        except Exception as exc:
            self.validated[origin_id] = (False, [_reason(
                "exception_during_inner_validation", "Exception when validating inner node", str(exc),
                input_name=name, input_config=info, exception_message=str(exc),
                exception_type=type(exc).__qualname__, traceback=traceback.format_tb(exc.__traceback__),
                linked_node=value)], origin_id)
            return None, False
        return None, linked_valid

    def _check_value(self, inputs: dict[str, Any], name: str, info: Any, input_type: Any,
                     options: dict[str, Any], custom: bool) -> Reason | None:
        value = inputs[name]
        try:
            if input_type == "INT":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(f"{value} is not an integer")
                value = int(value)
            elif input_type == "FLOAT":
                value = float(value)
            elif input_type == "STRING":
                value = str(value)
            elif input_type == "BOOLEAN":
                if not isinstance(value, (bool, int)):
                    raise ValueError(f"{value!r} is not a boolean")
                value = bool(value)
            elif isinstance(input_type, str) and input_type not in ("COMBO", "*"):
                raise ValueError(f"a {input_type} input takes a link from another node's output, not a value")
        except (TypeError, ValueError, OverflowError) as exc:
            return _reason("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                           f"{name}, {value}, {exc}", input_name=name, input_config=info, received_value=value,
                           exception_message=str(exc))
        inputs[name] = value
        if input_type in ("INT", "FLOAT"):
            if "min" in options and value < options["min"]:
                return _reason("value_smaller_than_min", f"Value {value} smaller than min of {options['min']}",
                               name, input_name=name, input_config=info, received_value=value)
            if "max" in options and value > options["max"]:
                return _reason("value_bigger_than_max", f"Value {value} bigger than max of {options['max']}",
                               name, input_name=name, input_config=info, received_value=value)
        allowed = combo_options(info)
        if allowed is not None and not custom and value not in allowed:
            shown = f"(list of length {len(allowed)})" if len(allowed) > 20 else str(allowed)
            return _reason("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {shown}",
                           input_name=name, input_config=None if len(allowed) > 20 else info, received_value=value)
        return None

    def _custom_validation(self, node_class: type[NodeClass], function: Any, inputs: dict[str, Any],
                           params: dict[str, inspect.Parameter]) -> list[Reason]:
        arguments = {k: v for k, v in inputs.items() if k in params and not isinstance(v, list)}
        if any(p.default is inspect.Parameter.empty and name not in arguments
               for name, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)):
            return []  # it needs a linked value: ComfyUI checks those at run time
        try:
            result = function(**arguments)
        except Exception as exc:
            return [_reason("exception_during_validation", "Exception when validating node", str(exc),
                            exception_type=type(exc).__qualname__)]
        if result is True:
            return []
        details = ", ".join(sorted(arguments)) + ("" if result is False else f" - {result}")
        return [_reason("custom_validation_failed", "Custom validation failed for node", details,
                        input_name=next(iter(sorted(arguments)), ""), received_value=None)]


def _structure_error(prompt: Any) -> dict[str, Any] | None:
    if not isinstance(prompt, dict):
        return _reason("invalid_prompt", "Cannot execute because the prompt is not a JSON object of nodes",
                       f"got {type(prompt).__name__}")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            title = node.get("_meta", {}).get("title") if isinstance(node, dict) else None
            return _reason("missing_node_type", f"Node '{title or f'ID #{node_id}'}' has no class_type. "
                           "The workflow may be corrupted or a custom node is missing.",
                           f"Node ID '#{node_id}'", node_id=node_id, class_type=None, node_title=title)
        if not isinstance(node.get("inputs", {}), dict):
            return _reason("invalid_prompt", f"Cannot execute because node {node_id} has no inputs object",
                           f"Node ID '#{node_id}'")
        node.setdefault("inputs", {})
    return None


def validate_prompt(registry: NodeRegistry, prompt_id: str, prompt: dict[str, Any],
                    partial_execution_targets: list[str] | None = None
                    ) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    """(valid, error, outputs to execute, node_errors) exactly as ComfyUI answers /prompt."""
    error = _structure_error(prompt)
    if error is not None:
        return False, error, [], {}
    for node_id, node in prompt.items():
        class_type = node["class_type"]
        if class_type not in registry.node_classes:
            title = (node.get("_meta") or {}).get("title", class_type)
            return False, _reason(
                "missing_node_type", f"Node '{title}' not found. The custom node may not be installed. "
                f"({class_type}: {RUNTIME_HINT})", f"Node ID '#{node_id}'",
                node_id=node_id, class_type=class_type, node_title=title), [], {}

    if partial_execution_targets is None:
        outputs = [x for x in prompt if getattr(registry.node_classes[prompt[x]["class_type"]], "OUTPUT_NODE", False)]
    else:
        outputs = [x for x in partial_execution_targets if x in prompt]
    if not outputs:
        return False, _reason("prompt_no_outputs", "Prompt has no outputs", ""), [], {}

    validator = _Validator(registry, prompt)
    good: list[str] = []
    failed: list[tuple[str, list[Reason]]] = []
    node_errors: dict[str, Any] = {}
    with context.use(registry.context):
        for output in sorted(outputs, key=_node_order):
            try:
                valid, reasons, _ = validator.node(output)
            except Exception as exc:
                valid, reasons = False, [_reason("exception_during_validation", "Exception when validating node",
                                                 str(exc), exception_type=type(exc).__qualname__,
                                                 traceback=traceback.format_tb(exc.__traceback__))]
                validator.validated[output] = (False, reasons, output)
            if valid:
                good.append(output)
                continue
            failed.append((output, reasons))
            for node_id, (node_valid, node_reasons, _) in validator.validated.items():
                if node_valid or not node_reasons:
                    continue  # downstream of a bad node: invalid, but not the culprit
                entry = node_errors.setdefault(node_id, {
                    "errors": node_reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]})
                entry["dependent_outputs"].append(output)
            log.error("Failed to validate prompt %s for output %s", prompt_id, output)

    if not good:
        details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
        return False, _reason("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                              details), [], node_errors
    return True, None, good, node_errors


def _node_order(node_id: str) -> tuple[int, int | str]:
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)
