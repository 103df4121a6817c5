"""Leftovers of the build stay gone: no citations of a design document the repository lacks, no aliases."""

from __future__ import annotations

import re
from pathlib import Path

from standard.client import InstanceClient

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("standard", "api_edition", "queue_service", "cluster_proxy", "tests")


def test_no_docstring_cites_a_design_document_the_repository_does_not_contain() -> None:
    assert not (ROOT / "DESIGN.md").exists()
    cited = [f"{path.relative_to(ROOT)}:{number}"
             for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
             if path != Path(__file__).resolve()
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"DESIGN(\.md| §)|§\d", line)]
    assert cited == []


def test_the_instance_client_has_one_name_for_get_json() -> None:
    assert hasattr(InstanceClient, "get_json") and not hasattr(InstanceClient, "_get_json")

