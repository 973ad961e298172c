"""Side by side with the peers: containerd + overlayfs, containerd + stargz, Tidal.

The same content (bench_lazy_start's cached Debian bookworm tree with python3, numpy, scipy,
pandas, matplotlib, ~1.3 GB of files, see ``_lazy.py``) published five ways into one CNCF
registry:

- the gzip OCI image (one ``tar | gzip -6`` layer),
- eStargz (``ctr-remote images convert --estargz --oci`` of that image),
- eStargz optimized per application (``ctr-remote images optimize --oci --entrypoint ...``: the
  files the application read go first, behind the prefetch landmark),
- the Tidal image (lz4 ZFile ext4 layer), and the Tidal image with the application's trace layer.

The conversions take minutes; their results are cached as OCI layouts under
/var/cache/tidal-bench/peers/<key> (key: the tree, ctr-remote's version, the applications).

For each link rate the registry runs in a network namespace behind a ``tc tbf`` shaped veth
(``ThrottledLink``, as bench_lazy_start), and every case starts the application from nothing:
page cache dropped, a fresh containerd (Debian's 1.6; its own root, state, socket and config
under the bench's work directory) with a fresh stargz daemon, a fresh Tidal chunk cache:

  overlayfs     ``ctr pull --snapshotter overlayfs`` (the whole image, unpacked) +
                ``ctr run --snapshotter overlayfs``
  stargz        ``ctr-remote images rpull --snapshotter stargz`` + ``ctr run --snapshotter
                stargz`` against the stargz daemon (``/work/shared/peers/stargz-grpc``, built
                with Debian's Go into /var/tmp/containerd-stargz-grpc if missing; upstream's
                default fs settings: prefetch and background fetch on)
  stargz opt    as stargz, on the optimized image of the application
  tidal         ``pull_image`` + ``mount_image`` + the app chrooted in the mount (bench_lazy_start's
                "lazy cold")
  tidal+trace   as tidal, on the image carrying the application's trace ("lazy+trace")
  tidal ctr     Tidal through containerd: ``ctr-remote images rpull --snapshotter tidal`` +
                ``ctr run --snapshotter tidal`` via ``tidal node serve --snapshotter-socket``
                (the snapshots API served by the node service); skipped with the reason when
                this Tidal has no snapshotter

Before the links, each application also runs straight from the local tree, chrooted as the
Tidal cases run it, cold (page cache dropped) and warm: the floor no lazy pull can beat, printed
beside 0.7x stargz optimized's time (``floor`` in the results).

Time runs from the start of the pull to the application's first output (the line ``ready``).
Bytes before ready are counted on the link for all cases alike: what the host side of the veth
received until that moment. Cases run interleaved, ``--repeat`` times (default 3); the table
shows the median. Stored sizes: the layer blobs of each image in the registry, and their ratio
to the gzip layer.

Needs root, containerd, ctr, ctr-remote (Debian's stargz-snapshotter), golang-go and
golang-github-containerd-stargz-snapshotter-dev (to build the daemon), skopeo, docker-registry,
debootstrap (first time). Removes every containerd, daemon, mount, loop device, namespace and
process it starts, also on failure and Ctrl-C. A full run (two rates, two apps, three runs) takes
about half an hour once the images are cached; ``--quick`` is 1 Gbit/s, ``print``, one run.

    .venv/bin/python benchmarks/bench_peers.py [--rates 100,1000] [--apps print,imports]
        [--repeat 3] [--cases ...] [--quick] [--rootfs DIR] [--rebuild]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from _lazy import (
    CACHE,
    MIN_IMAGE_BYTES,
    MIRROR,
    OCI_REPO,
    PACKAGES,
    TAG,
    TIDAL_REPO,
    App,
    Artifacts,
    BenchError,
    Env,
    Row,
    case_tidal,
    drop_caches,
    ensure_artifacts,
    ensure_rootfs,
    host_interface,
    publish,
    run,
    sigterm_as_interrupt,
    start_app,
    stop_app,
    wait_ready,
    work_dir,
)
from tidal.blockdev import mounts
from tidal.blockdev.fdstore import FdStore
from tidal.cli.console import out as stdout_console
from tidal.testing.network import ThrottledLink
from tidal.testing.registry_server import RegistryServer

RESULTS = Path(__file__).parent / "results" / "peers.json"
PEERS_CACHE = CACHE / "peers"
STARGZ_SOURCE = Path("/work/shared/peers/stargz-grpc")
STARGZ_BINARY = Path("/var/tmp/containerd-stargz-grpc")
STARGZ_GOCACHE = "/var/tmp/stargz-gocache"
ESTARGZ_REPO = "bench/app-estargz"
OPTIMIZED_REPO = "bench/app-estargz-opt"
NAMESPACE = "peers-bench"
RUNC_ROOT = Path("/run/containerd/runc")
PORTS = range(15300, 15400)
"""This bench's loopback registry ports (others on the machine use other ranges)."""
ESTARGZ_LEVEL = 6
"""gzip level of the eStargz layers: the gzip image's own (``gzip -6``), so sizes compare codec
for codec; ctr-remote's default 9 is 2-3x slower to convert for ~1 % smaller layers."""
CONVERT_WORKERS = 2
CONVERT_TIMEOUT_S = 3 * 3600.0
SOCKET_WAIT_S = 30.0
TASK_EXIT_WAIT_S = 15.0

APPS = {
    "print": App("print", "line", 'print("ready")'),
    "imports": App("imports", "line", 'import numpy, scipy.linalg, pandas; print("ready")'),
}
CASES = ("overlayfs", "stargz", "stargz opt", "tidal", "tidal+trace", "tidal ctr")
CASE_TITLES = {
    "overlayfs": "containerd + overlayfs (full pull)",
    "stargz": "containerd + stargz",
    "stargz opt": "stargz optimized",
    "tidal": "Tidal",
    "tidal+trace": "Tidal + trace",
    "tidal ctr": "Tidal through containerd",
}
CONTAINERD_CASES = {"overlayfs", "stargz", "stargz opt", "tidal ctr"}


# --- tools --------------------------------------------------------------------------------


def loopback_port() -> int:
    """A free loopback port of this bench's range."""
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise BenchError(f"no free loopback port in {PORTS.start}-{PORTS.stop - 1}")


def ensure_stargz_daemon(console: Console) -> Path:
    """The stargz daemon built from the shared source with Debian's Go (once, ~35 s)."""
    if STARGZ_BINARY.exists():
        return STARGZ_BINARY
    if shutil.which("go") is None:
        raise BenchError("go is not installed: apt-get install golang-go "
                         "golang-github-containerd-stargz-snapshotter-dev")  # fmt: skip
    if not (STARGZ_SOURCE / "main.go").exists():
        raise BenchError(f"the stargz daemon's source is not at {STARGZ_SOURCE}")
    console.print(f"building {STARGZ_BINARY} from {STARGZ_SOURCE} with Debian's Go (once)")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": "/usr/share/gocode",
           "GOCACHE": STARGZ_GOCACHE}  # fmt: skip
    partial = STARGZ_BINARY.with_suffix(".partial")
    run(["go", "build", "-o", str(partial), "."], "building the stargz daemon",
        cwd=STARGZ_SOURCE, env=env, timeout=1800)  # fmt: skip
    partial.rename(STARGZ_BINARY)
    return STARGZ_BINARY


def tidal_cli() -> str:
    """The ``tidal`` command of the environment running this bench."""
    return str(Path(sys.executable).parent / "tidal")


def tidal_snapshotter_missing() -> str | None:
    """Why the "Tidal through containerd" case cannot run here, or None if it can."""
    proc = subprocess.run(
        [tidal_cli(), "snapshotter", "--help"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return "this Tidal has no `tidal snapshotter` (branch h-snap not merged yet)"
    return None


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + SOCKET_WAIT_S
    while time.monotonic() < deadline:
        if path.is_socket():
            return
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}: {tail(log)}")
        time.sleep(0.02)
    raise BenchError(f"{what} made no socket {path} within {SOCKET_WAIT_S:.0f} s: {tail(log)}")


def run_parallel(
    jobs: dict[str, list[str]], workers: int, timeout_s: float, logs: Path
) -> Iterator[tuple[str, float]]:
    """Run the commands ``workers`` at a time (output in ``logs/<name>.log``); yield
    (name, seconds) as each succeeds.

    Processes, not threads: on a failure or Ctrl-C every running one is killed at once.
    """
    waiting = list(jobs.items())
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                name, cmd = waiting.pop(0)
                with (logs / f"{name}.log").open("wb") as log:
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)  # fmt: skip
                running[name] = (proc, time.monotonic())
            time.sleep(0.5)
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    if time.monotonic() - t0 > timeout_s:
                        raise BenchError(f"{name}: `{' '.join(jobs[name][3:6])}` ran over "
                                         f"{timeout_s:.0f} s")  # fmt: skip
                    continue
                del running[name]
                if proc.returncode != 0:
                    raise BenchError(
                        f"{name} failed ({proc.returncode}): {tail(logs / f'{name}.log')}"
                    )
                yield name, time.monotonic() - t0
    finally:
        for proc, _t0 in running.values():
            proc.kill()
            proc.wait()


def tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def terminate(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM (daemons unmount what they mounted), SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    return points


# --- containerd of our own ---------------------------------------------------------------


class Containerd:
    """A containerd of this bench's own (root, state, socket, config in ``home``), with a proxy
    snapshotter plugin for each of ``snapshotters`` (name -> command that serves the snapshots
    API on the socket given as ``{socket}``). ``close()`` removes every task, container, image,
    daemon and mount it made and then ``home``."""

    def __init__(
        self,
        home: Path,
        *,
        plain_http: str,
        snapshotters: dict[str, list[str]] | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.home = home
        self.plain_http = plain_http
        self.snapshotters = snapshotters or {}
        self.timeout_s = timeout_s
        self.socket = home / "containerd.sock"
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._tasks: set[str] = set()

    def _config(self) -> str:
        root, state = self.home / "root", self.home / "state"
        lines = [
            "version = 2",
            f'root = "{root}"',
            f'state = "{state}"',
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",'
            ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs",'
            ' "io.containerd.snapshotter.v1.devmapper"]',
            "[grpc]",
            f'  address = "{self.socket}"',
            "[ttrpc]",
            f'  address = "{self.socket}.ttrpc"',
            "[debug]",
            f'  address = "{self.home / "debug.sock"}"',
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.home / "opt"}"',
            "[proxy_plugins]",
        ]
        for name in self.snapshotters:
            lines += [
                f"  [proxy_plugins.{name}]",
                '    type = "snapshot"',
                f'    address = "{self.snapshotter_socket(name)}"',
            ]
        return "\n".join(lines) + "\n"

    def snapshotter_socket(self, name: str) -> Path:
        return self.home / f"{name}.sock"

    def _spawn(self, what: str, cmd: list[str], sock: Path) -> None:
        log = self.home / f"{what}.log"
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True
            )
        self._procs.append((what, proc))
        wait_for_socket(sock, proc, what, log)

    def open(self) -> Containerd:
        self.home.mkdir(parents=True)
        try:
            for name, argv in self.snapshotters.items():
                sock = self.snapshotter_socket(name)
                self._spawn(name, [a.format(socket=sock, home=self.home) for a in argv], sock)
            config = self.home / "config.toml"
            config.write_text(self._config())
            self._spawn("containerd", ["containerd", "--config", str(config)], self.socket)
            self.ctr("version")
        except BaseException:
            self.close()
            raise
        return self

    def command(self, *args: str, tool: str = "ctr") -> list[str]:
        return [tool, "--address", str(self.socket), "--namespace", NAMESPACE, *args]

    def ctr(self, *args: str, tool: str = "ctr", what: str = "") -> str:
        cmd = self.command(*args, tool=tool)
        return run(cmd, what or f"`{tool} {' '.join(args[:3])}`", timeout=self.timeout_s).stdout

    def start(self, ref: str, snapshotter: str, cid: str, argv: list[str], log: Path
              ) -> subprocess.Popen[bytes]:  # fmt: skip
        """``ctr run --rm`` of ``argv`` in ``ref``; the app's stdout is the process's."""
        self._tasks.add(cid)
        cmd = ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, "run", "--rm",
               "--snapshotter", snapshotter, ref, cid, *argv]  # fmt: skip
        with log.open("ab") as fh:
            return subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fh,
                start_new_session=True,
            )  # fmt: skip

    def stop(self, cid: str, proc: subprocess.Popen[bytes]) -> None:
        """Kill the task; ``ctr run --rm`` then deletes the task and the container."""
        base = ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE]
        subprocess.run([*base, "tasks", "kill", "--signal", "SIGKILL", cid],
                       capture_output=True, check=False)  # fmt: skip
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=TASK_EXIT_WAIT_S)
        stop_app(proc)
        self._remove_task(cid)

    def _remove_task(self, cid: str) -> None:
        base = ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE]
        for args in (["tasks", "kill", "--signal", "SIGKILL", cid], ["tasks", "delete", "--force", cid],
                     ["containers", "delete", cid]):  # fmt: skip
            subprocess.run([*base, *args], capture_output=True, check=False, timeout=60)
        self._tasks.discard(cid)

    def close(self) -> None:
        """Tasks, containers and images go first (the snapshotters unmount their snapshots),
        then the daemons (stargz unmounts its layers at SIGTERM); what is still mounted under
        ``home`` is unmounted lazily; ``home`` is removed."""
        alive = any(what == "containerd" and p.poll() is None for what, p in self._procs)
        if alive:
            for cid in list(self._tasks):
                self._remove_task(cid)
            base = ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE]
            images = subprocess.run([*base, "images", "list", "--quiet"], capture_output=True,
                                    text=True, check=False).stdout.split()  # fmt: skip
            if images:
                subprocess.run([*base, "images", "remove", "--sync", *images],
                               capture_output=True, check=False, timeout=120)  # fmt: skip
        for _what, proc in reversed(self._procs):
            terminate(proc)
        self._procs.clear()
        for point in sorted(mounts_under(self.home), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        if mounts_under(self.home):
            print(f"warning: mounts remain under {self.home}; not removing it", file=sys.stderr)
        else:
            shutil.rmtree(self.home, ignore_errors=True)
        with contextlib.suppress(OSError):  # the runc shim's state dir of our namespace, if empty
            RUNC_ROOT.joinpath(NAMESPACE).rmdir()

    def __enter__(self) -> Containerd:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def stargz_command(binary: Path, plain_http: str) -> list[str]:
    return [str(binary), "--address", "{socket}", "--root", "{home}/stargz-root",
            "--plain-http", plain_http, "--log-level", "warn"]  # fmt: skip


def tidal_snapshotter_command() -> list[str]:
    """``tidal node serve --snapshotter-socket``: the snapshots API served by the node service,
    which mounts the images from its process; its own socket, snapshot root and (cold) chunk
    cache in our home."""
    return ["env", "TIDAL_BLOBS__CACHE_DIR={home}/tidal-chunks", tidal_cli(), "node", "serve",
            "--socket", "{home}/tidal-node.sock", "--snapshotter-socket", "{socket}",
            "--snapshotter-root", "{home}/tidal-snapshotter"]  # fmt: skip


def stop_tidal_fdstore() -> None:
    """The node service leaves its fd store's holder running by design (it keeps mounts alive
    across restarts); a bench case ends it."""
    store = FdStore(mounts.fdstore_path())
    if store.alive():
        os.kill(store.holder_pid(), signal.SIGTERM)


# --- the eStargz images -------------------------------------------------------------------


def estargz_key(art: Artifacts, apps: list[App]) -> str:
    """Changes with the tree (its dpkg status), ctr-remote's version and the apps."""
    h = hashlib.sha256(str(art.rootfs.resolve()).encode())
    status = art.rootfs / "var" / "lib" / "dpkg" / "status"
    h.update(status.read_bytes() if status.exists() else b"")
    h.update(run(["ctr-remote", "--version"], "ctr-remote --version").stdout.encode())
    h.update((art.oci / "index.json").read_bytes())
    return h.hexdigest()[:16]


def optimized_tag(app: App) -> str:
    return hashlib.sha256(app.code.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class StargzImages:
    estargz_bytes: int
    optimized_bytes: dict[str, int]
    convert_s: float | None
    optimize_s: dict[str, float]


def layer_bytes(layout: Path) -> int:
    index = json.loads((layout / "index.json").read_text())
    man_hex = index["manifests"][0]["digest"].split(":")[1]
    man = json.loads((layout / "blobs" / "sha256" / man_hex).read_bytes())
    annotations = [la.get("annotations", {}) for la in man["layers"]]
    if not any("containerd.io/snapshot/stargz/toc.digest" in a for a in annotations):
        raise BenchError(f"{layout} is not eStargz: no layer carries a TOC digest annotation")
    return sum(int(la["size"]) for la in man["layers"])


def ensure_estargz(
    art: Artifacts, apps: list[App], work: Path, address: str, rebuild: bool, console: Console
) -> StargzImages:
    """Convert (or take from the cache) eStargz and per-app optimized eStargz, and push them
    into the registry at ``address`` (loopback, the storage every link's registry serves)."""
    home = PEERS_CACHE / estargz_key(art, apps)
    if rebuild:
        shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    meta_path = home / "meta.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    wanted = {"estargz": ["--estargz"]} | {f"opt-{optimized_tag(a)}": [a.code] for a in apps}
    missing = [name for name in wanted if not (home / name / "index.json").exists()]
    if missing:
        gz_ref = f"{address}/{OCI_REPO}:{TAG}"
        console.print(
            f"converting to eStargz: {', '.join(missing)} (cached in {home}; "
            f"{CONVERT_WORKERS} at a time, ~10 min each on a loaded 2-core machine)"
        )
        with Containerd(work / "ctrd-convert", plain_http=address, timeout_s=CONVERT_TIMEOUT_S
                        ) as ctrd:  # fmt: skip
            ctrd.ctr("images", "pull", "--plain-http", gz_ref, what="ctr pull (the gzip image)")

            level = ["--estargz-compression-level", str(ESTARGZ_LEVEL)]
            jobs: dict[str, list[str]] = {}
            for name in missing:
                ref = f"{address}/{ESTARGZ_REPO}:{name}"
                if name == "estargz":
                    args = ["images", "convert", "--estargz", *level, "--oci", gz_ref, ref]
                else:
                    args = ["images", "optimize", "--oci", *level, "--period", "5",
                            "--entrypoint", json.dumps(["python3", "-c"]),
                            "--args", json.dumps(wanted[name]), gz_ref, ref]  # fmt: skip
                jobs[name] = ctrd.command(*args, tool="ctr-remote")
            for name, seconds in run_parallel(jobs, CONVERT_WORKERS, CONVERT_TIMEOUT_S, ctrd.home):
                ref = f"{address}/{ESTARGZ_REPO}:{name}"
                ctrd.ctr("images", "push", "--plain-http", ref, ref, what=f"ctr push {ref}")
                partial = home / f"{name}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                     f"docker://{ref}", f"oci:{partial}:{TAG}"], f"skopeo copy {ref}")  # fmt: skip
                layer_bytes(partial)  # it is eStargz
                partial.rename(home / name)
                meta[name] = {"seconds": seconds, "compression_level": ESTARGZ_LEVEL}
                meta_path.write_text(json.dumps(meta, indent=2) + "\n")
                console.print(f"{name}: converted in {seconds:.0f} s")
    for name in wanted:
        repo = ESTARGZ_REPO if name == "estargz" else OPTIMIZED_REPO
        tag = TAG if name == "estargz" else name.removeprefix("opt-")
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
             f"oci:{home / name}:{TAG}", f"docker://{address}/{repo}:{tag}"],
            f"skopeo copy (pushing {name})")  # fmt: skip
    return StargzImages(
        estargz_bytes=layer_bytes(home / "estargz"),
        optimized_bytes={a.name: layer_bytes(home / f"opt-{optimized_tag(a)}") for a in apps},
        convert_s=meta.get("estargz", {}).get("seconds"),
        optimize_s={
            a.name: meta[f"opt-{optimized_tag(a)}"]["seconds"]
            for a in apps
            if f"opt-{optimized_tag(a)}" in meta
        },
    )


# --- the cases ----------------------------------------------------------------------------


def case_containerd(env: Env, app: App, case: str, tag: str, stargz: Path | None) -> Row:
    """A fresh containerd; pull (full or remote), run, until the app's first output."""
    if case == "overlayfs":
        ref, snapshotter = f"{env.address}/{OCI_REPO}:{TAG}", "overlayfs"
        pull = ["images", "pull", "--plain-http", "--snapshotter", "overlayfs", ref]
        tool, daemons = "ctr", {}
    elif case in ("stargz", "stargz opt"):
        assert stargz is not None
        snapshotter = "stargz"
        ref = (
            f"{env.address}/{ESTARGZ_REPO}:{TAG}"
            if case == "stargz"
            else f"{env.address}/{OPTIMIZED_REPO}:{optimized_tag(app)}"
        )
        pull = ["images", "rpull", "--plain-http", "--snapshotter", "stargz", ref]
        tool, daemons = "ctr-remote", {"stargz": stargz_command(stargz, env.address)}
    else:  # "tidal ctr": the snap branch's snapshotter
        ref, snapshotter = f"{env.address}/{TIDAL_REPO}:plain", "tidal"
        pull = ["images", "rpull", "--plain-http", "--snapshotter", "tidal", ref]
        tool, daemons = "ctr-remote", {"tidal": tidal_snapshotter_command()}
    home = env.work / f"ctrd-{tag}-{case.replace(' ', '-')}"
    row = Row()
    with Containerd(home, plain_http=env.address, snapshotters=daemons,
                    timeout_s=env.timeout_s) as ctrd:  # fmt: skip
        drop_caches()
        rx0 = env.rx_bytes()
        t0 = time.monotonic()
        ctrd.ctr(*pull, tool=tool, what=f"{tool} {' '.join(pull[:2])} ({case})")
        t1 = time.monotonic()
        log = home / "app.log"
        cid = f"peers-{os.getpid()}-{tag}"
        proc = ctrd.start(ref, snapshotter, cid, ["python3", "-c", app.code], log)
        try:
            t_ready = wait_ready(proc, app, 0, env.timeout_s, log)
            row.wire_bytes_ready = env.rx_bytes() - rx0
        finally:
            ctrd.stop(cid, proc)
        row.time_s, row.fetch_s, row.run_s = t_ready - t0, t1 - t0, t_ready - t1
        row.wire_bytes_total = env.rx_bytes() - rx0
    if case == "tidal ctr":
        stop_tidal_fdstore()
    return row


def measure(
    env: Env,
    app: App,
    rep: int,
    cases: list[str],
    stargz: Path | None,
    skip: dict[str, str],
    failures: list[str],
) -> dict[str, Row]:
    """One run of every case for ``app``; a case that fails is reported and left out."""
    tag = f"{app.name}-{rep}"
    rows: dict[str, Row] = {}
    for case in cases:
        if case in skip:
            continue
        try:
            if case in CONTAINERD_CASES:
                rows[case] = case_containerd(env, app, case, tag, stargz)
                continue
            cache = env.work / f"cache-{tag}-{case}"
            try:
                image_tag = "plain" if case == "tidal" else app.name
                label = f"{tag}-{case.replace('+', '-')}"
                rows[case] = case_tidal(env, app, image_tag, cache, label, via_node=True)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        except BenchError as exc:
            failures.append(f"{case}, {app.name}, run {rep + 1}: {exc}")
    return rows


# --- the report ---------------------------------------------------------------------------


def summarise(runs: list[dict[str, Row]], sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per case: the median run by time, its phases and bytes, and ratios to stargz optimized."""
    out: dict[str, dict[str, Any]] = {}
    for case in CASES:
        rows = sorted((r[case] for r in runs if case in r), key=lambda r: r.time_s)
        if not rows:
            continue
        med = rows[(len(rows) - 1) // 2]
        out[case] = {
            "time_s": med.time_s,
            "time_s_all": [r.time_s for r in rows],
            "pull_s": med.fetch_s,
            "mount_s": med.prepare_s,
            "run_s": med.run_s,
            "wire_bytes_before_ready": med.wire_bytes_ready,
            "wire_bytes_total": med.wire_bytes_total,
            "image_bytes": sizes[case],
            "fraction_of_image_before_ready": med.wire_bytes_ready / sizes[case],
        }
        if med.extra:  # Tidal's: the FUSE disk's reads and their latency, prefetch, fetches
            out[case]["detail"] = med.extra
    anchor = out.get("stargz opt")
    for row in out.values():
        if anchor:
            row["time_vs_stargz_opt"] = row["time_s"] / anchor["time_s"]
            row["bytes_vs_stargz_opt"] = (
                row["wire_bytes_before_ready"] / anchor["wire_bytes_before_ready"]
                if anchor["wire_bytes_before_ready"]
                else 0.0
            )
    return out


def print_tables(console: Console, results: dict[str, Any], skip: dict[str, str]) -> None:
    cases = [c for c in results.get("cases", CASES) if c not in skip]
    table = Table(title="time from the start of the pull to the app's first output (median)")
    table.add_column("app, link")
    for case in cases:
        table.add_column(CASE_TITLES[case], justify="right")
    for label, per_app in results["links"].items():
        for app_name, rows in per_app.items():
            cells = []
            for case in cases:
                r = rows.get(case)
                cells.append("failed" if r is None else f"{r['time_s']:.2f} s")
            table.add_row(f"{app_name}, {label}", *cells)
    console.print(table)

    detail = Table(title="where the time goes, and bytes on the link before ready (median run)")
    for col in ("app, link", "case", "total s", "pull s", "mount s", "run s", "MB before ready",
                "% of image", "time vs stargz opt", "bytes vs stargz opt"):  # fmt: skip
        detail.add_column(col, justify="left" if col in ("app, link", "case") else "right")
    for label, per_app in results["links"].items():
        for app_name, rows in per_app.items():
            for i, (case, r) in enumerate(rows.items()):
                detail.add_row(
                    f"{app_name}, {label}" if i == 0 else "",
                    CASE_TITLES[case],
                    f"{r['time_s']:.2f}",
                    f"{r['pull_s']:.2f}",
                    f"{r['mount_s']:.2f}" if r["mount_s"] else "-",
                    f"{r['run_s']:.2f}",
                    f"{r['wire_bytes_before_ready'] / 1e6:.1f}",
                    f"{r['fraction_of_image_before_ready']:.1%}",
                    f"{r['time_vs_stargz_opt']:.2f}x" if "time_vs_stargz_opt" in r else "-",
                    f"{r['bytes_vs_stargz_opt']:.2f}x" if "bytes_vs_stargz_opt" in r else "-",
                    end_section=i == len(rows) - 1,
                )
    console.print(detail)

    floor = Table(title="the same app from the local tree (no pull): what no lazy pull can beat")
    for col in ("app", "local disk, cold", "page cache warm (the floor)", "0.7x stargz opt"):
        floor.add_column(col, justify="left" if col == "app" else "right")
    for app_name, f in results.get("floor", {}).items():
        goals = [
            f"{0.7 * rows['stargz opt']['time_s']:.2f} s ({label})"
            for label, per_app in results["links"].items()
            if "stargz opt" in (rows := per_app.get(app_name, {}))
        ]
        floor.add_row(app_name, f"{f['local_cold_s']:.2f} s", f"{f['warm_s']:.2f} s",
                      ", ".join(goals) or "-")  # fmt: skip
    console.print(floor)

    sizes = Table(title="stored image (layer blobs in the registry)")
    for col in ("image", "MB", "vs gzip"):
        sizes.add_column(col, justify="left" if col == "image" else "right")
    gzip_bytes = results["stored"]["gzip"]
    for name, nbytes in results["stored"].items():
        sizes.add_row(name, f"{nbytes / 1e6:.0f}", f"{nbytes / gzip_bytes:.2f}x")
    console.print(sizes)
    for case, why in skip.items():
        console.print(f"[yellow]{CASE_TITLES[case]}: skipped: {why}")


# --- main ---------------------------------------------------------------------------------


def check_tools() -> str | None:
    if os.geteuid() != 0:
        return "bench_peers needs root (netns, tc, FUSE, loop devices, containerd)"
    for tool in ("containerd", "ctr", "ctr-remote", "skopeo", "docker-registry", "unshare",
                 "chroot", "tc"):  # fmt: skip
        if shutil.which(tool) is None:
            return f"bench_peers needs {tool}: apt-get install containerd stargz-snapshotter; make deps"
    return None


FLOOR_RUNS = 3


def measure_floor(rootfs: Path, apps: list[App], work: Path, timeout_s: float) -> dict[str, Any]:
    """Each app straight from the local tree, chrooted as the Tidal cases run it: with the page
    cache dropped (a local disk, cold) and with every file in memory (the floor: no lazy pull,
    however fast, gets an app ready sooner). Median of ``FLOOR_RUNS``; the warm runs follow one
    unmeasured run that fills the cache."""
    out: dict[str, Any] = {}
    log = work / "floor.log"

    def once(app: App) -> float:
        t0 = time.monotonic()
        proc = start_app(rootfs, app, loopback_port(), log)
        try:
            return wait_ready(proc, app, 0, timeout_s, log) - t0
        finally:
            stop_app(proc)

    for app in apps:
        cold = []
        for _ in range(FLOOR_RUNS):
            drop_caches()
            cold.append(once(app))
        once(app)
        warm = [once(app) for _ in range(FLOOR_RUNS)]
        out[app.name] = {
            "local_cold_s": sorted(cold)[len(cold) // 2],
            "warm_s": sorted(warm)[len(warm) // 2],
            "local_cold_s_all": cold,
            "warm_s_all": warm,
        }
    return out


@contextlib.contextmanager
def shaped_registry(rate: float, work: Path) -> Iterator[tuple[ThrottledLink, RegistryServer]]:
    """The registry over ``work/registry`` in a namespace behind a veth shaped to ``rate``."""
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(ThrottledLink(rate, name=f"peers{os.getpid() % 10000}"))
        server = stack.enter_context(
            RegistryServer(
                storage_dir=work / "registry", host=link.ns_address, wrap=link.exec_prefix
            )
        )
        yield link, server


def main() -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog=f"Conversions are cached in {PEERS_CACHE}/, the tree and Tidal images as "
        "bench_lazy_start says; --rebuild starts over.",
    )
    ap.add_argument("--rates", default="100,1000", help="link rates in Mbit/s (default 100,1000)")
    ap.add_argument("--apps", default=",".join(APPS), help=f"of {','.join(APPS)} (all)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"of {','.join(CASES)} (all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every case; the median counts")
    ap.add_argument("--quick", action="store_true", help="1 Gbit/s, the print app, one run")
    ap.add_argument("--rootfs", type=Path, help="use this root tree instead of the cached one")
    ap.add_argument("--mirror", default=MIRROR, help="Debian mirror for debootstrap")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached images")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="per step")
    ap.add_argument("--output", type=Path, default=RESULTS, help=f"results JSON ({RESULTS})")
    args = ap.parse_args()
    if (problem := check_tools()) is not None:
        print(problem, file=sys.stderr)
        return 1
    if args.quick:
        args.rates, args.apps, args.repeat = "1000", "print", 1
    try:
        rates = [float(r) for r in args.rates.split(",") if r]
    except ValueError:
        print(f"--rates {args.rates!r}: give Mbit/s numbers separated by commas", file=sys.stderr)
        return 2
    unknown = [a for a in args.apps.split(",") if a and a not in APPS]
    unknown += [c for c in args.cases.split(",") if c and c not in CASES]
    if unknown:
        print(f"unknown app or case {unknown[0]!r}: apps {', '.join(APPS)}; cases "
              f"{', '.join(CASES)}", file=sys.stderr)  # fmt: skip
        return 2
    apps = [APPS[a] for a in args.apps.split(",") if a]
    cases = [c for c in args.cases.split(",") if c]
    console = stdout_console
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)

    skip: dict[str, str] = {}
    if "tidal ctr" in cases and (why := tidal_snapshotter_missing()) is not None:
        skip["tidal ctr"] = why
    stargz = ensure_stargz_daemon(console) if {"stargz", "stargz opt"} & set(cases) else None
    rootfs = ensure_rootfs(args.rootfs, args.mirror, console)
    results: dict[str, Any] = {
        "benchmark": "peers",
        "argv": sys.argv[1:],
        "repeat": args.repeat,
        "links": {},
        "skipped": skip,
        "cases": [c for c in CASES if c in cases],
    }
    failures: list[str] = []
    with work_dir("peers-bench-") as work:
        os.environ["TIDAL_DATA_ROOT"] = str(work / "data")
        art = ensure_artifacts(rootfs, args.rebuild, console)
        if art.rootfs_bytes < MIN_IMAGE_BYTES:
            console.print(f"[yellow]warning: {rootfs} holds only {art.rootfs_bytes / 1e6:.0f} MB")
        esgz: list[StargzImages] = []
        results["traces"] = publish(
            art, work, apps, args.timeout_s, console, port=loopback_port(),
            also=lambda address: esgz.append(
                ensure_estargz(art, apps, work, address, args.rebuild, console)
            ),
        )  # fmt: skip
        sg = esgz[0]
        results["image"] = {
            "rootfs": str(rootfs),
            "packages": list(PACKAGES) if args.rootfs is None else None,
            "rootfs_bytes": art.rootfs_bytes,
            "convert_s": sg.convert_s,
            "optimize_s": sg.optimize_s,
        }
        stored = {"gzip": art.oci_bytes, "eStargz": sg.estargz_bytes}
        stored |= {f"eStargz optimized ({a})": n for a, n in sg.optimized_bytes.items()}
        stored["Tidal"] = art.tidal_bytes  # in the default codec (zstd -3)
        results["stored"] = stored
        results["stored_vs_gzip"] = {k: v / art.oci_bytes for k, v in stored.items()}
        results["apps"] = {a.name: f"python3 -c '{a.code}'" for a in apps}
        console.print(
            f"image: {rootfs}, {art.rootfs_bytes / 1e6:.0f} MB of files; gzip "
            f"{art.oci_bytes / 1e6:.0f} MB, eStargz {sg.estargz_bytes / 1e6:.0f} MB, "
            f"Tidal {art.tidal_bytes / 1e6:.0f} MB"
        )
        results["floor"] = measure_floor(rootfs, apps, work, args.timeout_s)
        for rate in rates:
            label = f"{rate:g} Mbit/s"
            with shaped_registry(rate, work) as (link, server):
                os.environ["TIDAL_BLOBS__INSECURE_REGISTRIES"] = server.address
                env = Env(work, server.address, host_interface(link), art, args.timeout_s)
                runs: dict[str, list[dict[str, Row]]] = {a.name: [] for a in apps}
                for rep in range(args.repeat):  # interleaved: every app and case per round
                    for app in apps:
                        console.print(f"{label}: {app.name}, run {rep + 1}/{args.repeat}")
                        errors: list[str] = []
                        runs[app.name].append(measure(env, app, rep, cases, stargz, skip, errors))
                        for line in errors:
                            console.print(f"[red]{label}: {line}")
                        failures += [f"{label}: {line}" for line in errors]
            per_app: dict[str, dict[str, Any]] = {}
            for app in apps:
                if runs[app.name]:
                    sizes = {
                        "overlayfs": art.oci_bytes,
                        "stargz": sg.estargz_bytes,
                        "stargz opt": sg.optimized_bytes[app.name],
                        "tidal": art.tidal_bytes,
                        "tidal+trace": art.tidal_bytes,
                        "tidal ctr": art.tidal_bytes,
                    }
                    per_app[app.name] = summarise(runs[app.name], sizes)
            results["links"][label] = per_app
    print_tables(console, results, skip)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything the bench created was removed", file=sys.stderr)
        sys.exit(130)
