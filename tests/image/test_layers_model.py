"""The merged view and writable layer against a plain bytearray model."""

import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tidal.errors import ChecksumError, FormatError, LayerError
from tidal.image.layer import ReadOnlyLayer
from tidal.image.manifest import Image, ImageWriter
from tidal.image.merged import MergedView
from tidal.image.source import BytesSource
from tidal.image.writable import WritableLayer

SIZE = 64 * 1024  # a 128-sector device keeps examples small but crosses chunk boundaries
CHUNK = 4096


class LayerStackMachine(RuleBasedStateMachine):
    """Random writes, discards, reads, commits and crash-reopens; the model is one bytearray."""

    @initialize()
    def setup(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tidal-layers-"))
        self.model = bytearray(SIZE)
        self.layers: list[ReadOnlyLayer] = []
        self.n = 0
        self.wl = WritableLayer.create(self.dir / "w0", SIZE)

    def teardown(self) -> None:
        self.wl.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        offset=st.integers(0, SIZE - 1),
        data=st.binary(min_size=1, max_size=3000),
        zero=st.booleans(),
    )
    def write(self, offset: int, data: bytes, zero: bool) -> None:
        data = bytes(len(data)) if zero else data
        data = data[: SIZE - offset]
        self.wl.write(offset, data)
        self.model[offset : offset + len(data)] = data

    @rule(offset=st.integers(0, SIZE - 1), length=st.integers(0, 5000))
    def discard(self, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        self.wl.discard(offset, length)
        lo = -(-offset // 512) * 512
        hi = (offset + length) // 512 * 512
        if hi > lo:
            self.model[lo:hi] = bytes(hi - lo)

    @rule(offset=st.integers(0, SIZE), length=st.integers(0, 6000))
    def read(self, offset: int, length: int) -> None:
        length = min(length, SIZE - offset)
        assert self.wl.read(offset, length) == bytes(self.model[offset : offset + length])

    @precondition(lambda self: len(self.layers) < 6)
    @rule(codec=st.sampled_from(["lz4", "zstd", "none"]))
    def commit(self, codec: str) -> None:
        buf = io.BytesIO()
        self.wl.commit(buf, chunk_size_bytes=CHUNK, codec=codec)
        self.layers.append(ReadOnlyLayer(BytesSource(buf.getvalue(), f"layer{len(self.layers)}")))
        self.wl.close()
        self.n += 1
        self.wl = WritableLayer.create(self.dir / f"w{self.n}", SIZE, self.layers)
        merged = MergedView(self.layers, SIZE)
        assert merged.read(0, SIZE) == bytes(self.model)

    @rule(torn=st.integers(0, 23))
    def crash_and_reopen(self, torn: int) -> None:
        """A crash may leave a torn index record; reopening keeps everything acknowledged."""
        self.wl.close()
        path = self.wl.path
        if torn:
            with (path / "index").open("ab") as fh:
                fh.write(os.urandom(torn))
        self.wl = WritableLayer.open(path, self.layers)

    @invariant()
    def whole_device_matches(self) -> None:
        if hasattr(self, "wl"):
            assert self.wl.read(0, SIZE) == bytes(self.model)


TestLayerStack = LayerStackMachine.TestCase
TestLayerStack.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_unaligned_write_read_modify_writes_edge_sectors(tmp_path: Path) -> None:
    wl = WritableLayer.create(tmp_path / "w", 4096)
    wl.write(0, b"\xaa" * 4096)
    wl.write(100, b"hello")
    wl.write(1020, b"across-a-boundary")
    got = wl.read(0, 4096)
    expect = bytearray(b"\xaa" * 4096)
    expect[100:105] = b"hello"
    expect[1020:1037] = b"across-a-boundary"
    assert got == bytes(expect)
    wl.close()


def test_zero_writes_take_no_data_space(tmp_path: Path) -> None:
    wl = WritableLayer.create(tmp_path / "w", 1 << 20)
    wl.write(0, bytes(1 << 19))
    assert os.path.getsize(tmp_path / "w" / "data") == 0
    assert wl.read(0, 16) == bytes(16)
    wl.close()


def test_bounds_and_readonly(tmp_path: Path) -> None:
    wl = WritableLayer.create(tmp_path / "w", 4096)
    with pytest.raises(LayerError, match="outside the 4096-byte device"):
        wl.write(4000, b"x" * 200)
    with pytest.raises(LayerError, match="already holds"):
        WritableLayer.create(tmp_path / "w", 4096)
    wl.close()
    with pytest.raises(LayerError, match="read-only"):
        MergedView([], 4096).write(0, b"x")


def test_image_writer_commit_open_verify_and_tamper(tmp_path: Path) -> None:
    size = 1 << 20
    img = ImageWriter(tmp_path / "img", size)
    wl = WritableLayer.create(tmp_path / "w1", size)
    wl.write(0, b"base" * 1000)
    img.commit_layer(wl)
    wl.close()
    base = Image(tmp_path / "img", img.write_manifest())
    wl2 = base.writable(tmp_path / "w2")
    wl2.write(2, b"TOP")
    img.commit_layer(wl2, codec="zstd")
    wl2.close()
    img.write_manifest(config={"Cmd": ["/bin/sh"]})
    image = Image.open(tmp_path / "img")
    assert image.manifest.config == {"Cmd": ["/bin/sh"]}
    view = image.merged_view()
    assert view.read(0, 12) == b"baTOPasebase"
    assert image.verify() >= 2
    # flip one byte of the top layer's data
    blob = tmp_path / "img" / "blobs" / "sha256" / image.manifest.layers[1].digest.split(":")[1]
    raw = bytearray(blob.read_bytes())
    raw[70] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=r"layer 1 .* digest"):
        Image.open(tmp_path / "img").verify()


def test_bad_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "docker"}')
    with pytest.raises(FormatError, match="not a Tidal image"):
        Image.open(tmp_path)
