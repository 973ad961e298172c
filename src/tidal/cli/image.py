"""`tidal image ...` commands: build, convert, inspect, mount, umount, verify, export-raw.

Thin front-ends over ``tidal.blockdev`` (building, mounting) and ``tidal.image`` (the format).
Results go to stdout; progress and diagnostics to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from tidal.blockdev import builder, mounts, rawdisk
from tidal.cli.console import err, out
from tidal.errors import ChecksumError, FormatError, ImageNotFoundError
from tidal.ids import short_digest
from tidal.image.layer import ReadOnlyLayer
from tidal.image.manifest import LAYER_KIND_DATA, Image, blob_path, sha256_file
from tidal.image.source import FileSource
from tidal.units import format_size, parse_size

app = typer.Typer(
    help="Build, inspect, mount, verify, push and pull Tidal block images.", no_args_is_help=True
)


class _Steps:
    """Rich progress on stderr for the builder's steps."""

    def __init__(self, title: str) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        self._task = self._progress.add_task(title, total=None)

    def step(self, description: str, total_bytes: int | None = None) -> None:
        self._progress.remove_task(self._task)  # a fresh task: rich cannot unset a total
        self._task = self._progress.add_task(description, total=total_bytes)
        err.print(f"[dim]{description}[/]", highlight=False)

    def advance(self, n_bytes: int) -> None:
        self._progress.update(self._task, advance=n_bytes)

    def __enter__(self) -> _Steps:
        self._progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()


def _size_opt(text: str | None) -> int | None:
    return parse_size(text) if text else None


def _print_result(res: builder.BuildResult) -> None:
    m = res.manifest
    out.print(
        f"built {res.image_dir}: {len(m.layers)} layer(s), virtual disk {format_size(m.size_bytes)}, "
        f"stored {format_size(res.stored_bytes)} (source {format_size(res.source_bytes)}) "
        f"in {res.seconds:.1f} s"
    )


@app.command()
def build(
    src_dir: Path = typer.Argument(..., help="Root directory tree to put in the image."),
    output: Path = typer.Option(..., "-o", "--output", help="Image directory to create."),
    codec: str = typer.Option(None, help="Layer compression: lz4 (default), zstd, gzip, none."),
    size: str = typer.Option(
        None, help="Virtual disk size, e.g. 2G (default: 2x content + slack)."
    ),
) -> None:
    """Build a one-layer image from DIR (a copy preserving owners, modes, links, xattrs)."""
    with _Steps(f"building {output}") as steps:
        res = builder.build_from_dir(
            src_dir, output, codec=codec, size_bytes=_size_opt(size), progress=steps
        )
    _print_result(res)


@app.command()
def convert(
    archive: Path = typer.Argument(
        ..., help="OCI image layout (directory or oci-archive tar) or docker-archive tar."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Image directory to create."),
    codec: str = typer.Option(None, help="Layer compression: lz4 (default), zstd, gzip, none."),
    size: str = typer.Option(
        None, help="Virtual disk size, e.g. 2G (default: 2x content + slack)."
    ),
) -> None:
    """Convert an OCI/docker image into a Tidal image: one block layer per OCI layer."""
    with _Steps(f"converting {archive}") as steps:
        res = builder.convert_oci(
            archive, output, codec=codec, size_bytes=_size_opt(size), progress=steps
        )
    _print_result(res)


@app.command()
def inspect(
    image: Path = typer.Argument(..., help="Image directory."),
    as_json: bool = typer.Option(False, "--json", help="Print manifest.json as is."),
) -> None:
    """Show an image's layers: digests, sizes, extents, codec and the OCI layer each came from."""
    m = Image.open(image).manifest
    if as_json:
        typer.echo(m.to_json(), nl=False)  # raw JSON for pipes: no wrapping, no colour
        return
    table = Table(title=f"{image} — {m.fs_type} on a {format_size(m.size_bytes)} virtual disk")
    for col in ("#", "digest", "kind", "stored", "raw data", "extents", "codec", "from"):
        table.add_column(
            col, justify="right" if col in ("#", "stored", "raw data", "extents") else "left"
        )
    for i, r in enumerate(m.layers):
        table.add_row(
            str(i),
            short_digest(r.digest),
            r.kind,
            format_size(r.size_bytes),
            format_size(r.raw_data_bytes),
            str(r.extent_count),
            r.codec,
            short_digest(r.source_digest) if r.source_digest else "-",
        )
    out.print(table)
    stored = sum(r.size_bytes for r in m.layers)
    out.print(
        f"total stored {format_size(stored)}; config keys: {', '.join(sorted(m.config)) or '-'}"
    )


@app.command()
def mount(
    image: Path = typer.Argument(..., help="Image directory."),
    target: Path = typer.Argument(..., help="Directory to mount the image's filesystem on."),
    rw: bool = typer.Option(False, "--rw", help="Read-write, with a writable block layer."),
    writable_dir: Path = typer.Option(
        None, "--writable-dir", help="Where the writable layer lives (default: TARGET.writable)."
    ),
) -> None:
    """Mount IMAGE at DIR through the FUSE block device, a loop device and ext4."""
    wdir = writable_dir or (target.parent / f"{target.name}.writable" if rw else None)
    info = mounts.mount_image(image, target, writable_dir=wdir)
    mode = f"read-write, writable layer {info.writable_dir}" if not info.readonly else "read-only"
    out.print(f"mounted {info.image_dir} at {info.target} ({mode}, {info.loop_device})")


@app.command()
def umount(
    target: Path = typer.Argument(..., help="Directory an image is mounted on."),
    force: bool = typer.Option(False, "--force", help="Detach lazily even if busy."),
) -> None:
    """Unmount an image; also cleans up after a FUSE server that died."""
    mounts.unmount(target, force=force)
    out.print(f"unmounted {target.resolve()}")


@app.command("mounts")
def list_mounts(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the images mounted on this node (and whether their servers live)."""
    found = mounts.list_mounts()
    if as_json:
        typer.echo(json.dumps([json.loads(m.to_json()) for m in found], indent=2))
        return
    table = Table()
    for col in ("target", "image", "mode", "loop", "server"):
        table.add_column(col)
    for m in found:
        alive = "running" if mounts.server_alive(m) else "[red]dead[/]"
        mode = "ro" if m.readonly else f"rw ({m.writable_dir})"
        table.add_row(m.target, m.image_dir, mode, m.loop_device or "-", f"{m.server_pid} {alive}")
    out.print(table)


@app.command()
def gc() -> None:
    """Clean up mounts whose FUSE server died and loop devices no mount owns."""
    cleaned = mounts.cleanup_stale()
    out.print(f"cleaned {len(cleaned)}: {', '.join(cleaned)}" if cleaned else "nothing to clean")


@app.command()
def commit(
    image: Path = typer.Argument(..., help="Image the writable layer was mounted over."),
    writable_dir: Path = typer.Argument(..., help="Writable layer directory (unmounted)."),
    output: Path = typer.Option(None, "-o", "--output", help="New image (default: in place)."),
    codec: str = typer.Option("lz4", help="Layer compression: lz4, zstd, gzip, none."),
) -> None:
    """Commit a writable layer into a new read-only top layer."""
    rec = builder.commit_writable(image, writable_dir, output, codec=codec)
    out.print(
        f"committed {short_digest(rec.digest)} ({format_size(rec.size_bytes)}) to {output or image}"
    )


@app.command()
def verify(image: Path = typer.Argument(..., help="Image directory.")) -> None:
    """Check every chunk checksum, then every blob digest; exit 1 naming the bad layer/chunk."""
    img = Image.open(image)
    chunks = 0
    for i, rec in enumerate(img.manifest.layers):
        where = f"layer {i} ({short_digest(rec.digest)})"
        path = blob_path(img.path, rec.digest)
        if not path.exists():
            raise ImageNotFoundError(f"{where}: blob file {path} is missing")
        if rec.kind == LAYER_KIND_DATA:
            with FileSource(path) as src:
                try:
                    layer = ReadOnlyLayer(
                        src, expected_tail_crc=rec.tail_crc32, decoded_cache_chunks=0
                    )
                    chunks += layer.zfile.verify()
                except (FormatError, ChecksumError) as exc:
                    raise type(exc)(f"{where} of {image}: {exc}") from exc
        actual = sha256_file(path)
        if actual != rec.digest:
            raise ChecksumError(
                f"{where} of {image}: blob digest is {short_digest(actual)}, manifest says "
                f"{short_digest(rec.digest)} (the blob was modified after it was built)"
            )
    out.print(f"ok: {len(img.manifest.layers)} layer(s), {chunks} chunks verified")


@app.command("export-raw")
def export_raw(
    image: Path = typer.Argument(..., help="Image directory."),
    file: Path = typer.Argument(..., help="Raw disk file to write (sparse)."),
) -> None:
    """Write the image's virtual disk as a sparse raw file (for e2fsck, debugfs, VMs)."""
    with Progress(
        TextColumn("exporting"), BarColumn(), TimeElapsedColumn(), console=err, transient=True
    ) as progress:
        task = progress.add_task("export", total=None)
        res = rawdisk.export_raw(
            image,
            file,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    out.print(
        f"wrote {file}: {format_size(res.size_bytes)} virtual, {format_size(res.data_bytes)} of data"
    )
