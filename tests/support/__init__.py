"""Shared test support (no tests here): helpers to import, and fixtures that conftest registers.

``tests/conftest.py`` lists the fixture modules in ``pytest_plugins``, so a test asks for a fixture
(``instance``, ``api``, ``front``, ``start_cluster``, ``live_queue``, ``procs``...) by naming it as a
parameter and never imports it. Plain helpers are imported: ``from support.server import tiny_graph``.

- ``support.processes``: paths, ports, real child processes (``comfyserve``, redis-server), /proc.
- ``support.server``: an embedded instance (``instance``), graphs, socket events, the gate node
  (``TestGate`` of tests/custom_nodes/gate_node.py: ``gated_graph``, ``halfway_graph``, ``drain_gate_graph``).
- ``support.backend``: a backend instance and the proxy in front of it (``backend``, ``front``).
- ``support.api``: the API edition in-process (``api``, ``instance_url``) and as processes (``procs``).
- ``support.queue``: the queue service on both stores (``store_kind``, ``live_queue``...), the SDK.
- ``support.cluster``: the cluster edition with users (``start_cluster``), the sleep node (``TestSleep``).
- ``support.metrics``: ``/metrics`` parsed the way Prometheus reads it.
- ``support.browser``: Chromium via Playwright (one per module) on a logged-in page (``browser_session``).
- ``support.ssl_context``: one default SSL context for the test process's httpx clients.
- ``support.access``: hostile Origins and ``next`` values for the access-guard tests.
"""
