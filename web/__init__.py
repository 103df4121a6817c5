"""Our own pages (login, dashboard, admin): jinja2 templates; their CSS is inline, there are no static files."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

WEB_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = WEB_DIR / "templates"


def setup_templates(app: web.Application) -> None:
    """Attach the jinja2 environment of ``web/templates`` to ``app``."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=jinja2.select_autoescape(["html"]),
    )
