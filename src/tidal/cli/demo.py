"""``tidal demo``: Tidal's main job on embedded defaults, start to finish, with timings.

Makes a small root filesystem on the spot (busybox-static from Debian plus a few files),
builds a block image from it, pushes it to the CNCF registry started for the demo on a
loopback port (or to the node's local store where the registry is not installed), pulls its
metadata only, mounts it lazily (registry -> chunk cache -> FUSE block device -> loop ->
ext4), runs a command from it with chroot, shows how little was fetched, verifies every
checksum, and cleans everything up.
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
from tidal.proc import run
from tidal.units import format_size

if TYPE_CHECKING:  # the demo imports the image, blobs and blockdev parts when it runs
    from tidal.blobs.registries import Registry
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
)
DEMO_COMMAND = (
    'echo "hello from $(cat /etc/hostname), a Tidal block image"; '
    "cat /app/motd; "
    'echo "files in image: $(find / -xdev | wc -l)"; '
    "sha256sum /app/data.bin | head -c 16; echo ' = sha256 prefix of /app/data.bin'"
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


def demo(
    keep: bool = typer.Option(
        False, help="Keep the work directory (image, rootfs) for a look afterwards."
    ),
    workdir: Path | None = typer.Option(
        None, help="Where to work (default: a new directory under /var/tmp)."
    ),
) -> None:
    """Build, push, pull and lazily mount a busybox image; run a command from it.

    The image goes to a CNCF registry started on a loopback port, is pulled back (metadata
    only) and mounted lazily; each step is printed with its time, and how much was fetched.
    """
    from tidal.blobs.distribution import pull_image, push_image
    from tidal.blobs.reference import ImageReference
    from tidal.blobs.registries import LocalRegistry
    from tidal.blobs.registry_client import RegistryClient
    from tidal.blockdev.builder import build_from_dir
    from tidal.blockdev.mounts import mount_image, unmount
    from tidal.image.manifest import Image
    from tidal.testing.registry_server import REGISTRY_BINARY, RegistryServer

    if os.geteuid() != 0:
        raise ConfigError("the demo mounts a FUSE block device and a loop device: run it as root")
    work = workdir or Path(tempfile.mkdtemp(prefix="tidal-demo-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float, str]] = []
    rootfs, image_dir, target = work / "rootfs", work / "image", work / "mnt"
    pulled = work / "pulled"
    # the FUSE server reads the [blobs] settings from the environment: a fresh, cold cache
    os.environ["TIDAL_BLOBS__CACHE_DIR"] = str(work / "chunk-cache")
    server: RegistryServer | None = None
    mounted = False
    try:
        with _step("make a busybox root filesystem", timings) as note:
            size = make_sample_rootfs(rootfs)
            note[0] = f"{format_size(size)} in {rootfs}"
        with _step("build the block image", timings) as note:
            result = build_from_dir(rootfs, image_dir)
            m = result.manifest
            note[0] = (
                f"{len(m.layers)} layer, virtual disk {format_size(m.size_bytes)}, "
                f"stored {format_size(result.stored_bytes)} ({m.layers[0].codec})"
            )
        registry: Registry
        with _step("start a registry", timings) as note:
            if shutil.which(REGISTRY_BINARY):
                server = RegistryServer().start()
                registry = RegistryClient(server.address)
                ref = ImageReference.parse(f"{server.address}/demo/busybox:v1")
                note[0] = f"CNCF registry (docker-registry) at {server.address}"
            else:
                registry = LocalRegistry(work / "store")
                ref = ImageReference.parse("demo/busybox:v1", default_registry="local")
                note[0] = "docker-registry not installed: the node's local store"
        with contextlib.closing(registry):
            with _step("push the image", timings) as note:
                pushed = push_image(image_dir, ref, registry)
                note[0] = f"{pushed.blobs_uploaded} blobs, {format_size(pushed.bytes_uploaded)}"
            with _step("pull it: metadata only", timings) as note:
                pull_image(ref, pulled, registry)
                note[0] = f"{sum(p.stat().st_size for p in pulled.iterdir())} bytes on disk"
        with _step("mount it lazily (registry -> FUSE -> loop -> ext4)", timings) as note:
            info = mount_image(pulled, target)
            mounted = True
            note[0] = f"{info.loop_device} at {target}"
        with _step("run a command from the image (chroot)", timings) as note:
            done = run(
                ["chroot", str(target), "/bin/sh", "-c", DEMO_COMMAND],
                what="the command in the image failed",
                timeout_s=60,
            )
            for line in done.stdout.splitlines():
                out.print(f"   [cyan]|[/] {escape(line)}", markup=True)
            note[0] = f"exit {done.returncode}, {len(done.stdout.splitlines())} lines"
        with _step("what it fetched", timings) as note:
            fetched = _fetched_bytes(target)
            stored = result.stored_bytes
            note[0] = (
                f"{format_size(fetched)} of {format_size(stored)} stored "
                f"({100 * fetched / max(stored, 1):.0f} %): only the blocks it read"
            )
        with _step("unmount and detach", timings) as note:
            unmount(target)
            mounted = False
            note[0] = "no mount, loop device or FUSE server left"
        with _step("verify every chunk checksum and blob digest", timings) as note:
            chunks = Image.open(image_dir).verify()
            note[0] = f"{chunks} chunks ok"
    finally:
        if mounted:
            with contextlib.suppress(Exception):
                unmount(target, force=True)
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


def _fetched_bytes(target: Path) -> int:
    """Bytes the mount's server fetched so far, from statistics written after this call."""
    from tidal.blockdev.mounts import STATS_FILE, find_mount, image_stats

    path = find_mount(target).run_dir / STATS_FILE
    asked = time.time()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if path.stat().st_mtime > asked:
                break
        time.sleep(0.1)
    lazy = image_stats(target).get("lazy") or {}
    return int(lazy.get("total", {}).get("bytes_fetched", 0))
