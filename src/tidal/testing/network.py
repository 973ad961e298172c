"""A bandwidth-limited link to a network namespace, for benchmarks of remote reads.

Creates a namespace and a veth pair (host side ``10.R.S.1``, namespace side ``10.R.S.2``) and
shapes both directions with a token bucket (``tc qdisc ... tbf``), so a registry started inside
the namespace (``RegistryServer(host=link.ns_address, wrap=link.exec_prefix)``) is reached over a
link of a fixed rate, like a data-centre uplink, instead of loopback memory copies.
Needs root and iproute2; ``close()`` deletes the namespace and the veth pair.
"""

from __future__ import annotations

import os
import zlib

from tidal import proc
from tidal.errors import RegistryServerError

TBF_LATENCY_MS = 50
"""How long a packet may wait in the bucket's queue before tbf drops it."""


IPROUTE2 = "network namespaces need root and iproute2: apt-get install iproute2"


def _ip(*args: str) -> None:
    proc.run(args, what=f"`{' '.join(args)}`", error=RegistryServerError, install_hint=IPROUTE2)


def _ip_cleanup(*args: str) -> None:
    """Teardown goes on after a failure, but logs it: an operator must see what is left."""
    proc.run_logged(args, what=f"`{' '.join(args)}` (cleanup)")


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
        _ip_cleanup("ip", "link", "del", self._host_if)
        if self._up:
            _ip_cleanup("ip", "netns", "del", self.netns)
            self._up = False

    def __enter__(self) -> ThrottledLink:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class BridgeNetwork:
    """Several "hosts" (network namespaces) on one bridge, for multi-host tests and benchmarks.

    The bridge holds ``<prefix>.1`` in the current namespace; :meth:`add_host` gives each
    namespace ``<prefix>.<10+i>`` on a veth pair, optionally with its outgoing traffic limited
    to ``rate_mbit`` (a registry behind a slow uplink, while hosts talk at full speed).
    Run commands inside with :meth:`net_prefix` (``nsenter --net``: the mount namespace stays
    shared, so a mount made there is visible here). ``close()`` removes everything.
    """

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or f"{os.getpid() % 100000:05d}"
        self.bridge = f"tbr{self.tag}"[:15]
        self.prefix = f"10.243.{zlib.crc32(self.tag.encode()) % 250 + 1}"
        self.gateway = f"{self.prefix}.1"
        self.hosts: dict[str, str] = {}
        """netns name -> address."""
        self._up = False

    def open(self) -> BridgeNetwork:
        try:
            _ip("ip", "link", "add", self.bridge, "type", "bridge")
            self._up = True
            _ip("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("ip", "link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def add_host(self, rate_mbit: float | None = None) -> tuple[str, str]:
        """A new namespace on the bridge: ``(netns, address)``."""
        i = len(self.hosts) + 1
        ns, address = f"tidal-{self.tag}-h{i}", f"{self.prefix}.{10 + i}"
        outside, inside = f"tbo{self.tag}{i}"[:15], f"tbi{self.tag}{i}"[:15]
        _ip("ip", "netns", "add", ns)
        self.hosts[ns] = address
        _ip("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("ip", "link", "set", outside, "master", self.bridge, "up")
        _ip("ip", "link", "set", inside, "netns", ns)
        _ip("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", inside)
        _ip("ip", "-n", ns, "link", "set", inside, "up")
        _ip("ip", "-n", ns, "link", "set", "lo", "up")
        if rate_mbit is not None:
            burst_bytes = max(32 * 1024, int(rate_mbit * 1e6 / 8 / 100))
            _ip("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inside, "root", "tbf",
                "rate", f"{rate_mbit}mbit", "burst", str(burst_bytes),
                "latency", f"{TBF_LATENCY_MS}ms")  # fmt: skip
        return ns, address

    @staticmethod
    def net_prefix(netns: str) -> list[str]:
        """Prepend to a command to run it in ``netns``'s network (and only there)."""
        return ["nsenter", f"--net=/var/run/netns/{netns}"]

    def close(self) -> None:
        for ns in list(self.hosts):
            _ip_cleanup("ip", "netns", "del", ns)  # takes its veth ends with it
            del self.hosts[ns]
        if self._up:
            _ip_cleanup("ip", "link", "del", self.bridge)
            self._up = False

    def __enter__(self) -> BridgeNetwork:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
