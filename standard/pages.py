"""Our own pages (token login, cluster login, dashboard, admin): the templates in ``web/``.

``web/`` is a data folder, not a package (``import web`` belongs to another
project): a source checkout or an editable install reads it at the project
root, next to ``standard/``; a wheel ships it inside the package, as
``standard/web/`` (pyproject's ``package-dir``). Whatever serves a page asks
here, so both layouts work the same.
"""

from __future__ import annotations

import functools
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

_PACKAGE_DIR = Path(__file__).resolve().parent
# Installed wheel first: in a checkout the project root's parent may hold an unrelated web/.
_WEB_DIRS = (_PACKAGE_DIR / "web", _PACKAGE_DIR.parent / "web")


@functools.cache
def web_dir() -> Path:
    """The ``web/`` folder: inside the installed package, else at the project root."""
    for candidate in _WEB_DIRS:
        if (candidate / "templates").is_dir():
            return candidate
    raise FileNotFoundError(f"the page templates are missing: looked for {' and '.join(map(str, _WEB_DIRS))}")


def setup_templates(app: web.Application) -> None:
    """Attach the jinja2 environment of ``web/templates`` to ``app``."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(web_dir() / "templates")),
        autoescape=jinja2.select_autoescape(["html"]),
    )
