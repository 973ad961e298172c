"""P2P across hosts: network namespaces on a bridge, the CNCF registry, a root, lazy mounts.

Three "hosts" (network namespaces with their own data root and chunk cache) pull the same image
(metadata only) and mount it lazily with ``[blobs] p2p_roots`` set. The first to read a file
fetches it from the registry; the others get every chunk from a peer (the registry sees nothing
more); when the first host's mount goes away, a host whose parent it was is re-parented and
still reads correct bytes. Commands run with ``nsenter --net`` so the mounts stay in this
mount namespace and the test reads them directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockdev.conftest import build_sample_image
from tidal.blobs.distribution import push_image
from tidal.blobs.p2p import RootServer
from tidal.blobs.reference import ImageReference
from tidal.blobs.registry_client import RegistryClient
from tidal.blobs.settings import BlobSettings
from tidal.service.auth import ClusterToken
from tidal.testing.network import BridgeNetwork
from tidal.testing.registry_server import RegistryServer

pytestmark = [
    pytest.mark.root,
    pytest.mark.fuse,
    pytest.mark.loop,
    pytest.mark.registry,
    pytest.mark.netns,
]

FILES = {f"/big/{name}.bin": os.urandom(2 << 20) for name in ("a", "b")}


@dataclass
class Host:
    name: str
    netns: str
    address: str
    root: Path
    env: dict[str, str]

    def tidal(self, *args: str) -> str:
        proc = subprocess.run(
            [*BridgeNetwork.net_prefix(self.netns), sys.executable, "-m", "tidal.cli.main", *args],
            capture_output=True, text=True, timeout=120, env=self.env, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"{self.name}: tidal {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def p2p_stats(self, target: Path) -> dict:
        """Fresh figures (the server rewrites them every second)."""
        time.sleep(1.3)
        return json.loads(self.tidal("image", "stats", "--json", str(target)))["lazy"]["p2p"]


@pytest.fixture
def network(tmp_path: Path) -> Iterator[tuple[BridgeNetwork, list[Host]]]:
    if shutil.which("nsenter") is None:
        pytest.skip("needs nsenter (util-linux)")
    with BridgeNetwork(uuid.uuid4().hex[:5]) as net:
        hosts = []
        for i in range(1, 4):
            ns, address = net.add_host()
            hosts.append(Host(f"host{i}", ns, address, tmp_path / f"host{i}", {}))
        yield net, hosts


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return build_sample_image(tmp_path / "src", FILES)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.token"
    path.write_text(ClusterToken.generate() + "\n")
    path.chmod(0o600)
    return path


def test_hosts_share_chunks_through_the_layer_tree(
    network: tuple[BridgeNetwork, list[Host]], image: Path, token_file: Path
) -> None:
    net, hosts = network
    root = RootServer(net.gateway, 0, token=ClusterToken.from_file(token_file)).start()
    registry = RegistryServer(host=net.gateway).start()
    targets: dict[str, Path] = {}
    try:
        ref = f"{registry.address}/p2p/app:v1"
        insecure = BlobSettings(insecure_registries=(registry.address,))
        with RegistryClient(registry.address, settings=insecure) as client:
            push_image(image, ImageReference.parse(ref), client)
        for h in hosts:
            h.env = {
                **os.environ,
                "TIDAL_DATA_ROOT": str(h.root),
                "TIDAL_BLOBS__P2P_ROOTS": root.url,
                "TIDAL_BLOBS__P2P_TOKEN_FILE": str(token_file),
                "TIDAL_BLOBS__INSECURE_REGISTRIES": registry.address,
            }
            h.tidal("image", "pull", ref, str(h.root / "pulled"))

        def mount(h: Host) -> Path:
            target = h.root / "mnt"
            h.tidal("image", "mount", str(h.root / "pulled"), str(target))
            targets[h.name] = target
            return target

        first, second, third = hosts
        m1 = mount(first)
        assert (m1 / "big" / "a.bin").read_bytes() == FILES["/big/a.bin"]
        s1 = first.p2p_stats(m1)
        assert s1["node"].startswith(f"http://{first.address}:")
        assert s1["bytes_from_registry"] > len(FILES["/big/a.bin"]) // 2  # random data: ~1:1
        assert s1["bytes_from_peers"] == 0

        m2, m3 = mount(second), mount(third)
        for m in (m2, m3):
            assert (m / "big" / "a.bin").read_bytes() == FILES["/big/a.bin"]
        s2, s3 = second.p2p_stats(m2), third.p2p_stats(m3)
        for s in (s2, s3):
            assert set(s["parents"].values()) == {s1["node"]}  # fanout 4: both under host1
            assert s["bytes_from_peers"] >= s1["bytes_from_registry"] * 0.9
            assert s["bytes_from_registry"] < s1["bytes_from_registry"] * 0.1
        assert first.p2p_stats(m1)["served_bytes"] >= 2 * s2["bytes_from_peers"] * 0.9
        trees = json.loads(
            first.tidal("p2p", "trees", root.url, "--token-file", str(token_file), "--json")
        )
        assert [h.split("//")[1].split(":")[0] for h in next(iter(trees.values()))] == [
            h.address for h in hosts
        ]

        # host1 leaves (unmount): host3 re-parents and reads a file nobody read yet
        first.tidal("image", "umount", str(m1))
        del targets[first.name]
        assert (m3 / "big" / "b.bin").read_bytes() == FILES["/big/b.bin"]
        after = third.p2p_stats(m3)
        # its parent did not answer: reported to the root, replaced by host2 (now first)
        assert after["reparents"] >= 1
        assert set(after["parents"].values()) == {s2["node"]}
        assert after["bytes_from_registry"] == s3["bytes_from_registry"]  # b.bin via host2
    finally:
        for name, target in targets.items():
            h = next(h for h in hosts if h.name == name)
            with contextlib.suppress(AssertionError):
                h.tidal("image", "umount", "--force", str(target))
        registry.stop()
        root.stop()


def test_a_forging_peer_gets_no_forged_byte_into_a_mount(
    network: tuple[BridgeNetwork, list[Host]], image: Path, token_file: Path, tmp_path: Path
) -> None:
    """An insider with the token joins every tree first and serves each chunk with FORGED!
    spliced in and its crc32 kept. The two hosts that take it as parent read only true bytes:
    every forged chunk fails its sha256 and comes from the registry instead."""
    net, hosts = network
    forger_host, victims = hosts[0], hosts[1:]
    root = RootServer(net.gateway, 0, token=ClusterToken.from_file(token_file)).start()
    registry = RegistryServer(host=net.gateway).start()
    forger = None
    targets: dict[str, Path] = {}
    try:
        ref = f"{registry.address}/p2p/forged:v1"
        insecure = BlobSettings(insecure_registries=(registry.address,))
        with RegistryClient(registry.address, settings=insecure) as client:
            push_image(image, ImageReference.parse(ref), client)
        forger = subprocess.Popen(
            [*BridgeNetwork.net_prefix(forger_host.netns), sys.executable, "-m",
             "tidal.testing.forging_peer", "--root", root.url, "--token-file", str(token_file),
             "--image", str(image), "--listen", forger_host.address],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert forger.stdout is not None
        line = forger.stdout.readline()
        assert "joined" in line, (line, forger.stderr.read() if forger.poll() is not None else "")
        for h in victims:
            h.env = {
                **os.environ,
                "TIDAL_DATA_ROOT": str(h.root),
                "TIDAL_BLOBS__P2P_ROOTS": root.url,
                "TIDAL_BLOBS__P2P_TOKEN_FILE": str(token_file),
                "TIDAL_BLOBS__INSECURE_REGISTRIES": registry.address,
            }
            h.tidal("image", "pull", ref, str(h.root / "pulled"))
            target = h.root / "mnt"
            h.tidal("image", "mount", str(h.root / "pulled"), str(target))
            targets[h.name] = target
        for h in victims:
            for rel, data in FILES.items():
                got = (targets[h.name] / rel.lstrip("/")).read_bytes()
                assert b"FORGED!" not in got
                assert got == data
            stats = h.p2p_stats(targets[h.name])
            assert stats["bytes_from_registry"] > 0
            log = (h.root / "mounts").rglob("server.log")
            text = "".join(p.read_text() for p in log)
            assert "fail their checksum" in text, text[-2000:]
    finally:
        for name, target in targets.items():
            h = next(h for h in hosts if h.name == name)
            with contextlib.suppress(AssertionError):
                h.tidal("image", "umount", "--force", str(target))
        if forger is not None:
            forger.terminate()
            out, _ = forger.communicate(timeout=10)
            assert "forged 0 chunk(s)" not in out, "the forger never got asked"
        registry.stop()
        root.stop()
