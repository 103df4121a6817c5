"""Frontend extensions: our own (the restart button) and each plugin's ``WEB_DIRECTORY``.

Where their scripts live and the URLs ``GET /extensions`` lists for them. Both
the page routes (frontend.py serves the files) and the load-time routes
(internal.py lists them) read this; so does the proxying backend app.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from .context import instance_context

# Our own frontend extension (standard/server/web_extension), served by frontend.py.
OWN_EXTENSION_NAME = "comfyserve"
OWN_EXTENSION_DIR = Path(__file__).resolve().parent / "web_extension"


def extension_urls(web_root: Path | None, plugin_web_dirs: dict[str, Path]) -> list[str]:
    """The frontend's own ``extensions/**/*.js``, ours, and each plugin's WEB_DIRECTORY."""
    urls: list[str] = []
    if web_root is not None and (web_root / "extensions").is_dir():
        urls += sorted("/" + p.relative_to(web_root).as_posix() for p in (web_root / "extensions").rglob("*.js"))
    dirs = {OWN_EXTENSION_NAME: OWN_EXTENSION_DIR, **plugin_web_dirs}
    for name, directory in dirs.items():
        if directory.is_dir():
            urls += sorted(f"/extensions/{quote(name)}/" + p.relative_to(directory).as_posix()
                           for p in directory.rglob("*.js"))
    return urls


def own_extension_urls() -> list[str]:
    """The URLs of our own extension's scripts (the restart button)."""
    return extension_urls(None, {})


def plugin_web_dirs(request: web.Request) -> dict[str, Path]:
    """Plugins' ``WEB_DIRECTORY`` folders, when the engine reports them."""
    registry = instance_context(request).server.registry
    dirs = getattr(registry, "web_directories", None) or {}
    return {str(name): Path(path) for name, path in dict(dirs).items() if name != OWN_EXTENSION_NAME}
