"""How new layers are encoded: [blockdev] codec, codec_level, chunk_size_bytes (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidal.blockdev.builder import layer_codec
from tidal.blockdev.settings import BlockdevSettings, load_settings
from tidal.errors import ConfigError
from tidal.image.manifest import Image, ImageWriter
from tidal.image.writable import WritableLayer

SIZE = 4 << 20


def test_new_layers_default_to_zstd_level_3_in_64_kib_chunks() -> None:
    s = BlockdevSettings()
    assert (s.codec, s.codec_level, s.chunk_size_bytes) == ("zstd", 3, 64 * 1024)
    assert layer_codec(None, s) == ("zstd", 3)
    assert layer_codec("lz4", s) == ("lz4", None)  # a caller's codec at its own default level


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"codec": "brotli"}, "unknown codec 'brotli'"),
        ({"codec_level": 40}, "codec_level 40 does not suit codec zstd"),
        ({"codec": "lz4", "codec_level": 3}, "codec lz4 \\(no levels\\)"),
        ({"chunk_size_bytes": 1000}, "chunk_size_bytes 1000 is outside"),
    ],
)
def test_bad_encoding_settings_are_one_line(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BlockdevSettings(**kwargs)  # type: ignore[arg-type]


def test_the_environment_chooses_codec_level_and_chunk_size(tmp_path: Path) -> None:
    env = {
        "TIDAL_BLOCKDEV__CODEC": "gzip",
        "TIDAL_BLOCKDEV__CODEC_LEVEL": "9",
        "TIDAL_BLOCKDEV__CHUNK_SIZE_BYTES": "131072",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        (tmp_path / "tidal.toml").write_text("")
        mp.setenv("TIDAL_CONFIG", str(tmp_path / "tidal.toml"))
        s = load_settings()
    assert (s.codec, s.codec_level, s.chunk_size_bytes) == ("gzip", 9, 131072)


def test_old_lz4_layers_read_beside_new_zstd_ones(tmp_path: Path) -> None:
    """A new default must still read old images: an lz4 base under a zstd layer, one image."""
    writer = ImageWriter(tmp_path / "img", SIZE)
    wl = WritableLayer.create(tmp_path / "w1", SIZE)
    wl.write(0, b"old lz4 layer " * 20_000)
    writer.commit_layer(wl, codec="lz4")
    wl.close()
    base = Image(tmp_path / "img", writer.write_manifest())
    wl2 = base.writable(tmp_path / "w2")
    wl2.write(4096, b"new zstd layer" * 100)
    s = BlockdevSettings()
    codec, level = layer_codec(None, s)
    writer.commit_layer(wl2, codec=codec, level=level, chunk_size_bytes=s.chunk_size_bytes)
    wl2.close()
    writer.write_manifest()
    image = Image.open(tmp_path / "img")
    assert [r.codec for r in image.manifest.layers] == ["lz4", "zstd"]
    model = bytearray(SIZE)
    old = b"old lz4 layer " * 20_000
    model[: len(old)] = old
    model[4096 : 4096 + 1400] = b"new zstd layer" * 100
    assert image.merged_view().read(0, SIZE) == bytes(model)
