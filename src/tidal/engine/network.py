"""Container networking: none, host, or a bridge with one veth per container and IPAM.

Bridge mode: the daemon keeps a Linux bridge (``tidal0``) holding the subnet's first address
as gateway. Each container gets a named network namespace (``tidal-<id12>``) that lives from
``run`` to ``rm``, so the address and namespace survive stops and in-place upgrades (the
container joins it by path in config.json). It is bind-mounted like ``ip netns add`` does, but
in the pod namespace holder's mount namespace (``/proc/<holder>/root/netns/tidal-<id12>``,
:class:`tidal.engine.podns.NamespaceHolder`), not in the host's mount table, which every
runtime start reads in full; ``ip`` is started in it from a thread that joined it, ``tc`` by
``nsenter --net=PATH``, and the veth is made straight into it (``peer ... netns PATH``). A
namespace an older Tidal made with ``ip netns add`` (``/var/run/netns``) is still found,
joined and deleted. Addresses come from the state database (:meth:`Store.allocate_ip`), so
two containers never share one even across daemon restarts.
Published ports are forwarded in user space by the container's monitor, which binds the host
port itself: a port already in use fails the start with a clear error.

The address arithmetic is pure (:func:`ip_candidates`, :func:`host_link`). The engine reaches
the host through one adapter, :class:`Network` (:class:`BridgeNetwork` runs ``ip`` through
:func:`tidal.proc.run`; :class:`tidal.testing.engine.FakeNetwork` keeps namespaces in a file).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from tidal import proc
from tidal.engine.podns import CLONE_NEWNET, NamespaceHolder, call_in_namespace, is_mounted
from tidal.errors import ConfigError, EngineError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")
"""Where ``ip netns`` (and an older Tidal) keeps named namespaces."""
HOLDER_NETNS = "/netns"
"""Where the holder keeps the containers' network namespaces, inside its mount namespace."""
_holder = NamespaceHolder()


def parse_subnet(subnet: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as exc:
        raise ConfigError(f"[engine] subnet {subnet!r} is not a network: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > 30:
        raise ConfigError(
            f"[engine] subnet {subnet!r} must be IPv4 with room for hosts (/30 or wider)"
        )
    return net


def gateway(subnet: str) -> str:
    return str(next(parse_subnet(subnet).hosts()))


def ip_candidates(subnet: str) -> Iterator[str]:
    """Host addresses in order, skipping the gateway (first host)."""
    hosts = parse_subnet(subnet).hosts()
    next(hosts)
    for h in hosts:
        yield str(h)


def netns_name(cid: str) -> str:
    return f"tidal-{cid[:12]}"


def _legacy_path(cid: str) -> Path:
    return NETNS_DIR / netns_name(cid)


def netns_path(cid: str) -> str:
    """The file a runtime, ``nsenter`` or ``ip ... netns`` opens to join the netns."""
    legacy = _legacy_path(cid)
    if legacy.exists():
        return str(legacy)
    return str(_holder.outer(_holder.pid(), f"{HOLDER_NETNS}/{netns_name(cid)}"))


def netns_exists(cid: str) -> bool:
    if _legacy_path(cid).exists():
        return True
    pid = _holder.running()
    if pid is None:
        return False
    return is_mounted(_holder.outer(pid, f"{HOLDER_NETNS}/{netns_name(cid)}"))


def in_netns(path: str) -> list[str]:
    """The argv prefix that runs a tool in the network namespace at ``path`` (the host's
    mount namespace, so ``tc`` needs no ``-n`` and its ``/sys`` remount)."""
    return ["nsenter", f"--net={path}"]


def host_link(cid: str) -> str:
    """The host end of the container's veth (the kernel allows 15 characters); the other
    end is eth0 in the container's namespace."""
    return f"tv{cid[:11]}"


def _ip(args: list[str], what: str, *, batch: str | None = None, netns: str | None = None) -> str:
    """``ip ARGS``; with ``netns``, started from a thread in that namespace (one ``nsenter``
    fewer per pod)."""

    def run() -> str:
        done = proc.run(["ip", *args], what=what, error=EngineError, timeout_s=30, input=batch)
        return str(done.stdout)

    return run() if netns is None else call_in_namespace(netns, CLONE_NEWNET, run, what)


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def ensure_bridge(bridge: str, subnet: str) -> None:
    """Create and address the bridge once (idempotent)."""
    net = parse_subnet(subnet)
    if not _link_exists(bridge):
        _ip(["link", "add", "name", bridge, "type", "bridge"], f"creating bridge {bridge}")
    shown = _ip(["-o", "-4", "addr", "show", "dev", bridge], f"reading bridge {bridge}")
    cidr = f"{gateway(subnet)}/{net.prefixlen}"
    if cidr not in shown:
        _ip(["addr", "add", cidr, "dev", bridge], f"addressing bridge {bridge}")
    _ip(["link", "set", bridge, "up"], f"bringing bridge {bridge} up")


def create_netns(cid: str, ip: str, subnet: str, bridge: str) -> str:
    """Namespace + veth pair + address + default route; returns the namespace path.

    Two ``ip`` processes. The veth's container end is made inside the namespace, already
    named eth0 (``peer name eth0 netns NS``): made on the host and moved there, as before,
    the move waited for the kernel's network synchronisation, 21 ms of this step's 28 against
    3 ms now (measured here).

    Neither end gets an IPv6 link-local address (``addrgenmode none``): the network is
    IPv4, and each address's duplicate detection, multicast reports and router
    solicitations are multicast, which the bridge floods to every port, so with N pods on
    the bridge each new one cost O(N) kernel work (softirqs, ``mld`` workers: 15 % of the
    machine late in a 500-instance burst, against none early in it)."""
    ns = netns_name(cid)
    host = host_link(cid)
    prefix = parse_subnet(subnet).prefixlen
    try:
        if not netns_exists(cid):
            _make_holder_netns(ns)
        path = netns_path(cid)
        if not _link_exists(host):
            _ip(
                ["-batch", "-"],
                f"creating veth {host} into network namespace {ns}",
                batch=(
                    f"link add {host} type veth peer name eth0 netns {path}\n"
                    f"link set {host} addrgenmode none\n"
                    f"link set {host} master {bridge}\n"
                    f"link set {host} up\n"
                ),
            )
        _ip(
            ["-batch", "-"],
            f"configuring eth0 ({ip}) in {ns}",
            batch=(
                f"addr add {ip}/{prefix} dev eth0\n"
                "link set eth0 addrgenmode none\n"
                "link set eth0 up\n"
                "link set lo up\n"
                f"route add default via {gateway(subnet)}\n"
            ),
            netns=path,
        )
    except BaseException:
        destroy_netns(cid)
        raise
    return path


def _make_holder_netns(ns: str) -> None:
    """A new network namespace bind-mounted on ``/netns/<ns>`` in the holder (what ``ip
    netns add`` does on ``/var/run/netns``, minus the host's mount table)."""
    _holder.unshare(
        _holder.pid(),
        {"net": f"{HOLDER_NETNS}/{ns}"},
        None,
        what=f"creating network namespace {ns}",
    )


def destroy_netns(cid: str) -> None:
    """Delete the namespace (its veth end goes with it, taking the host end along).

    Failures are logged by :func:`tidal.proc.run_logged`, and a namespace that is still
    there afterwards is an error (``rm`` reports it and can be retried)."""
    ns = netns_name(cid)
    host = host_link(cid)
    if _legacy_path(cid).exists():
        proc.run_logged(["ip", "netns", "del", ns], what=f"deleting network namespace {ns}")
    pid = _holder.running()
    if pid is not None:
        f = _holder.outer(pid, f"{HOLDER_NETNS}/{ns}")
        try:
            _holder.unbind(pid, f"{HOLDER_NETNS}/{ns}")
        except EngineError as exc:
            log.warning("%s", exc)
        if not is_mounted(f):
            f.unlink(missing_ok=True)
    if _link_exists(host):
        done = proc.run(["ip", "link", "del", host], what=f"deleting veth {host}", check=False)
        # the namespace's delete takes the pair along a moment later: gone is not a failure
        if done.returncode != 0 and _link_exists(host):
            log.warning("deleting veth %s: %s", host, done.stderr.strip())
    if netns_exists(cid):
        raise EngineError(f"network namespace {ns} could not be deleted; see the daemon log")


def flush_neighbours(cid: str) -> None:
    """Forget the neighbour (ARP) entries of a container's netns: a reused pod sandbox must
    not answer for the last pod's peers from cache. The address, routes and veth stay."""
    ns = netns_name(cid)
    _ip(["neigh", "flush", "all"], f"flushing the neighbour table of {ns}", netns=netns_path(cid))


def host_port_free(host_ip: str, port: int) -> bool:
    """Whether a TCP listener could bind ``host_ip:port`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host_ip, port))
        except OSError:
            return False
    return True


def remove_bridge(bridge: str) -> None:
    if _link_exists(bridge):
        proc.run_logged(["ip", "link", "del", bridge], what=f"deleting bridge {bridge}")


class Network(ABC):
    """The engine's view of container networking on one node (bridge mode)."""

    def __init__(self, bridge: str, subnet: str) -> None:
        self.bridge = bridge
        self.subnet = subnet

    def ip_candidates(self) -> Iterator[str]:
        return ip_candidates(self.subnet)

    @abstractmethod
    def ensure_bridge(self) -> None: ...

    @abstractmethod
    def create_netns(self, cid: str, ip: str) -> str:
        """Make the container's namespace with ``ip``; returns its path. A namespace made
        already at :meth:`holder_netns` (by the pod's namespace step) is kept and wired."""

    def holder_netns(self, cid: str) -> str | None:
        """Where in the namespace holder's mount namespace (:mod:`tidal.engine.podns`) this
        network binds ``cid``'s namespace, if it keeps them there: a pod sandbox's is then made
        in the same process as its IPC and UTS ones. None: made by :meth:`create_netns`."""
        return None

    @abstractmethod
    def destroy_netns(self, cid: str) -> None: ...

    @abstractmethod
    def netns_path(self, cid: str) -> str: ...

    @abstractmethod
    def netns_exists(self, cid: str) -> bool: ...

    @abstractmethod
    def host_port_free(self, host_ip: str, port: int) -> bool: ...

    @abstractmethod
    def flush_neighbours(self, cid: str) -> None:
        """Forget the container netns's neighbour entries (a reused pod sandbox)."""


class BridgeNetwork(Network):
    """The host: a Linux bridge, named network namespaces, veth pairs (``ip``)."""

    def ensure_bridge(self) -> None:
        ensure_bridge(self.bridge, self.subnet)

    def create_netns(self, cid: str, ip: str) -> str:
        return create_netns(cid, ip, self.subnet, self.bridge)

    def holder_netns(self, cid: str) -> str | None:
        return f"{HOLDER_NETNS}/{netns_name(cid)}"

    def destroy_netns(self, cid: str) -> None:
        destroy_netns(cid)

    def netns_path(self, cid: str) -> str:
        return netns_path(cid)

    def netns_exists(self, cid: str) -> bool:
        return netns_exists(cid)

    def host_port_free(self, host_ip: str, port: int) -> bool:
        return host_port_free(host_ip, port)

    def flush_neighbours(self, cid: str) -> None:
        flush_neighbours(cid)
