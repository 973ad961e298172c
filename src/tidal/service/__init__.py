"""Tidal's service kit: one way to serve and to call the node's small HTTP/JSON services.

The engine daemon, the QoS API, the scheduler extender, the P2P root and the P2P peer all
serve through :mod:`tidal.service.server` (a route table, JSON bodies, ``/healthz`` and
Prometheus ``/metrics``, on TCP or a unix socket) and answer errors through
:mod:`tidal.service.wire` (one table from the :class:`~tidal.errors.TidalError` tree to HTTP
statuses, one body shape ``{"error": {"type", "message"}}``). Their clients turn that body
back into the same error class with :func:`tidal.service.wire.error_from_response`.

Core: nothing here imports a part of Tidal. This package's ``__init__`` imports nothing, so a
client that needs only :mod:`tidal.service.wire` (the CLI) does not load the server.
"""
