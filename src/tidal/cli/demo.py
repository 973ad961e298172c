"""``tidal demo``: Tidal's main job on embedded defaults, start to finish, with timings.

Makes a small web root filesystem on the spot (busybox-static from Debian: its httpd), builds
a block image from it, pushes it to the CNCF registry started for the demo on a loopback port,
and runs it as an elastic instance by its reference on an engine daemon of the demo's own: the
node pulls the metadata only and mounts the image lazily (registry -> chunk cache -> FUSE block
device -> loop -> ext4), the instance serves through its published port at its shaped rate,
and the demo shows how little was fetched, verifies every digest, and cleans everything up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from tidal.cli.console import err, out
from tidal.errors import ConfigError
from tidal.units import format_size

if TYPE_CHECKING:  # the demo imports the image, blobs and blockdev parts when it runs
    from tidal.testing.registry_server import RegistryServer

APPLETS = (
    "sh",
    "ls",
    "cat",
    "echo",
    "uname",
    "wc",
    "head",
    "find",
    "du",
    "sha256sum",
    "date",
    "sleep",
    "true",
    "httpd",
)


def make_sample_rootfs(root: Path) -> int:
    """A busybox-static root tree with a few files; returns its size in bytes."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not Path(busybox).exists():
        raise ConfigError(
            "busybox not found; install the Debian package busybox-static (make demo does)"
        )
    for d in ("bin", "etc", "app", "tmp", "proc", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "hostname").write_text("tidal-demo\n")
    (root / "etc" / "os-release").write_text('NAME="Tidal demo"\nID=tidal-demo\n')
    (root / "app" / "motd").write_text(
        "Only the blocks this command reads are fetched and decompressed.\n"
    )
    (root / "app" / "data.bin").write_bytes(os.urandom(4 << 20))
    (root / "app" / "zeros.bin").write_bytes(bytes(8 << 20))  # holes cost nothing in the image
    # what a real image mostly is: bytes this command never reads, so never fetched
    (root / "app" / "unused-assets.bin").write_bytes(os.urandom(24 << 20))
    (root / "tmp").chmod(0o1777)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@contextlib.contextmanager
def _step(
    name: str, timings: list[tuple[str, float, str]], detail: str = ""
) -> Iterator[list[str]]:
    note: list[str] = [detail]
    err.print(f"[bold]>>[/] {escape(name)} ...", markup=True)
    t0 = time.perf_counter()
    yield note
    timings.append((name, time.perf_counter() - t0, note[0]))


DEMO_RATE_BPS = 5_000_000
"""The instance's bandwidth in the demo: 5 Mbit/s, as in the issue's example."""
DEMO_DOWNLOAD_BYTES = 1 << 20
DEMO_BRIDGE = "tidaldemo0"
DEMO_SUBNET = "10.249.249.0/24"
"""The demo's own bridge and addresses, so that it never meets a node's real engine network."""


def demo(
    keep: bool = typer.Option(
        False, help="Keep the work directory (image, rootfs) for a look afterwards."
    ),
    workdir: Path | None = typer.Option(
        None, help="Where to work (default: a new directory under /var/tmp)."
    ),
) -> None:
    """Tidal's main job end to end: an image by reference, run lazily as a shaped instance.

    Builds a small web image (busybox httpd), pushes it to a CNCF registry started on a
    loopback port, then runs it as an instance by its reference (`tidal instance run REF
    --bandwidth 5M -p PORT:80`) on an engine daemon of its own: the node pulls metadata only
    and mounts the image lazily. A download through the published port shows the shaped rate;
    each step is printed with its time and what the lazy mount fetched. Everything is removed
    at the end.
    """
    from tidal.blobs.distribution import push_image
    from tidal.blobs.reference import ImageReference
    from tidal.blobs.registry_client import RegistryClient
    from tidal.blockdev.builder import build_from_dir
    from tidal.image.manifest import Image
    from tidal.testing.registry_server import REGISTRY_BINARY, RegistryServer

    if os.geteuid() != 0:
        raise ConfigError("the demo runs containers on lazily mounted images: run it as root")
    if shutil.which(REGISTRY_BINARY) is None:
        raise ConfigError(
            f"{REGISTRY_BINARY} not found: install the Debian package docker-registry "
            "(make demo does)"
        )
    work = workdir or Path(tempfile.mkdtemp(prefix="tidal-demo-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    # the demo's node: its own data root (image store, engine state, chunk cache)
    os.environ["TIDAL_DATA_ROOT"] = str(work / "node")
    timings: list[tuple[str, float, str]] = []
    rootfs, image_dir = work / "rootfs", work / "image"
    server: RegistryServer | None = None
    node: _DemoNode | None = None
    try:
        with _step("make a web root filesystem (busybox httpd)", timings) as note:
            size = make_sample_rootfs(rootfs)
            (rootfs / "www").mkdir()
            (rootfs / "www" / "index.html").write_text("hello from a Tidal instance\n")
            (rootfs / "www" / "download.bin").write_bytes(os.urandom(DEMO_DOWNLOAD_BYTES))
            note[0] = f"{format_size(size + DEMO_DOWNLOAD_BYTES)} in {rootfs}"
        with _step("build the block image", timings) as note:
            config = {"Cmd": ["httpd", "-f", "-p", "80", "-h", "/www"], "WorkingDir": "/"}
            result = build_from_dir(rootfs, image_dir, config=config)
            m = result.manifest
            note[0] = (
                f"{len(m.layers)} layer, virtual disk {format_size(m.size_bytes)}, "
                f"stored {format_size(result.stored_bytes)} ({m.layers[0].codec})"
            )
        with _step("start a registry and push the image", timings) as note:
            server = RegistryServer().start()
            ref = ImageReference.parse(f"{server.address}/demo/web:v1")
            with contextlib.closing(RegistryClient(server.address)) as registry:
                pushed = push_image(image_dir, ref, registry)
            note[0] = (
                f"{ref}: {pushed.blobs_uploaded} blobs, {format_size(pushed.bytes_uploaded)} "
                "(CNCF docker-registry on loopback)"
            )
        with _step("start the node's engine daemon (engine + instance API)", timings) as note:
            node = _DemoNode(work / "node")
            note[0] = f"socket {node.socket}"
        port = _free_port()
        command = f"tidal instance run {ref} --bandwidth 5M -p {port}:80"
        with _step(command, timings) as note:
            rec = node.run(str(ref), port)
            note[0] = f"{rec['name']} at {rec['ip']}: metadata pulled, image mounted lazily"
        with _step(f"GET http://127.0.0.1:{port}/ through the published port", timings) as note:
            page = _get(port, "/index.html")
            out.print(f"   [cyan]|[/] {escape(page.decode().strip())}", markup=True)
            note[0] = f"{len(page)} bytes"
        with _step(
            f"download {format_size(DEMO_DOWNLOAD_BYTES)} at the shaped rate", timings
        ) as note:
            t0 = time.perf_counter()
            body = _get(port, "/download.bin")
            secs = time.perf_counter() - t0
            if body != (rootfs / "www" / "download.bin").read_bytes():
                raise ConfigError("the instance served different bytes than the image holds")
            note[0] = (
                f"{len(body) * 8 / secs / 1e6:.2f} Mbit/s (limit {DEMO_RATE_BPS / 1e6:.0f}); "
                "bytes identical to the image's"
            )
        with _step("what the lazy mount fetched from the registry", timings) as note:
            fetched = node.fetched_bytes(rec)
            stored = result.stored_bytes
            note[0] = (
                f"{format_size(fetched)} of {format_size(stored)} stored "
                f"({100 * fetched / max(stored, 1):.0f} %): only the blocks it read"
            )
        with _step("tidal instance rm -f", timings) as note:
            node.remove(str(rec["name"]))
            note[0] = "no container, mount, loop device, veth or cgroup left"
        with _step("verify every chunk digest and blob digest", timings) as note:
            chunks = Image.open(image_dir).verify()
            note[0] = f"{chunks} chunks ok (sha256)"
    finally:
        if node is not None:
            node.close()
        if server is not None:
            server.stop()
        if not keep and workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    table = Table(title="tidal demo", show_lines=False)
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("what happened")
    for name, secs, detail in timings:
        table.add_row(name, f"{secs:.2f}", detail)
    out.print(table)
    if keep or workdir is not None:
        out.print(f"kept {work}")


class _DemoNode:
    """An engine daemon with the instance API, in this process, on the demo's own network."""

    def __init__(self, data_root: Path) -> None:
        from tidal.engine.daemon import Daemon
        from tidal.engine.settings import EngineSettings
        from tidal.instance.client import InstanceClient
        from tidal.instance.service import instance_part

        settings = EngineSettings(
            state_dir=data_root / "engine", bridge=DEMO_BRIDGE, subnet=DEMO_SUBNET
        )
        self.settings = settings
        self.daemon = Daemon(settings, parts=[instance_part])
        self.daemon.start()
        self.socket = settings.resolved_socket_path()
        self.client = InstanceClient(self.socket)

    def run(self, ref: str, port: int) -> dict[str, object]:
        from tidal.engine.spec import PortMapping
        from tidal.instance.spec import InstanceSpec, Limits

        spec = InstanceSpec(
            image=ref,
            name="web",
            limits=Limits(egress_bps=DEMO_RATE_BPS, ingress_bps=DEMO_RATE_BPS),
            ports=(PortMapping(port, 80),),
            pull="missing",
        )
        rec = self.client.run_instance(spec)
        deadline = time.monotonic() + 20
        while True:  # httpd listens a moment after its process starts
            try:
                _get(port, "/index.html")
                return rec
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def fetched_bytes(self, rec: dict[str, object]) -> int:
        from tidal.blockdev.mounts import image_stats

        main = self.client.inspect(f"{rec['name']}.main")
        lower = str(main["rootfs"]["lower_mountpoint"])
        time.sleep(1.2)  # the mount's server rewrites its statistics every second
        lazy = image_stats(lower).get("lazy") or {}
        return int(lazy.get("total", {}).get("bytes_fetched", 0))

    def remove(self, name: str) -> None:
        self.client.remove_instance(name, force=True)

    def close(self) -> None:
        from tidal.engine.network import remove_bridge

        with contextlib.suppress(Exception):
            for item in self.client.instances():
                self.client.remove_instance(str(item["id"]), force=True)
        self.client.close()
        with contextlib.suppress(Exception):
            # a daemon leaves lxcfs to its containers; the demo's are gone, and with its mount
            # stopped first the engine's close releases its anchor (tidal.engine.mountview)
            self.daemon.engine.lxcfs.stop()
        self.daemon.close()
        remove_bridge(DEMO_BRIDGE)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> bytes:
    import httpx

    try:
        resp = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=60)
    except httpx.TransportError as exc:
        raise OSError(str(exc)) from exc
    resp.raise_for_status()
    return resp.content
