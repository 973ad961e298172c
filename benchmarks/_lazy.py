"""What the lazy-start benchmarks share: the Debian/python tree, its images, apps, link, cases.

``bench_lazy_start.py`` (full pull vs Tidal lazy start) and ``bench_peers.py`` (the same beside
containerd, stargz-snapshotter and Tidal through containerd) build the same cached tree and
images, run the same applications behind the same shaped registry link and count bytes the same
way (on the host side of the veth), so their figures compare. See bench_lazy_start's docstring
for what each piece does.
"""

from __future__ import annotations

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

import tidal.image
from tidal.blobs.distribution import pull_image, push_image
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryClient
from tidal.blobs.settings import BlobSettings
from tidal.blockdev import builder, mounts
from tidal.blockdev.builder import build_from_dir
from tidal.blockdev.record import record_trace
from tidal.config import data_root
from tidal.image.manifest import Image, attach_trace
from tidal.testing.network import ThrottledLink
from tidal.testing.node import NodeProcess
from tidal.testing.registry_server import RegistryServer, free_port

CACHE = Path("/var/cache/tidal-bench")
ROOTFS = CACHE / "rootfs-bookworm-lazy"
ARTIFACTS = CACHE / "lazy-start"
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
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what} did not finish within {exc.timeout:.0f} s") from exc
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
        res = build_from_dir(rootfs, partial / "tidal", config={"Env": [f"PATH={PATH_ENV}"]})
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


def run_to_ready(
    env: Env,
    app: App,
    root: Path,
    port: int,
    log: Path,
    row: Row,
    rx0: int,
    started: tuple[float, float],
) -> None:
    """Run ``app`` in ``root`` until its first useful output and fill ``row``'s times (from
    ``started``: the pull's start and end) and the bytes on the link until ready."""
    t0, t1 = started
    t2 = time.monotonic()
    proc = start_app(root, app, port, log)
    try:
        t_ready = wait_ready(proc, app, port, env.timeout_s, log)
        row.wire_bytes_ready = env.rx_bytes() - rx0
    finally:
        stop_app(proc)
    row.time_s, row.fetch_s, row.prepare_s = t_ready - t0, t1 - t0, t2 - t1
    row.run_s = t_ready - t2


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
        run_to_ready(env, app, root, port, work / "app.log", row, rx0, (t0, t1))
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


def case_tidal(
    env: Env, app: App, image_tag: str, cache_dir: Path, label: str, *, via_node: bool = False
) -> Row:
    """Pull (metadata), mount lazily over ``cache_dir``, run until ready, unmount.

    ``via_node``: as a node runs it, through a long-lived ``tidal node serve`` (started before
    the clock, with ``cache_dir`` as its chunk cache): the pull and the mount are requests on
    its socket and the image's FUSE disk is served from its process. Otherwise in this
    process, with a FUSE server process of the mount's own.
    """
    os.environ["TIDAL_BLOBS__CACHE_DIR"] = str(cache_dir)
    work = env.work / f"tidal-{label}"
    work.mkdir()
    target = work / "mnt"
    row = Row()
    port = free_port()
    node = NodeProcess(data_root()).start() if via_node else None
    drop_caches()
    rx0 = env.rx_bytes()
    t0 = time.monotonic()
    mounted = False
    try:
        ref = ImageReference.parse(f"{env.address}/{TIDAL_REPO}:{image_tag}")
        if node is not None:
            with node.client() as c:
                c.pull(str(ref))
                t1 = time.monotonic()
                c.mount(str(ref), target, pull="never")
        else:
            with env.client() as client:
                pull_image(ref, work / "pulled", client)
            t1 = time.monotonic()
            mounts.mount_image(work / "pulled", target)
        mounted = True
        run_to_ready(env, app, target, port, work / "app.log", row, rx0, (t0, t1))
        stats = fresh_stats(target)
        lazy = stats.get("lazy") or {}
        row.payload_bytes = int(lazy.get("total", {}).get("bytes_fetched", 0))
        deadline = time.monotonic() + PREFETCH_WAIT_S
        while (lazy.get("prefetch") or {}).get("running") and time.monotonic() < deadline:
            stats = fresh_stats(target)
            lazy = stats.get("lazy") or {}
        row.wire_bytes_total = env.rx_bytes() - rx0
        row.extra = {
            "via": "node service" if node is not None else "server process per mount",
            "total_after_prefetch": lazy.get("total", {}),
            "prefetch": lazy.get("prefetch", {}),
            "fuse": stats.get("fuse", {}),
            "warm": stats.get("warm") or {},
        }
        return row
    finally:
        if node is not None:
            node.close()  # unmounts what it served, stops the service and its fd store
        elif mounted:
            mounts.unmount(target, force=True)
        if not leftover_mounts(work):  # never walk into a mounted image
            shutil.rmtree(work, ignore_errors=True)


# --- setup, cleanup and the report ---------------------------------------------------------


def publish(
    art: Artifacts,
    work: Path,
    apps: list[App],
    timeout_s: float,
    console: Console,
    *,
    also: Callable[[str], None] | None = None,
    port: int | None = None,
) -> dict[str, Any]:
    """Record the traces and push every image into the registry storage ``work/registry``.

    ``also(address)`` pushes more images into the same storage while its registry runs.
    """
    traces: dict[str, Any] = {}
    with RegistryServer(storage_dir=work / "registry", port=port) as server:
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
        if also is not None:
            also(server.address)
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
def work_dir(prefix: str = "tidal-bench-lazy-") -> Iterator[Path]:
    """A scratch directory on disk (images unpack to GBs); nothing mounted survives it."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
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


def sigterm_as_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
