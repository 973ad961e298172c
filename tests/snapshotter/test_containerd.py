"""End to end with the real containerd 1.6: Tidal's snapshotter as its proxy plugin.

A containerd of the test's own (config, root, state and sockets under a tmp dir, the CRI and
unneeded snapshotters disabled, garbage collection right after each deletion) talks to
``tidal snapshotter serve`` over a unix socket; a CNCF registry holds a Tidal image (``tidal
image build`` + ``push``) and an ordinary two-layer OCI image. ``ctr-remote images rpull``
pulls the Tidal image without its layer (containerd's content store lacks it; the registry
served only the layer's index and footer bytes), ``ctr run`` starts it from the lazily mounted
image; ``ctr pull`` + ``ctr run`` of the ordinary image go through the same snapshotter; and
removing containers and images leaves no snapshot, directory, mount or loop device behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tidal.testing.oci_builder import write_oci_layout
from tidal.testing.registry_server import RegistryServer

pytestmark = [
    pytest.mark.root,
    pytest.mark.fuse,
    pytest.mark.loop,
    pytest.mark.registry,
    pytest.mark.runtime,
    pytest.mark.slow,
]

PORTS = range(15201, 15300)  # snap's share of the machine's registry ports
NAMESPACE = "snap-test"
GREETING = "hello from a lazy tidal image"
SECOND = "second layer says hi"
_ACCESS = re.compile(r'"GET (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)')


def _tools() -> None:
    for tool in ("containerd", "ctr", "ctr-remote", "skopeo", "busybox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make deps installs it)")


def _tidal_cmd() -> list[str]:
    return [str(Path(sys.executable).with_name("tidal"))]


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(argv)} failed: {proc.stderr.strip()[-800:]}"
    return proc  # type: ignore[no-any-return]


def _wait_for(path: Path, what: str, log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not create {path}: {log.read_text()[-1500:]}")
        time.sleep(0.05)


def _answers(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def _free_port() -> int:
    import socket

    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {PORTS}")


def _served_bytes(registry: RegistryServer, digest: str) -> list[tuple[int, int]]:
    """(status, bytes) of each GET of blob ``digest``, from the registry's access log."""
    out = []
    for line in registry.log_path.read_text(errors="replace").splitlines():
        m = _ACCESS.search(line)
        if m and m["path"].endswith(f"/blobs/{digest}"):
            out.append((int(m["status"]), 0 if m["bytes"] == "-" else int(m["bytes"])))
    return out


def _rootfs(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    for name in ("sh", "cat", "echo", "ls"):
        (root / "bin" / name).symlink_to("busybox")
    (root / "etc" / "greeting").write_text(GREETING + "\n")


def _tar(root: Path | None, files: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        if root is not None:
            tf.add(root, arcname=".")
        for name, data in (files or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Node:
    """The test's containerd + Tidal snapshotter, and what they were started with."""

    work: Path
    address: Path
    snap_root: Path
    snap_log: Path
    data_root: Path
    snap_proc: subprocess.Popen[bytes] | None = None
    in_node_service: bool = False
    """Serve the snapshots API from ``tidal node serve --snapshotter-socket`` (the node
    service's own process, which then mounts the images) instead of ``tidal snapshotter
    serve``."""

    def start_snapshotter(self) -> None:
        """The snapshotter on the node's socket and root, logging to snap_log."""
        sock, root = str(self.work / "tidal.sock"), str(self.snap_root)
        argv = (
            ["node", "serve", "--snapshotter-socket", sock, "--snapshotter-root", root]
            if self.in_node_service
            else ["snapshotter", "serve", "--socket", sock, "--root", root, "--log-level", "DEBUG"]
        )
        with open(self.snap_log, "ab") as fh:
            self.snap_proc = subprocess.Popen(
                [*_tidal_cmd(), *argv],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TIDAL_DATA_ROOT": str(self.data_root)},
            )
        deadline = time.monotonic() + 20
        while not _answers(self.work / "tidal.sock"):
            if time.monotonic() > deadline or self.snap_proc.poll() is not None:
                raise AssertionError(
                    f"snapshotter did not start: {self.snap_log.read_text()[-1500:]}"
                )
            time.sleep(0.05)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", "--address", str(self.address), "--namespace", NAMESPACE, *args]
        if check:
            return _run(argv)
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    def ctr_remote(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(["ctr-remote", "--address", str(self.address), "--namespace", NAMESPACE, *args])

    def snapshots(self) -> list[str]:
        out = self.ctr("snapshot", "--snapshotter", "tidal", "ls").stdout.splitlines()[1:]
        return [line.split()[0] for line in out if line.strip()]

    def mounts(self) -> list[str]:
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mp = line.split()[4]
            if mp.startswith((str(self.work), str(self.data_root))):
                found.append(mp)
        return found

    def loops(self) -> list[str]:
        out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
        return [ln for ln in out.stdout.splitlines() if str(self.data_root) in ln]

    def settle(self, timeout_s: float = 15.0) -> None:
        """Wait until containerd's garbage collection has removed what is unreferenced."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.mounts() and not self.loops():
                return
            time.sleep(0.2)


def _wait_for_containerd_to_redial(node: Node) -> None:
    """containerd redials a restarted proxy plugin with backoff capped at 3 s (services/server)."""
    deadline = time.monotonic() + 15
    while (ls := node.ctr("snapshot", "--snapshotter", "tidal", "ls", check=False)).returncode:
        assert time.monotonic() < deadline, f"containerd did not reconnect: {ls.stderr}"
        time.sleep(0.3)


def _remove_container(node: Node, cid: str) -> None:
    node.ctr("task", "kill", "--signal", "SIGKILL", cid, check=False)
    deadline = time.monotonic() + 15
    while node.ctr("task", "delete", cid, check=False).returncode != 0:
        assert time.monotonic() < deadline, "the task did not exit"
        time.sleep(0.2)
    node.ctr("container", "rm", cid)


@pytest.fixture(scope="module")
def registry() -> Iterator[RegistryServer]:
    with RegistryServer(port=_free_port(), access_log=True) as server:
        yield server


@pytest.fixture(scope="module")
def images(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A Tidal image and an ordinary two-layer OCI image of the same busybox tree, pushed."""
    _tools()
    work = tmp_path_factory.mktemp("images")
    _rootfs(work / "rootfs")
    tidal_ref = f"{registry.address}/tidal/busybox:v1"
    _run(
        [
            *_tidal_cmd(),
            "image",
            "build",
            str(work / "rootfs"),
            "-o",
            str(work / "img"),
            "--size",
            "32M",
        ]
    )
    _run([*_tidal_cmd(), "image", "push", str(work / "img"), tidal_ref])
    doc = json.loads((work / "img" / "manifest.json").read_text())
    plain_ref = f"{registry.address}/plain/busybox:v1"
    write_oci_layout(
        work / "layout",
        [_tar(work / "rootfs"), _tar(None, {"etc/greeting": (SECOND + "\n").encode()})],
        config={"Cmd": ["/bin/cat", "/etc/greeting"], "Env": ["PATH=/bin"]},
    )
    _run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{work / 'layout'}:latest",
            f"docker://{plain_ref}",
        ]
    )
    return {
        "tidal": tidal_ref,
        "plain": plain_ref,
        "tidal_layers": ",".join(layer["digest"] for layer in doc["layers"]),
    }


CONFIG = """version = 2
root = "{work}/root"
state = "{work}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]
[grpc]
  address = "{work}/containerd.sock"
[ttrpc]
  address = "{work}/containerd.sock.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 1
  schedule_delay = "0ms"
[proxy_plugins.tidal]
  type = "snapshot"
  address = "{work}/tidal.sock"
"""


def _stop(proc: subprocess.Popen[bytes], name: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError(f"{name} did not stop on SIGTERM") from None


@pytest.fixture(scope="module")
def node(images: dict[str, str]) -> Iterator[Node]:
    # unix socket paths are limited to 108 bytes: a short directory of our own under /tmp
    work = Path(tempfile.mkdtemp(prefix="snap-ctd-", dir="/tmp"))
    data_root = Path(os.environ["TIDAL_DATA_ROOT"])
    (work / "config.toml").write_text(CONFIG.format(work=work))
    n = Node(work, work / "containerd.sock", work / "snap-root", work / "tidal.log", data_root)
    ctd_log = work / "containerd.log"
    try:
        n.start_snapshotter()
        with open(ctd_log, "wb") as fh:
            ctd = subprocess.Popen(
                ["containerd", "--config", str(work / "config.toml")],
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_for(work / "containerd.sock", "containerd", ctd_log)
            yield n
            for ref in (images["tidal"], images["plain"]):
                n.ctr("images", "rm", "--sync", ref, check=False)
            n.settle()
        finally:
            _stop(ctd, "containerd")
    finally:
        if n.snap_proc is not None:
            _stop(n.snap_proc, "tidal snapshotter")
        from tidal.blockdev.fdstore import FdStore

        store = FdStore(data_root / "fdstore.sock")  # the node service's, if it ran
        if store.alive():
            held = store.names()
            os.kill(store.holder_pid(), signal.SIGTERM)
            assert held == [], f"the fd store still held {held}"
    assert n.mounts() == [] and n.loops() == []
    shutil.rmtree(work, ignore_errors=True)


def test_rpull_of_a_tidal_image_fetches_no_layer_and_ctr_run_reads_it_lazily(
    node: Node, images: dict[str, str], registry: RegistryServer
) -> None:
    layers = images["tidal_layers"].split(",")
    node.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "tidal", images["tidal"])
    content = node.ctr("content", "ls", "-q").stdout.split()
    assert not set(layers) & set(content), "containerd downloaded a Tidal layer blob"
    for digest in layers:
        served = _served_bytes(registry, digest)
        assert all(status == 206 for status, _ in served), served  # ranges only, never the blob
    remote = node.snapshots()
    assert len(remote) == len(layers)  # one committed snapshot per layer, none applied
    assert "served lazily by Tidal" in node.snap_log.read_text()

    cid = f"snap-{secrets.token_hex(3)}"
    before = sum(b for d in layers for _, b in _served_bytes(registry, d))
    out = node.ctr(
        "run", "--rm", "--snapshotter", "tidal", images["tidal"], cid, "/bin/cat", "/etc/greeting"
    )
    assert out.stdout.strip() == GREETING
    after = sum(b for d in layers for _, b in _served_bytes(registry, d))
    assert after > before  # the run read the image from the registry, lazily
    node.settle()
    assert node.mounts() == [] and node.loops() == []  # the container's mount went with it
    assert node.snapshots() == remote


def test_an_ordinary_oci_image_is_applied_through_the_same_snapshotter(
    node: Node, images: dict[str, str]
) -> None:
    node.ctr("images", "pull", "--plain-http", "--snapshotter", "tidal", images["plain"])
    snaps = node.snapshots()
    assert len(snaps) >= 2  # both layers applied into committed snapshots
    cid = f"snap-{secrets.token_hex(3)}"
    out = node.ctr("run", "--rm", "--snapshotter", "tidal", images["plain"], cid)
    assert out.stdout.strip() == SECOND  # the upper layer over the lower, as overlayfs stacks them
    out = node.ctr(
        "run", "--rm", "--snapshotter", "tidal", images["plain"], cid + "b", "/bin/ls", "/bin"
    )
    assert "busybox" in out.stdout.split()
    node.settle()
    assert node.mounts() == []


def test_snapshot_ls_and_rm_and_image_removal_leave_nothing_behind(
    node: Node, images: dict[str, str]
) -> None:
    node.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "tidal", images["tidal"])
    key = f"snap-view-{secrets.token_hex(3)}"
    parent = _chain_id(images["tidal_layers"].split(","))  # the Tidal image's top snapshot
    assert parent in node.snapshots()
    node.ctr("snapshot", "--snapshotter", "tidal", "view", key, parent)
    assert key in node.snapshots()
    assert any(m.startswith(str(node.snap_root)) for m in node.mounts())  # the image, mounted
    busy = node.ctr("snapshot", "--snapshotter", "tidal", "rm", parent, check=False)
    assert busy.returncode != 0  # a parent with a child stays
    node.ctr("snapshot", "--snapshotter", "tidal", "rm", key)
    node.settle()
    assert key not in node.snapshots() and node.mounts() == [] and node.loops() == []
    for ref in (images["tidal"], images["plain"]):
        node.ctr("images", "rm", "--sync", ref, check=False)
    # containerd forgets the snapshots at once; its garbage collector then removes them from
    # the snapshotter one by one
    deadline = time.monotonic() + 30
    dirs = node.snap_root / "snapshots"
    while (node.snapshots() or list(dirs.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = node.ctr("snapshot", "--snapshotter", "tidal", "ls").stdout
    leases = node.ctr("leases", "ls").stdout
    images_left = node.ctr("images", "ls", "-q").stdout
    errors = [ln for ln in node.snap_log.read_text().splitlines() if " ERROR " in ln]
    assert node.snapshots() == [], f"{left}\nleases: {leases}\nimages: {images_left}\n{errors}"
    assert list((node.snap_root / "snapshots").iterdir()) == []


def _chain_id(diff_ids: list[str]) -> str:
    """containerd's identity.ChainID: sha256 of "<parent chain> <diff id>", layer by layer."""
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


def test_a_killed_snapshotter_restarts_under_a_running_container(
    node: Node, images: dict[str, str]
) -> None:
    node.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "tidal", images["tidal"])
    cid = f"snap-{secrets.token_hex(3)}"
    node.ctr(
        "run", "-d", "--snapshotter", "tidal", images["tidal"], cid, "/bin/busybox", "sleep", "600"
    )
    try:
        assert node.snap_proc is not None
        node.snap_proc.kill()  # SIGKILL: no clean-up of any kind
        node.snap_proc.wait(10)
        node.start_snapshotter()
        out = node.ctr("task", "exec", "--exec-id", "e1", cid, "/bin/cat", "/etc/greeting")
        assert out.stdout.strip() == GREETING  # the image mount outlived the server
        # containerd redials a proxy plugin with backoff capped at 3 s (services/server)
        deadline = time.monotonic() + 10
        while (ls := node.ctr("snapshot", "--snapshotter", "tidal", "ls", check=False)).returncode:
            assert time.monotonic() < deadline, f"containerd did not reconnect: {ls.stderr}"
            time.sleep(0.3)
        assert len(node.snapshots()) >= 2  # the image's layer and the container's snapshot
        # a second container of the image shares the first one's mount of it
        image_mounts = [m for m in node.mounts() if m.startswith(f"{node.snap_root}/images/")]
        assert len(image_mounts) == 1
        out = node.ctr(
            "run",
            "--rm",
            "--snapshotter",
            "tidal",
            images["tidal"],
            cid + "b",
            "/bin/cat",
            "/etc/greeting",
        )
        assert out.stdout.strip() == GREETING
        assert [
            m for m in node.mounts() if m.startswith(f"{node.snap_root}/images/")
        ] == image_mounts
    finally:
        _remove_container(node, cid)
    node.settle()
    assert node.mounts() == [] and node.loops() == []


def test_in_the_node_service_a_sigkill_under_a_running_container_is_a_pause(
    node: Node, images: dict[str, str]
) -> None:
    """The same containerd, its snapshotter now served by the node service: the container's
    image is mounted by the service (no FUSE server process of its own), the service is
    SIGKILLed while the container reads, and after the restart the reads go on."""
    assert node.snap_proc is not None
    _stop(node.snap_proc, "tidal snapshotter")
    node.in_node_service = True
    node.start_snapshotter()
    _wait_for_containerd_to_redial(node)
    node.ctr_remote("images", "rpull", "--plain-http", "--snapshotter", "tidal", images["tidal"])
    cid = f"snap-{secrets.token_hex(3)}"
    node.ctr(
        "run", "-d", "--snapshotter", "tidal", images["tidal"], cid, "/bin/busybox", "sleep", "600"
    )
    try:
        from tidal.blockdev import mounts

        served = [m for m in mounts.list_mounts() if m.fd_name is not None]
        assert served and {m.server_pid for m in served} == {node.snap_proc.pid}
        node.snap_proc.kill()
        node.snap_proc.wait(10)
        assert all(mounts.suspended(m) for m in served)
        node.start_snapshotter()
        _wait_for_containerd_to_redial(node)
        out = node.ctr("task", "exec", "--exec-id", "e2", cid, "/bin/cat", "/etc/greeting")
        assert out.stdout.strip() == GREETING
        assert {m.server_pid for m in mounts.list_mounts() if m.fd_name} == {node.snap_proc.pid}
    finally:
        _remove_container(node, cid)
    node.settle()
    assert node.mounts() == [] and node.loops() == []
