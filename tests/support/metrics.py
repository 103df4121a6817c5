"""Read a role's ``GET /metrics`` the way Prometheus does: ``families = parse(text)``, ``value(...)``."""

from __future__ import annotations

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


def parse(text: str) -> dict[str, Metric]:
    """Metric families by name (a counter's family is named without ``_total``)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


async def scrape(url: str, token: str | None = None) -> dict[str, Metric]:
    """``GET url`` (a ``/metrics`` route) over HTTP, checked and parsed."""
    headers = {"Authorization": token} if token else {}
    async with httpx.AsyncClient(trust_env=False) as http:
        resp = await http.get(url, headers=headers)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == CONTENT_TYPE_LATEST, resp.text
    return parse(resp.text)


def value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    """The one sample named ``sample`` whose labels include ``labels``."""
    [found] = [s.value for family in families.values() for s in family.samples
               if s.name == sample and labels.items() <= s.labels.items()]
    return found


def kinds(families: dict[str, Metric]) -> dict[str, str]:
    """Family name -> type (counter, gauge, histogram)."""
    return {name: family.type for name, family in families.items()}
