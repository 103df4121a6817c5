"""Hostile inputs for the access-guard tests: untrusted browser Origins, open-redirect ``next`` values."""

from __future__ import annotations

EVIL_ORIGINS = ("null", "file://", "file:///home/me/page.html", "http://evil.example", "chrome-extension://abc")
BAD_NEXTS = ("/\t/evil.example", "/\r\n/evil.example", "/\n/evil.example", "/\\evil.example", "/\\/evil.example",
             "//evil.example", "/%2F%2Fevil.example", "/%2f/evil.example", "/%09/evil.example", "/%5Cevil.example",
             "https://evil.example", "javascript:alert(1)", "/ /evil.example", "/\x00/evil.example",
             "/\u3000/evil.example")
