"""Time to an application's first useful output: full pull of a gzip OCI image vs Tidal lazy start.

The image is a Debian bookworm root filesystem (``debootstrap --variant=minbase`` with python3,
numpy, scipy, pandas, matplotlib, lxml, pillow and ICU; apt caches removed as in Debian's
container images), several hundred MB of files. It is built once and cached in
/var/cache/tidal-bench/rootfs-bookworm-lazy (network needed only the first time; ``--rootfs DIR``
uses another tree). From it the bench makes, also cached (under /var/cache/tidal-bench/lazy-start/,
rebuilt when the tree or Tidal's image format code changes, or with ``--rebuild``):

- the ordinary OCI image: one ``tar | gzip -6`` layer in an OCI layout (what ``docker build``
  pushes), and
- the Tidal image: ``build_from_dir`` (ext4 in lz4 ZFile chunks).

Each run records a start-up trace per application (``record_trace`` on the local image, stored
with ``attach_trace``) and pushes everything with skopeo and ``push_image`` into one CNCF
registry (storage in the bench's work directory). Then, for each link rate, that registry runs in
a network namespace behind a veth pair shaped with ``tc tbf`` (``ThrottledLink``) and every case
starts the application from nothing:

  (1) baseline      ``skopeo copy docker://... oci:DIR``, ``tar -xzf`` the layer into a
                    directory, run the application chrooted there
  (2) lazy cold     ``pull_image`` (manifest and config only), ``mount_image`` (registry ->
                    chunk cache -> FUSE -> loop -> ext4), run chrooted in the mount; empty cache
  (3) lazy+trace    as (2), the image carrying the application's trace layer, which the FUSE
                    server replays in the background from the moment it mounts; empty cache
  (4) warm          as (3) over the chunk cache (3) filled

The page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before every case, so
cold is cold and warm means "chunks on the node's disk". Time runs from the first byte of the
pull to the first useful output: the line ``ready`` of
``python3 -c 'import json, sqlite3, email; print("ready")'``, or the first answer of
``python3 -m http.server`` to ``GET /etc/os-release`` (polled from the host every 10 ms).
Applications run in their own mount and PID namespaces (``unshare``) with /proc and /dev.

Bytes fetched before ready are counted on the link itself (the host side of the veth:
everything the registry sent, headers included) at the moment of ready; "% of image" is that
over the image's stored size in its own format (the gzip layer for (1), the lz4 block layer for
(2)-(4)). Tidal's own count of payload bytes (``image_stats``) is in the JSON too.

Needs root (namespaces, tc, FUSE, loop devices), debootstrap, skopeo, docker-registry. Cleans up
every mount, loop device, namespace, registry process and temporary directory it creates, also
on failure and Ctrl-C.

Every case runs ``--repeat`` times (default 3, interleaved); the table shows the median run.
A third application, ``pandas`` (``python3 -c 'import numpy, scipy.linalg, pandas;
print("ready")'``), needs much more of the image. The default run (two rates, three
applications) takes about 11 minutes once the tree is cached; ``--quick`` is 100 Mbit/s, the
python one-liner, one run.

    .venv/bin/python benchmarks/bench_lazy_start.py [--rates 100,1000] [--apps python,http,pandas]
        [--repeat 3] [--quick] [--rootfs DIR] [--rebuild]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

import tidal.image
from tidal.blobs.distribution import pull_image, push_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryClient
from tidal.blobs.settings import BlobSettings
from tidal.blockdev import builder, mounts
from tidal.blockdev.builder import build_from_dir
from tidal.blockdev.record import record_trace
from tidal.cli.console import out as stdout_console
from tidal.image.manifest import Image, attach_trace
from tidal.testing.network import ThrottledLink
from tidal.testing.registry_server import RegistryServer, free_port

CACHE = Path("/var/cache/tidal-bench")
ROOTFS = CACHE / "rootfs-bookworm-lazy"
ARTIFACTS = CACHE / "lazy-start"
RESULTS = Path(__file__).parent / "results" / "lazy_start.json"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "python3",
    "python3-numpy",
    "python3-scipy",
    "python3-pandas",
    "python3-matplotlib",
    "python3-lxml",
    "python3-pil",
    "libicu72",
    "ca-certificates",
)
MIN_IMAGE_BYTES = 500 * 10**6
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OCI_REPO = "bench/app-gzip"
TIDAL_REPO = "bench/app-tidal"
TAG = "v1"
HTTP_PATH = "/etc/os-release"
POLL_S = 0.01
STATS_WAIT_S = 5.0
PREFETCH_WAIT_S = 120.0

CASES = ("baseline", "lazy cold", "lazy+trace", "warm")
CASE_TITLES = {
    "baseline": "(1) pull + unpack",
    "lazy cold": "(2) lazy, cold",
    "lazy+trace": "(3) lazy + trace, cold",
    "warm": "(4) lazy, warm cache",
}

# The namespaces' first process: mount the kernel filesystems inside the tree and become the
# application. "$@" carries the argv untouched; the mounts die with the mount namespace.
CHROOT_SCRIPT = r"""
set -e
root=$1; shift
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
exec chroot "$root" "$@"
"""


class BenchError(Exception):
    """A step of the bench failed; the message says which and why."""


# --- applications ---------------------------------------------------------------------------


@dataclass(frozen=True)
class App:
    """An application and how to tell it has produced its first useful output."""

    name: str
    kind: str  # "line": a line containing "ready" on stdout; "http": first answer to GET
    code: str = ""
    """For a "line" app: the python3 -c program."""

    @property
    def description(self) -> str:
        if self.kind == "line":
            return f"python3 -c '{self.code}'"
        return f"python3 -m http.server, first answer to GET {HTTP_PATH}"

    def argv(self, port: int) -> list[str]:
        if self.kind == "line":
            return ["python3", "-c", self.code]
        return ["python3", "-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory", "/",
                str(port)]  # fmt: skip


APPS = {
    "python": App("python", "line", 'import json, sqlite3, email; print("ready")'),
    "http": App("http", "http"),
    # beyond the two: an application that needs much more of the image
    "pandas": App("pandas", "line", 'import numpy, scipy.linalg, pandas; print("ready")'),
}


def app_env() -> dict[str, str]:
    return {"PATH": PATH_ENV, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}


def start_app(root: Path, app: App, port: int, log_file: Path) -> subprocess.Popen[bytes]:
    """The application chrooted into ``root``, in its own mount and PID namespaces."""
    cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child"]
    cmd += ["sh", "-c", CHROOT_SCRIPT, "sh", str(root), *app.argv(port)]
    with log_file.open("ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if app.kind == "line" else log,
            stderr=log,
            env=app_env(),
            start_new_session=True,
        )


def stop_app(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _tail(path: Path) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-3:])
    except OSError:
        return ""


def wait_ready(
    proc: subprocess.Popen[bytes], app: App, port: int, timeout_s: float, log_file: Path
) -> float:
    """Block until the application's first useful output; return that moment (monotonic)."""
    deadline = time.monotonic() + timeout_s
    if app.kind == "line":
        assert proc.stdout is not None
        fd, buf = proc.stdout.fileno(), b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                if any(b"ready" in line for line in buf.split(b"\n")):
                    return time.monotonic()
            elif proc.poll() is not None:
                break
        raise BenchError(
            f"{app.name}: no 'ready' line (exit {proc.poll()}): "
            f"{buf.decode(errors='replace')[-200:]} {_tail(log_file)}"
        )
    url = f"http://127.0.0.1:{port}{HTTP_PATH}"
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{app.name}: exited with {proc.returncode}: {_tail(log_file)}")
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic()
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
    raise BenchError(f"{app.name}: no answer on {url} within {timeout_s:.0f} s")


# --- the image ------------------------------------------------------------------------------


def run(cmd: list[str], what: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        raise BenchError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc


def du_bytes(path: Path) -> int:
    return int(run(["du", "-sb", str(path)], f"du {path}").stdout.split()[0])


def ensure_rootfs(given: Path | None, mirror: str, console: Console) -> Path:
    if given is not None:
        if not (given / "usr" / "bin" / "python3").exists():
            raise BenchError(f"--rootfs {given} has no usr/bin/python3")
        return given
    if (ROOTFS / "usr" / "bin" / "python3").exists():
        return ROOTFS
    if shutil.which("debootstrap") is None:
        raise BenchError("debootstrap is not installed (apt-get install debootstrap), or --rootfs")
    console.print(f"building {ROOTFS} with debootstrap (once; a few minutes)")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / "rootfs-bookworm-lazy.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm",
         str(partial), mirror],
        "debootstrap",
        timeout=3600,
    )  # fmt: skip
    # What Debian's own container images leave out: downloaded packages and package lists.
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (partial / sub).glob("*"):
            if p.is_file() and p.name != "lock":
                p.unlink()
    partial.rename(ROOTFS)
    return ROOTFS


def fingerprint(rootfs: Path) -> str:
    """Changes with the tree's packages and with the code that writes Tidal images."""
    h = hashlib.sha256(str(rootfs.resolve()).encode())
    status = rootfs / "var" / "lib" / "dpkg" / "status"
    h.update(status.read_bytes() if status.exists() else b"")
    code = [*sorted(Path(tidal.image.__file__).parent.glob("*.py")), Path(builder.__file__)]
    for path in code:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def build_oci_layout(rootfs: Path, out: Path) -> None:
    """An ordinary OCI image: one ``tar | gzip -6`` layer with its diff_id, in an OCI layout."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tmp = blobs / ".layer.partial"
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(rootfs),
         "-cf", "-", "."],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    diff = hashlib.sha256()
    with tmp.open("wb") as fh:
        gz = subprocess.Popen(["gzip", "-6", "-n"], stdin=subprocess.PIPE, stdout=fh)
        assert tar.stdout is not None and gz.stdin is not None
        while block := tar.stdout.read(1 << 20):
            diff.update(block)
            gz.stdin.write(block)
        gz.stdin.close()
        if tar.wait() != 0 or gz.wait() != 0:
            raise BenchError(f"tar | gzip of {rootfs} failed")
    layer_hex = sha256_file(tmp)
    tmp.rename(blobs / layer_hex)

    def put(doc: dict[str, Any]) -> tuple[str, int]:
        data = json.dumps(doc, sort_keys=True).encode()
        hexd = hashlib.sha256(data).hexdigest()
        (blobs / hexd).write_bytes(data)
        return f"sha256:{hexd}", len(data)

    cfg_digest, cfg_size = put(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": [f"PATH={PATH_ENV}"], "Cmd": ["/bin/bash"]},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff.hexdigest()}"]},
        }
    )
    man_digest, man_size = put(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cfg_digest,
                "size": cfg_size,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": f"sha256:{layer_hex}",
                    "size": (blobs / layer_hex).stat().st_size,
                }
            ],
        }
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": man_digest,
                "size": man_size,
                "annotations": {"org.opencontainers.image.ref.name": TAG},
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index))
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@dataclass(frozen=True)
class Artifacts:
    rootfs: Path
    rootfs_bytes: int
    oci: Path
    oci_bytes: int
    """Size of the gzip layer blob: what a full pull downloads (plus config and manifest)."""
    tidal: Path
    tidal_bytes: int
    """Size of the Tidal image's layer blobs."""


def ensure_artifacts(rootfs: Path, rebuild: bool, console: Console) -> Artifacts:
    fp = fingerprint(rootfs)
    home = ARTIFACTS / fp
    if rebuild:
        shutil.rmtree(home, ignore_errors=True)
    if not (home / "meta.json").exists():
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for old in ARTIFACTS.iterdir():  # one image set at a time: they are large
            shutil.rmtree(old, ignore_errors=True)
        partial = ARTIFACTS / f"{fp}.partial"
        partial.mkdir()
        console.print(f"building the gzip OCI image and the Tidal image of {rootfs} (cached)")
        t0 = time.monotonic()
        build_oci_layout(rootfs, partial / "oci")
        gzip_s = time.monotonic() - t0
        res = build_from_dir(
            rootfs, partial / "tidal", codec="lz4", config={"Env": [f"PATH={PATH_ENV}"]}
        )
        meta = {
            "rootfs": str(rootfs),
            "rootfs_bytes": du_bytes(rootfs),
            "tar_gzip_s": gzip_s,
            "tidal_build_s": res.seconds,
        }
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        partial.rename(home)
    meta = json.loads((home / "meta.json").read_text())
    oci_index = json.loads((home / "oci" / "index.json").read_text())
    man_hex = oci_index["manifests"][0]["digest"].split(":")[1]
    man = json.loads((home / "oci" / "blobs" / "sha256" / man_hex).read_bytes())
    return Artifacts(
        rootfs=rootfs,
        rootfs_bytes=int(meta["rootfs_bytes"]),
        oci=home / "oci",
        oci_bytes=sum(int(la["size"]) for la in man["layers"]),
        tidal=home / "tidal",
        tidal_bytes=sum(r.size_bytes for r in Image.open(home / "tidal").manifest.data_layers),
    )


def image_variant(src: Path, dest: Path) -> Path:
    """A second directory of the same image (blobs hard-linked) to attach a trace to."""
    (dest / "blobs" / "sha256").mkdir(parents=True)
    for blob in (src / "blobs" / "sha256").iterdir():
        target = dest / "blobs" / "sha256" / blob.name
        try:
            os.link(blob, target)
        except OSError:
            shutil.copy2(blob, target)
    shutil.copy2(src / "manifest.json", dest / "manifest.json")
    return dest


def record_app_trace(image_dir: Path, app: App, timeout_s: float) -> tuple[int, int]:
    """Record ``app``'s start-up on the local image and attach it; (ranges, bytes)."""
    port = free_port()
    on_output: Callable[[str], None] | None = None
    if app.kind == "http":

        def on_output(line: str) -> None:
            # The server announces itself before it has served anything; answer one request
            # inside the recording so the trace covers it too.
            if "Serving HTTP" in line:
                deadline = time.monotonic() + timeout_s
                with httpx.Client(timeout=5.0) as c:
                    while time.monotonic() < deadline:
                        with contextlib.suppress(httpx.TransportError):
                            if c.get(f"http://127.0.0.1:{port}{HTTP_PATH}").status_code == 200:
                                return
                        time.sleep(POLL_S)

    res = record_trace(
        image_dir,
        app.argv(port),
        timeout_s=timeout_s,
        ready_line="ready" if app.kind == "line" else "Serving HTTP",
        env=app_env(),
        on_output=on_output,
    )
    if res.ended_by == "time limit" or (res.ended_by == "exit" and res.exit_code != 0):
        raise BenchError(f"recording {app.name}: ended by {res.ended_by}: {res.output_tail}")
    attach_trace(image_dir, res.trace.serialize())
    return len(res.trace.ranges), res.trace.total_bytes


# --- the link and its counters -------------------------------------------------------------


def host_interface(link: ThrottledLink) -> str:
    """The host side of the link's veth pair (found by its address)."""
    out = run(["ip", "-j", "-4", "addr", "show"], "ip addr").stdout
    for entry in json.loads(out):
        for addr in entry.get("addr_info", []):
            if addr.get("local") == link.host_address:
                return str(entry["ifname"])
    raise BenchError(f"no interface has the link's address {link.host_address}")


@dataclass
class Env:
    """What every case of one link rate needs."""

    work: Path
    address: str
    iface: str | None
    artifacts: Artifacts
    timeout_s: float

    def rx_bytes(self) -> int:
        if self.iface is None:
            return 0
        return int(Path(f"/sys/class/net/{self.iface}/statistics/rx_bytes").read_text())

    def client(self) -> RegistryClient:
        cfg = BlobSettings(insecure_registries=(self.address,))
        return RegistryClient(self.address, settings=cfg, load_auth_file=False)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass
class Row:
    time_s: float = 0.0
    fetch_s: float = 0.0
    """Pull: skopeo's download, or pull_image's manifest and config."""
    prepare_s: float = 0.0
    """Unpack (tar -xzf), or mount (FUSE server, loop device, ext4)."""
    run_s: float = 0.0
    """Application start to first useful output."""
    wire_bytes_ready: int = 0
    """Bytes the registry sent over the link until ready, headers included."""
    payload_bytes: int = 0
    """Blob bytes: the downloaded blobs, or Tidal's bytes_fetched (stats written <= 1 s after
    ready, so trace prefetch may have run on a little)."""
    wire_bytes_total: int = 0
    """Until the case ended (Tidal: trace prefetch finished)."""
    extra: dict[str, Any] = field(default_factory=dict)


def case_baseline(env: Env, app: App, tag: str) -> Row:
    work = env.work / f"baseline-{tag}"
    work.mkdir()
    row = Row()
    port = free_port()
    drop_caches()
    rx0 = env.rx_bytes()
    t0 = time.monotonic()
    try:
        oci = work / "oci"
        run(
            ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
             f"docker://{env.address}/{OCI_REPO}:{TAG}", f"oci:{oci}:{TAG}"],
            "skopeo copy (the baseline pull)",
            timeout=env.timeout_s,
        )  # fmt: skip
        t1 = time.monotonic()
        index = json.loads((oci / "index.json").read_text())
        man_hex = index["manifests"][0]["digest"].split(":")[1]
        man = json.loads((oci / "blobs" / "sha256" / man_hex).read_bytes())
        root = work / "rootfs"
        root.mkdir()
        for layer in man["layers"]:
            blob = oci / "blobs" / "sha256" / layer["digest"].split(":")[1]
            run(
                ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xzf", str(blob),
                 "-C", str(root)],
                "unpacking the layer",
                timeout=env.timeout_s,
            )  # fmt: skip
        t2 = time.monotonic()
        log = work / "app.log"
        proc = start_app(root, app, port, log)
        try:
            t_ready = wait_ready(proc, app, port, env.timeout_s, log)
            row.wire_bytes_ready = env.rx_bytes() - rx0
        finally:
            stop_app(proc)
        row.time_s, row.fetch_s, row.prepare_s = t_ready - t0, t1 - t0, t2 - t1
        row.run_s = t_ready - t2
        row.payload_bytes = sum(p.stat().st_size for p in (oci / "blobs" / "sha256").iterdir())
        row.wire_bytes_total = env.rx_bytes() - rx0
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fresh_stats(target: Path) -> dict[str, Any]:
    """The FUSE server's statistics, written after this call began (it writes every second)."""
    path = mounts.find_mount(target).run_dir / mounts.STATS_FILE
    before = path.stat().st_mtime_ns if path.exists() else 0
    deadline = time.monotonic() + STATS_WAIT_S
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime_ns != before:
            break
        time.sleep(0.05)
    return mounts.image_stats(target)


def case_tidal(env: Env, app: App, image_tag: str, cache_dir: Path, label: str) -> Row:
    """Pull (metadata), mount lazily over ``cache_dir``, run until ready, unmount."""
    os.environ["TIDAL_BLOBS__CACHE_DIR"] = str(cache_dir)
    work = env.work / f"tidal-{label}"
    work.mkdir()
    target = work / "mnt"
    row = Row()
    port = free_port()
    drop_caches()
    rx0 = env.rx_bytes()
    t0 = time.monotonic()
    mounted = False
    try:
        with env.client() as client:
            ref = ImageReference.parse(f"{env.address}/{TIDAL_REPO}:{image_tag}")
            pull_image(ref, work / "pulled", client)
        t1 = time.monotonic()
        mounts.mount_image(work / "pulled", target)
        mounted = True
        t2 = time.monotonic()
        log = work / "app.log"
        proc = start_app(target, app, port, log)
        try:
            t_ready = wait_ready(proc, app, port, env.timeout_s, log)
            row.wire_bytes_ready = env.rx_bytes() - rx0
        finally:
            stop_app(proc)
        row.time_s, row.fetch_s, row.prepare_s = t_ready - t0, t1 - t0, t2 - t1
        row.run_s = t_ready - t2
        stats = fresh_stats(target)
        lazy = stats.get("lazy") or {}
        row.payload_bytes = int(lazy.get("total", {}).get("bytes_fetched", 0))
        deadline = time.monotonic() + PREFETCH_WAIT_S
        while (lazy.get("prefetch") or {}).get("running") and time.monotonic() < deadline:
            stats = fresh_stats(target)
            lazy = stats.get("lazy") or {}
        row.wire_bytes_total = env.rx_bytes() - rx0
        row.extra = {
            "total_after_prefetch": lazy.get("total", {}),
            "prefetch": lazy.get("prefetch", {}),
            "fuse": stats.get("fuse", {}),
        }
        return row
    finally:
        if mounted:
            mounts.unmount(target, force=True)
        if not leftover_mounts(work):  # never walk into a mounted image
            shutil.rmtree(work, ignore_errors=True)


def measure_app(env: Env, app: App, rep: int) -> dict[str, Row]:
    tag = f"{app.name}-{rep}"
    rows: dict[str, Row] = {}
    rows["baseline"] = case_baseline(env, app, tag)
    cold, traced = env.work / f"cache-{tag}-cold", env.work / f"cache-{tag}-trace"
    try:
        rows["lazy cold"] = case_tidal(env, app, "plain", cold, f"{tag}-cold")
        rows["lazy+trace"] = case_tidal(env, app, app.name, traced, f"{tag}-trace")
        rows["warm"] = case_tidal(env, app, app.name, traced, f"{tag}-warm")
    finally:
        shutil.rmtree(cold, ignore_errors=True)
        shutil.rmtree(traced, ignore_errors=True)
    return rows


# --- setup, cleanup and the report ---------------------------------------------------------


def publish(
    art: Artifacts, work: Path, apps: list[App], timeout_s: float, console: Console
) -> dict[str, Any]:
    """Record the traces and push every image into the registry storage ``work/registry``."""
    traces: dict[str, Any] = {}
    with RegistryServer(storage_dir=work / "registry") as server:
        run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{art.oci}:{TAG}",
             f"docker://{server.address}/{OCI_REPO}:{TAG}"],
            "skopeo copy (pushing the gzip image)",
        )  # fmt: skip
        with RegistryClient(server.address, load_auth_file=False) as client:
            push_image(
                art.tidal, ImageReference.parse(f"{server.address}/{TIDAL_REPO}:plain"), client
            )
            for app in apps:
                variant = image_variant(art.tidal, work / "variants" / app.name)
                t0 = time.monotonic()
                n, nbytes = record_app_trace(variant, app, timeout_s)
                traces[app.name] = {"ranges": n, "bytes": nbytes, "record_s": time.monotonic() - t0}
                console.print(
                    f"trace of {app.name}: {n} ranges, {nbytes / 1e6:.1f} MB "
                    f"({nbytes / art.rootfs_bytes:.1%} of the files)"
                )
                ref = ImageReference.parse(f"{server.address}/{TIDAL_REPO}:{app.name}")
                push_image(variant, ref, client)
    return traces


def leftover_mounts(under: Path) -> list[str]:
    prefix = str(under) + "/"
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            out.append(point)
    return out


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """A scratch directory on disk (images unpack to GBs); nothing mounted survives it."""
    work = Path(tempfile.mkdtemp(prefix="tidal-bench-lazy-", dir="/var/tmp"))
    try:
        yield work
    finally:
        for info in mounts.list_mounts():  # our own TIDAL_DATA_ROOT: only this bench's
            with contextlib.suppress(Exception):
                mounts.unmount(info.target, force=True)
        for point in sorted(leftover_mounts(work), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        if leftover_mounts(work):
            print(f"warning: mounts remain under {work}; not removing it", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def summarise(runs: list[dict[str, Row]], art: Artifacts) -> dict[str, dict[str, Any]]:
    """Per case: the median run (by time) of the repetitions, with ratios to the baseline."""
    out: dict[str, dict[str, Any]] = {}
    for case in CASES:
        rows = sorted((r[case] for r in runs), key=lambda r: r.time_s)
        med = rows[(len(rows) - 1) // 2]
        image_bytes = art.oci_bytes if case == "baseline" else art.tidal_bytes
        out[case] = {
            "time_s": med.time_s,
            "time_s_all": [r.time_s for r in rows],
            "fetch_s": med.fetch_s,
            "prepare_s": med.prepare_s,
            "run_s": med.run_s,
            "wire_bytes_before_ready": med.wire_bytes_ready,
            "payload_bytes_before_ready": med.payload_bytes,
            "wire_bytes_total": med.wire_bytes_total,
            "image_bytes": image_bytes,
            "fraction_of_image_before_ready": med.wire_bytes_ready / image_bytes,
            **({"detail": med.extra} if med.extra else {}),
        }
    base = out["baseline"]
    for row in out.values():
        row["speedup_vs_baseline"] = base["time_s"] / row["time_s"] if row["time_s"] else 0.0
        row["bytes_vs_baseline"] = (
            row["wire_bytes_before_ready"] / base["wire_bytes_before_ready"]
            if base["wire_bytes_before_ready"]
            else 0.0
        )
    return out


def print_table(
    console: Console, label: str, per_app: dict[str, dict[str, dict[str, Any]]]
) -> None:
    table = Table(title=f"time to first useful output, registry behind {label}")
    for col in ("app", "case", "total s", "pull s", "unpack/mount s", "run s",
                "MB before ready", "% of image", "speed-up vs (1)", "bytes vs (1)"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("app", "case") else "right")
    for app_name, cases in per_app.items():
        for case, r in cases.items():
            table.add_row(
                app_name if case == "baseline" else "",
                CASE_TITLES[case],
                f"{r['time_s']:.2f}",
                f"{r['fetch_s']:.2f}",
                f"{r['prepare_s']:.2f}",
                f"{r['run_s']:.2f}",
                f"{r['wire_bytes_before_ready'] / 1e6:.1f}",
                f"{r['fraction_of_image_before_ready']:.1%}",
                "1.0x" if case == "baseline" else f"{r['speedup_vs_baseline']:.1f}x",
                f"{r['bytes_vs_baseline']:.3f}",
                end_section=case == CASES[-1],
            )
    console.print(table)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog=f"The Debian tree is cached in {ROOTFS}, the images built from it in "
        f"{ARTIFACTS}/; delete them (or --rebuild) to start over.",
    )
    ap.add_argument("--rates", default="100,1000", help="link rates in Mbit/s (default 100,1000)")
    ap.add_argument("--apps", default=",".join(APPS), help=f"of {','.join(APPS)} (all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every case; the median counts")
    ap.add_argument("--quick", action="store_true", help="100 Mbit/s, the python app, one run")
    ap.add_argument("--rootfs", type=Path, help="use this root tree instead of the cached one")
    ap.add_argument("--mirror", default=MIRROR, help="Debian mirror for debootstrap")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached images")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per step")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_lazy_start needs root (netns, tc, FUSE, loop devices)", file=sys.stderr)
        return 1
    for tool in ("skopeo", "docker-registry", "unshare", "chroot", "tc"):
        if shutil.which(tool) is None:
            print(f"bench_lazy_start needs {tool}; run `sudo make deps`", file=sys.stderr)
            return 1
    if args.quick:
        args.rates, args.apps, args.repeat = "100", "python", 1
    rates = [float(r) for r in args.rates.split(",") if r]
    apps = [APPS[a] for a in args.apps.split(",") if a]
    console = stdout_console
    signal.signal(signal.SIGTERM, _sigterm)

    rootfs = ensure_rootfs(args.rootfs, args.mirror, console)
    results: dict[str, Any] = {
        "benchmark": "lazy_start",
        "argv": sys.argv[1:],
        "repeat": args.repeat,
        "links": {},
    }
    failed = False
    with work_dir() as work:
        os.environ["TIDAL_DATA_ROOT"] = str(work / "data")
        art = ensure_artifacts(rootfs, args.rebuild, console)
        if art.rootfs_bytes < MIN_IMAGE_BYTES:
            console.print(f"[yellow]warning: {rootfs} holds only {art.rootfs_bytes / 1e6:.0f} MB")
        console.print(
            f"image: {rootfs}, {art.rootfs_bytes / 1e6:.0f} MB of files; gzip OCI layer "
            f"{art.oci_bytes / 1e6:.0f} MB; Tidal lz4 layer {art.tidal_bytes / 1e6:.0f} MB"
        )
        results["image"] = {
            "rootfs": str(rootfs),
            "packages": list(PACKAGES) if args.rootfs is None else None,
            "rootfs_bytes": art.rootfs_bytes,
            "oci_gzip_layer_bytes": art.oci_bytes,
            "tidal_layer_bytes": art.tidal_bytes,
        }
        results["apps"] = {a.name: a.description for a in apps}
        results["traces"] = publish(art, work, apps, args.timeout_s, console)
        for rate in rates:
            label = f"{rate:g} Mbit/s"
            with contextlib.ExitStack() as stack:
                link = stack.enter_context(ThrottledLink(rate))
                server = stack.enter_context(
                    RegistryServer(
                        storage_dir=work / "registry", host=link.ns_address, wrap=link.exec_prefix
                    )
                )
                os.environ["TIDAL_BLOBS__INSECURE_REGISTRIES"] = server.address
                env = Env(work, server.address, host_interface(link), art, args.timeout_s)
                per_app: dict[str, dict[str, dict[str, Any]]] = {}
                for app in apps:
                    runs = []
                    for rep in range(args.repeat):
                        console.print(f"{label}: {app.name}, run {rep + 1}/{args.repeat}")
                        try:
                            runs.append(measure_app(env, app, rep))
                        except BenchError as exc:
                            console.print(f"[red]{label} {app.name}: {exc}")
                            failed = True
                    if runs:
                        per_app[app.name] = summarise(runs, art)
            results["links"][label] = per_app
            print_table(console, label, per_app)

    for label, per_app in results["links"].items():
        for app_name, cases in per_app.items():
            lazy = cases["lazy cold"]
            console.print(
                f"{label} {app_name}: lazy cold {lazy['speedup_vs_baseline']:.1f}x, with trace "
                f"{cases['lazy+trace']['speedup_vs_baseline']:.1f}x faster than pull+unpack; "
                f"{lazy['fraction_of_image_before_ready']:.1%} / "
                f"{cases['lazy+trace']['fraction_of_image_before_ready']:.1%} of the image "
                "fetched before ready"
            )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything the bench created was removed", file=sys.stderr)
        sys.exit(130)
