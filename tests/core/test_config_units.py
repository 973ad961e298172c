from dataclasses import dataclass
from pathlib import Path

import pytest

from tidal.config import load_section
from tidal.errors import ConfigError, NotFoundError, TidalError
from tidal.ids import parse_digest, sha256_digest
from tidal.units import format_size, parse_cpus, parse_size


@dataclass(frozen=True)
class _Demo:
    chunk_size_bytes: int = 4096
    codec: str = "lz4"
    verify: bool = True


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("512K") == 512 * 1024
    assert parse_size("1G") == 1 << 30
    assert parse_size("1.5MiB") == 1536 * 1024
    with pytest.raises(ConfigError, match="cannot parse size"):
        parse_size("ten megs")


def test_format_size_and_cpus() -> None:
    assert format_size(1536 * 1024) == "1.5 MiB"
    assert parse_cpus("500m") == 0.5
    with pytest.raises(ConfigError):
        parse_cpus("-1")


def test_digest() -> None:
    d = sha256_digest(b"")
    assert parse_digest(d) == d
    with pytest.raises(ConfigError):
        parse_digest("md5:abc")


def test_load_section_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "tidal.toml"
    cfg.write_text('[demo]\ncodec = "zstd"\nchunk_size_bytes = 8192\n')
    s = load_section(
        "demo", _Demo, cfg, env={"TIDAL_DEMO__CHUNK_SIZE_BYTES": "1024", "TIDAL_DEMO__VERIFY": "no"}
    )
    assert s == _Demo(chunk_size_bytes=1024, codec="zstd", verify=False)
    assert (
        load_section(
            "demo", _Demo, tmp_path / "none.toml" if False else cfg, env={}
        ).chunk_size_bytes
        == 8192
    )


def test_load_section_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "tidal.toml"
    cfg.write_text("[demo]\nbogus = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_section("demo", _Demo, cfg, env={})
    with pytest.raises(ConfigError, match="expected int"):
        load_section("demo", _Demo, None, env={"TIDAL_DEMO__CHUNK_SIZE_BYTES": "big"})


def test_not_found_is_file_not_found() -> None:
    err = NotFoundError("image foo not found")
    assert isinstance(err, FileNotFoundError) and isinstance(err, TidalError)
    assert str(err) == "image foo not found"


@pytest.mark.parametrize(
    ("section", "env", "message"),
    [
        ("blobs", {"FETCH_CONCURRENCY": "0"}, "[blobs] fetch_concurrency must be positive"),
        ("blobs", {"BACKOFF_MAX_S": "-1"}, "[blobs] backoff_max_s must not be negative"),
        ("blockdev", {"CODEC": "brotli"}, "[blockdev] codec: unknown codec 'brotli'"),
        ("blockdev", {"MAX_IO_BYTES": "0"}, "[blockdev] max_io_bytes must be positive"),
        ("qos", {"API_PORT": "70000"}, "[qos] api_port 70000 is not a port"),
        ("qos", {"INTERVAL_S": "0"}, "[qos] interval_s must be positive"),
        ("sched", {"CEILING": "1.5"}, "[sched] ceiling 1.5 must be a fraction"),
        ("sched", {"PRICE_RATIO": "-2"}, "[sched] price_ratio must be positive"),
        ("engine", {"LXCFS": "sometimes"}, "[engine] lxcfs 'sometimes': choose one of auto"),
    ],
)
def test_every_part_checks_its_settings_at_load(
    section: str, env: dict[str, str], message: str, tmp_path: Path
) -> None:
    from tidal.blobs.settings import BlobSettings
    from tidal.blockdev.settings import BlockdevSettings
    from tidal.engine.settings import EngineSettings
    from tidal.qos.settings import QosSettings
    from tidal.sched.settings import SchedSettings

    cls = {
        "blobs": BlobSettings,
        "blockdev": BlockdevSettings,
        "engine": EngineSettings,
        "qos": QosSettings,
        "sched": SchedSettings,
    }[section]
    variables = {f"TIDAL_{section.upper()}__{k}": v for k, v in env.items()}
    empty = tmp_path / "tidal.toml"
    empty.write_text("")
    with pytest.raises(ConfigError) as info:
        load_section(section, cls, empty, variables)
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(load_section(section, cls, empty, {}), cls)  # the defaults pass


def test_check_settings_compatibility_wrapper_keeps_the_wording() -> None:
    from tidal.config import check_settings

    @dataclass(frozen=True)
    class _Old:
        port: int = 70000
        workers: int = 0

    with pytest.raises(ConfigError, match=r"^\[old\] port 70000 is not a port \(0-65535\)$"):
        check_settings("old", _Old(), ports=("port",))
    with pytest.raises(ConfigError, match=r"^\[old\] workers must be positive, got 0$"):
        check_settings("old", _Old(), positive=("workers",))
