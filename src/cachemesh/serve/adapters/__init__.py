"""The protocol adapters and the HTTP plumbing: they parse a request, call the core
(``core/``) or the data-cache service (``datacache/``), and answer.

The ASGI app (``app.py``) and the uvicorn server (``server.py``) put them together on
one port, KServe V2 over gRPC on the other. ``ui_static/`` holds the /ui page's files.
"""
