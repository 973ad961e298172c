"""Settings of the block device, mounts and builder (TOML section ``[blockdev]``)."""

from __future__ import annotations

from dataclasses import dataclass

from tidal.config import load_section
from tidal.errors import ConfigError
from tidal.units import GiB, MiB
from tidal.validation import NonNegativeInt, PositiveFloat, PositiveInt, check

DEFAULT_READY_TIMEOUT_S = 30.0
"""A FUSE server opens only the blobs' tails before it mounts; 30 s covers a slow remote tail."""
DEFAULT_STOP_TIMEOUT_S = 60.0
"""Stopping flushes the writable layer (two fsyncs); a minute tolerates a slow disk."""
DEFAULT_MAX_IO_BYTES = 1 * MiB
"""FUSE request size: libfuse3's ceiling (256 pages); fewer round trips per sequential read."""
DEFAULT_MIN_SIZE_BYTES = 64 * MiB
"""Smallest virtual disk the builder makes: room for ext4 metadata on tiny images."""
DEFAULT_SIZE_FACTOR = 2.0
"""Virtual size = content x factor + slack; holes cost nothing, so generous is free."""
DEFAULT_RECORD_TIMEOUT_S = 60.0
"""``tidal image record`` stops the command after this long: a start-up trace, not a run."""
DEFAULT_SLACK_BYTES = 64 * MiB
DEFAULT_MAX_CONTENT_BYTES = 64 * GiB
"""Largest image content a conversion accepts (file sizes as the layers declare them): a tar
may declare a 100 GB sparse file in a few bytes, and the builder would write it out in full."""
DEFAULT_CODEC = "zstd"
"""Issue 16, measured on the Debian/python tree (README, "Levers measured for issue 16"):
zstd -3 stores the layer in 1.071x the gzip -6 tar where lz4 took 1.460x, so a quarter fewer
bytes cross the link before ready, for ~80 us more per 64 KiB chunk decoded."""
DEFAULT_CODEC_LEVEL: int | None = 3
"""zstd's own default: -6 stored 6 % less (1.007x) but committed at a third of the speed."""
DEFAULT_CHUNK_SIZE_BYTES = 64 * 1024
"""The format's default (see ``tidal.image.zfile``)."""
CODEC_LEVELS = {"zstd": (1, 19), "gzip": (1, 9)}
"""Levels each codec takes; lz4 (block mode) and none take none."""
DEFAULT_BYTES_PER_INODE = 8192
"""Half mke2fs's default: root filesystems are full of small files."""


@dataclass(frozen=True)
class BlockdevSettings:
    """How images are served, mounted and built."""

    ready_timeout_s: PositiveFloat = DEFAULT_READY_TIMEOUT_S
    stop_timeout_s: PositiveFloat = DEFAULT_STOP_TIMEOUT_S
    max_io_bytes: PositiveInt = DEFAULT_MAX_IO_BYTES
    loop_direct_io: bool = True
    """Loop device reads the FUSE file with O_DIRECT: the data is cached once (above ext4),
    not twice (FUSE file and filesystem page caches). Mounts that warm their page cache
    (``warm_page_cache``) read buffered whatever this says: the push needs that cache."""
    warm_page_cache: bool = True
    """A read-only mount of a pulled image with a trace: its server pushes the trace's ranges
    into the kernel's page cache of the FUSE disk as the replay brings them in, and its loop
    device reads through that cache (direct I/O off whatever ``loop_direct_io`` says), so the
    application's start-up reads need no FUSE request (``tidal.blockdev.warm``)."""
    loop_read_ahead_kb: NonNegativeInt | None = None
    """Read-ahead of an image's loop device (what ext4 reads ahead in its files); None keeps
    the kernel's (2560 KiB for loop devices on this 6.x kernel). On a lazy image read-ahead is
    fetched bytes, less of it more round trips: the README's levers table has both measured."""
    min_size_bytes: PositiveInt = DEFAULT_MIN_SIZE_BYTES
    size_factor: PositiveFloat = DEFAULT_SIZE_FACTOR
    slack_bytes: NonNegativeInt = DEFAULT_SLACK_BYTES
    bytes_per_inode: PositiveInt = DEFAULT_BYTES_PER_INODE
    max_content_bytes: PositiveInt = DEFAULT_MAX_CONTENT_BYTES
    """Refuse a conversion whose layers declare more file content than this (any one file, or
    all of them together): sparse files and lying headers would otherwise fill the disk."""
    ext4_journal: bool = False
    """Images are written by one builder and committed only after a clean unmount, so a journal
    would only add its own blocks to every layer. Turn on for long-lived read-write mounts."""
    codec: str = DEFAULT_CODEC
    """ZFile codec of new layers (images already built keep theirs: each blob names its own)."""
    codec_level: int | None = DEFAULT_CODEC_LEVEL
    """Compression level of ``codec`` (zstd 1-19, gzip 1-9); None: the codec's default."""
    chunk_size_bytes: PositiveInt = DEFAULT_CHUNK_SIZE_BYTES
    """Raw bytes per ZFile chunk of new layers: the unit of a lazy fetch and of decompression."""

    def __post_init__(self) -> None:
        check(self, "[blockdev]")
        from tidal.image.zfile import (  # here: lz4 and zstd load with a codec's user
            MAX_CHUNK_SIZE_BYTES,
            MIN_CHUNK_SIZE_BYTES,
            Codec,
        )

        try:
            codec = Codec.parse(self.codec)
        except ConfigError as exc:
            raise ConfigError(f"[blockdev] codec: {exc}") from None
        if not MIN_CHUNK_SIZE_BYTES <= self.chunk_size_bytes <= MAX_CHUNK_SIZE_BYTES:
            raise ConfigError(
                f"[blockdev] chunk_size_bytes {self.chunk_size_bytes} is outside "
                f"[{MIN_CHUNK_SIZE_BYTES}, {MAX_CHUNK_SIZE_BYTES}]"
            )
        if self.codec_level is not None:
            low, high = CODEC_LEVELS.get(codec.name.lower(), (0, 0))
            if not low <= self.codec_level <= high:
                what = f"{low}-{high}" if high else "no levels"
                raise ConfigError(
                    f"[blockdev] codec_level {self.codec_level} does not suit codec "
                    f"{self.codec} ({what})"
                )


def load_settings() -> BlockdevSettings:
    return load_section("blockdev", BlockdevSettings)
