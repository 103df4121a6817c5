"""comfyserve's queue service: wire-compatible with the cloud platform's queue service.

    protocol.py      DataFrameProto / DataFrameListProto (package ``streaming``), built at run time
    store.py         the store interface, shared types, put batching, wake-ups
    sqlite_store.py  embedded SQLite store (default; one process)
    redis_store.py   Redis store (Lua scripts; several processes on one Redis)
    server.py        aiohttp front at /api/predict/{queue}; watch.py the WebSocket watch
    client.py        async client (httpx + websockets), used by the API edition
    command.py       ``comfyserve queue`` / ``python -m queue_service``
"""
