"""The clients' side of the kit: a transport for Tidal's plain-HTTP services.

Every Tidal service speaks plain HTTP, on a unix socket or a node-internal address, never TLS.
httpx's default transport builds a verifying SSL context all the same, which loads the CA
bundle: 30-80 ms per client on this machine, paid by every CLI command that talks to the
engine daemon (more than all of ``tidal ps``'s own imports). These transports skip it.
"""

from __future__ import annotations

import httpx


def plain_http_transport(uds: str | None = None) -> httpx.HTTPTransport:
    """A transport for ``http://`` URLs only (on the unix socket ``uds`` if given)."""
    return httpx.HTTPTransport(uds=uds, verify=False)
