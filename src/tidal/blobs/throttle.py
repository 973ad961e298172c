"""A bandwidth-limited link to a network namespace, for benchmarks of remote reads.

Creates a namespace and a veth pair (host side ``10.R.S.1``, namespace side ``10.R.S.2``) and
shapes both directions with a token bucket (``tc qdisc ... tbf``), so a registry started inside
the namespace (``RegistryServer(host=link.ns_address, wrap=link.exec_prefix)``) is reached over a
link of a fixed rate, like a data-centre uplink, instead of loopback memory copies.
Needs root and iproute2; ``close()`` deletes the namespace and the veth pair.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

from tidal.errors import RegistryServerError

TBF_LATENCY_MS = 50
"""How long a packet may wait in the bucket's queue before tbf drops it."""


def _ip(*args: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RegistryServerError(
            f"`{' '.join(args)}` failed: {proc.stderr.strip()} (network namespaces need root "
            "and iproute2)"
        )


class ThrottledLink:
    """A network namespace behind a veth pair limited to ``rate_mbit`` each way."""

    def __init__(self, rate_mbit: float, *, name: str | None = None) -> None:
        if rate_mbit <= 0:
            raise RegistryServerError(f"link rate must be positive, got {rate_mbit} Mbit/s")
        self.rate_mbit = rate_mbit
        tag = name or f"tb{os.getpid() % 100000}"
        self.netns = f"tidal-{tag}"
        self._host_if = f"vh{tag}"[:15]
        self._ns_if = f"vn{tag}"[:15]
        subnet = os.getpid() % 250 + 1
        self.host_address = f"10.233.{subnet}.1"
        self.ns_address = f"10.233.{subnet}.2"
        self._up = False

    @property
    def exec_prefix(self) -> list[str]:
        """Prepend to a command to run it inside the namespace."""
        return ["ip", "netns", "exec", self.netns]

    def _shape(self, *prefix: str, dev: str) -> None:
        # burst must hold at least rate/HZ; 1/100 s of traffic, not less than 32 KiB
        burst_bytes = max(32 * 1024, int(self.rate_mbit * 1e6 / 8 / 100))
        _ip(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", f"{self.rate_mbit}mbit", "burst", str(burst_bytes),
            "latency", f"{TBF_LATENCY_MS}ms")  # fmt: skip

    def open(self) -> ThrottledLink:
        try:
            _ip("ip", "netns", "add", self.netns)
            self._up = True
            _ip("ip", "link", "add", self._host_if, "type", "veth", "peer", "name", self._ns_if)
            _ip("ip", "link", "set", self._ns_if, "netns", self.netns)
            _ip("ip", "addr", "add", f"{self.host_address}/30", "dev", self._host_if)
            _ip("ip", "link", "set", self._host_if, "up")
            ns = self.exec_prefix
            _ip(*ns, "ip", "addr", "add", f"{self.ns_address}/30", "dev", self._ns_if)
            _ip(*ns, "ip", "link", "set", self._ns_if, "up")
            _ip(*ns, "ip", "link", "set", "lo", "up")
            self._shape(dev=self._host_if)
            self._shape(*ns, dev=self._ns_if)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete the veth pair and the namespace (idempotent)."""
        with contextlib.suppress(RegistryServerError):
            _ip("ip", "link", "del", self._host_if)
        if self._up:
            with contextlib.suppress(RegistryServerError):
                _ip("ip", "netns", "del", self.netns)
            self._up = False

    def __enter__(self) -> ThrottledLink:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
