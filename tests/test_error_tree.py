"""Every exception class the project defines hangs under ``standard.errors.ComfyServeError``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

from standard.errors import ComfyServeError

PACKAGES = ("standard", "api_edition", "queue_service", "cluster_proxy")


def _modules() -> list[ModuleType]:
    modules = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            if info.name.endswith(".__main__"):  # runs the CLI when imported
                continue
            modules.append(importlib.import_module(info.name))
    return modules


def _project_exceptions() -> set[type[BaseException]]:
    found = set()
    for module in _modules():
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (issubclass(obj, BaseException) and obj.__module__ == module.__name__
                    and obj.__module__.split(".")[0] in PACKAGES):
                found.add(obj)
    return found


def test_the_walk_finds_the_project_errors() -> None:
    names = {cls.__qualname__ for cls in _project_exceptions()}
    assert {"ComfyServeError", "StorageError", "QueueError", "AccountError", "BadJSON"} <= names


def test_every_project_exception_derives_from_comfyserve_error() -> None:
    strays = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in _project_exceptions()
                    if not issubclass(cls, ComfyServeError))
    assert strays == []
