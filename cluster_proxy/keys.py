"""Typed keys for the cluster app's shared state."""

from __future__ import annotations

from typing import Any

from aiohttp import web

CORE: web.AppKey[Any] = web.AppKey("cluster_core", object)
POOL: web.AppKey[Any] = web.AppKey("cluster_pool", object)
SCOPES: web.AppKey[Any] = web.AppKey("cluster_scopes", object)
CLUSTER_SETTINGS: web.AppKey[Any] = web.AppKey("cluster_settings", object)
