"""`tidal image ...` commands: build, convert, inspect, mount, umount, verify, export-raw,
push, pull, stats, record.

Thin front-ends over ``tidal.blockdev`` (building, mounting, recording), ``tidal.blobs``
(registries, lazy images) and ``tidal.image`` (the format). Results go to stdout; progress
and diagnostics to stderr.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from tidal.blockdev.settings import DEFAULT_RECORD_TIMEOUT_S
from tidal.cli.console import err, out
from tidal.config import data_root
from tidal.errors import ChecksumError, ConfigError, FormatError, ImageNotFoundError
from tidal.ids import short_digest
from tidal.units import format_size, parse_size

if TYPE_CHECKING:  # blobs (httpx) and blockdev (FUSE) are imported by the commands using them
    from tidal.blockdev import builder

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
        err.print(f"[dim]{escape(description)}[/]", highlight=False)

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
    codec: str = typer.Option(
        None, help="Layer compression: zstd, lz4, gzip, none (default: [blockdev] codec, zstd)."
    ),
    size: str = typer.Option(
        None, help="Virtual disk size, e.g. 2G (default: 2x content + slack)."
    ),
) -> None:
    """Build a one-layer image from DIR (a copy preserving owners, modes, links, xattrs)."""
    from tidal.blockdev import builder

    with _Steps(f"building {output}") as steps:
        res = builder.build_from_dir(
            src_dir, output, codec=codec, size_bytes=_size_opt(size), progress=steps
        )
    _print_result(res)


def _looks_like_reference(text: str) -> bool:
    from tidal.blobs.reference import names_registry

    return text.startswith(("docker://", "oci://")) or (
        names_registry(text) and not Path(text).exists()
    )


@app.command()
def convert(
    archive: str = typer.Argument(
        ...,
        help="OCI image layout (directory or oci-archive tar), docker-archive tar, or an image "
        "reference in a registry (e.g. docker://127.0.0.1:5000/app:v1).",
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Image directory to create."),
    codec: str = typer.Option(
        None, help="Layer compression: zstd, lz4, gzip, none (default: [blockdev] codec, zstd)."
    ),
    size: str = typer.Option(
        None, help="Virtual disk size, e.g. 2G (default: 2x content + slack)."
    ),
    push: str = typer.Option(None, "--push", help="Push the result to this reference."),
) -> None:
    """Convert an OCI/docker image into a Tidal image: one block layer per OCI layer.

    The input may come straight from a registry (no local docker needed); with --push the
    result goes back to one.
    """
    from tidal.blobs.distribution import fetch_oci_image
    from tidal.blobs.registries import connect, resolve_reference
    from tidal.blobs.settings import load_blob_settings
    from tidal.blockdev import builder

    settings = load_blob_settings()
    fetched: Path | None = None
    try:
        if _looks_like_reference(archive):
            ref = resolve_reference(archive, settings)
            scratch = data_root() / "tmp"
            scratch.mkdir(parents=True, exist_ok=True)
            fetched = Path(tempfile.mkdtemp(prefix="fetch-", dir=scratch))
            with (
                err.status(f"downloading {ref}"),
                contextlib.closing(connect(ref.registry, settings)) as client,
            ):
                fetch_oci_image(ref, fetched, client)
            source = fetched
        else:
            source = Path(archive)
        with _Steps(f"converting {archive}") as steps:
            res = builder.convert_oci(
                source, output, codec=codec, size_bytes=_size_opt(size), progress=steps
            )
    finally:
        if fetched is not None:
            shutil.rmtree(fetched, ignore_errors=True)
    _print_result(res)
    if push:
        _push(output, push)


@app.command()
def inspect(
    image: Path = typer.Argument(..., help="Image directory."),
    as_json: bool = typer.Option(False, "--json", help="Print manifest.json as is."),
) -> None:
    """Show an image's layers: digests, sizes, extents, codec and the OCI layer each came from."""
    from tidal.image.manifest import Image

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
    """Mount IMAGE at DIR through the FUSE block device, a loop device and ext4.

    When the node service runs (`tidal node serve`) it serves the mount from its process;
    otherwise the mount gets a FUSE server process of its own."""
    from tidal.node import client as node

    wdir = writable_dir or (target.parent / f"{target.name}.writable" if rw else None)
    info = node.mount_image(image, target, writable_dir=wdir)
    mode = f"read-write, writable layer {info.writable_dir}" if not info.readonly else "read-only"
    out.print(f"mounted {info.image_dir} at {info.target} ({mode}, {info.loop_device})")


@app.command()
def umount(
    target: Path = typer.Argument(..., help="Directory an image is mounted on."),
    force: bool = typer.Option(False, "--force", help="Detach lazily even if busy."),
) -> None:
    """Unmount an image; also cleans up after a FUSE server that died."""
    from tidal.node import client as node

    node.unmount(target, force=force)
    out.print(f"unmounted {target.resolve()}")


@app.command("mounts")
def list_mounts(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the images mounted on this node (and whether their servers live)."""
    from tidal.blockdev import mounts

    found = mounts.list_mounts()
    if as_json:
        typer.echo(json.dumps([json.loads(m.to_json()) for m in found], indent=2))
        return
    table = Table()
    for col in ("target", "image", "mode", "loop", "server"):
        table.add_column(col)
    for m in found:
        alive = (
            ("node service" if m.fd_name else "running")
            if mounts.server_alive(m)
            else "[yellow]suspended[/]"
            if mounts.suspended(m)
            else "[red]dead[/]"
        )
        mode = "ro" if m.readonly else f"rw ({m.writable_dir})"
        table.add_row(m.target, m.image_dir, mode, m.loop_device or "-", f"{m.server_pid} {alive}")
    out.print(table)


@app.command()
def gc() -> None:
    """Clean up mounts whose FUSE server died and loop devices no mount owns."""
    from tidal.blockdev import mounts

    cleaned = mounts.cleanup_stale()
    out.print(f"cleaned {len(cleaned)}: {', '.join(cleaned)}" if cleaned else "nothing to clean")


@app.command()
def commit(
    image: Path = typer.Argument(..., help="Image the writable layer was mounted over."),
    writable_dir: Path = typer.Argument(..., help="Writable layer directory (unmounted)."),
    output: Path = typer.Option(None, "-o", "--output", help="New image (default: in place)."),
    codec: str = typer.Option(
        None, help="Layer compression: zstd, lz4, gzip, none (default: [blockdev] codec, zstd)."
    ),
) -> None:
    """Commit a writable layer into a new read-only top layer."""
    from tidal.blockdev import builder

    rec = builder.commit_writable(image, writable_dir, output, codec=codec)
    out.print(
        f"committed {short_digest(rec.digest)} ({format_size(rec.size_bytes)}) to {output or image}"
    )


@app.command()
def verify(image: Path = typer.Argument(..., help="Image directory.")) -> None:
    """Check every chunk (sha256, or crc32 in older images), then every blob digest; exit 1
    naming the bad layer/chunk. Says which kind of check each image got."""
    from tidal.image.layer import ReadOnlyLayer
    from tidal.image.manifest import LAYER_KIND_DATA, Image, blob_path, sha256_file
    from tidal.image.source import FileSource

    img = Image.open(image)
    chunks = 0
    by_crc32 = 0
    for i, rec in enumerate(img.manifest.layers):
        where = f"layer {i} ({short_digest(rec.digest)})"
        path = blob_path(img.path, rec.digest)
        if not path.exists():
            raise ImageNotFoundError(f"{where}: blob file {path} is missing")
        if rec.kind == LAYER_KIND_DATA:
            with FileSource(path) as src:
                try:
                    layer = ReadOnlyLayer(
                        src,
                        expected_tail_crc=rec.tail_crc32,
                        expected_index_sha256=rec.index_sha256,
                        decoded_cache_chunks=0,
                    )
                    chunks += layer.zfile.verify()
                    by_crc32 += not layer.zfile.has_digests
                except (FormatError, ChecksumError) as exc:
                    raise type(exc)(f"{where} of {image}: {exc}") from exc
        actual = sha256_file(path)
        if actual != rec.digest:
            raise ChecksumError(
                f"{where} of {image}: blob digest is {short_digest(actual)}, manifest says "
                f"{short_digest(rec.digest)} (the blob was modified after it was built)"
            )
    how = "by sha256, chunk tables pinned by the manifest"
    if by_crc32:
        how = (
            f"{by_crc32} data layer(s) by crc32 only (built by an older Tidal: not "
            "authenticated; rebuild to get chunk digests)"
        )
    out.print(f"ok: {len(img.manifest.layers)} layer(s), {chunks} chunks verified {how}")


@app.command("export-raw")
def export_raw(
    image: Path = typer.Argument(..., help="Image directory."),
    file: Path = typer.Argument(..., help="Raw disk file to write (sparse)."),
) -> None:
    """Write the image's virtual disk as a sparse raw file (for e2fsck, debugfs, VMs)."""
    from tidal.blockdev import rawdisk

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


def _push(image: Path, ref_text: str) -> None:
    from tidal.blobs.distribution import push_image
    from tidal.blobs.registries import LocalRegistry, connect, resolve_reference
    from tidal.blobs.settings import load_blob_settings

    settings = load_blob_settings()
    ref = resolve_reference(ref_text, settings)
    with (
        err.status(f"pushing {image} to {ref}"),
        contextlib.closing(connect(ref.registry, settings)) as client,
    ):
        res = push_image(image, ref, client)
    where = "the local store" if isinstance(client, LocalRegistry) else ref.registry
    out.print(
        f"pushed {res.reference} to {where}: {res.blobs_uploaded} blob(s) uploaded "
        f"({format_size(res.bytes_uploaded)}), the others were there already"
    )


@app.command("push")
def push_cmd(
    image: Path = typer.Argument(..., help="Image directory."),
    ref: str = typer.Argument(
        ...,
        help="Where to: HOST[:PORT]/REPO[:TAG] for a registry; a bare REPO[:TAG] goes to "
        "[blobs] default_registry, or to the node's local store if none is configured.",
    ),
) -> None:
    """Push an image (its layers, trace layer and an OCI manifest) to a registry."""
    _push(image, ref)


@app.command()
def pull(
    ref: str = typer.Argument(..., help="Image reference, e.g. 127.0.0.1:5000/app:v1."),
    dest: Path = typer.Argument(..., help="Directory to write the pulled image to."),
    with_blobs: bool = typer.Option(
        False, "--with-blobs", help="Download every layer too (a full local copy)."
    ),
) -> None:
    """Pull an image's metadata only (manifest, layer indexes); data comes on demand at mount.

    Mount the result with `tidal image mount DEST DIR`: it starts at once and fetches only
    the chunks that are read, through the node's chunk cache.
    """
    from tidal.blobs.distribution import pull_image
    from tidal.blobs.registries import LocalRegistry, connect, resolve_reference
    from tidal.blobs.settings import load_blob_settings
    from tidal.image.manifest import LAYER_KIND_TRACE

    settings = load_blob_settings()
    reference = resolve_reference(ref, settings)
    with contextlib.closing(connect(reference.registry, settings)) as client:
        remote = not isinstance(client, LocalRegistry)
        cache = settings.chunk_cache() if remote and not with_blobs else None
        with err.status(f"pulling {reference}"):
            m = pull_image(reference, dest, client, cache=cache, settings=settings,
                           with_blobs=with_blobs)  # fmt: skip
    stored = sum(r.size_bytes for r in m.layers)
    where = "the registry" if remote else "the local store"
    trace = "with a trace" if any(r.kind == LAYER_KIND_TRACE for r in m.layers) else "no trace"
    what = "all layers downloaded" if with_blobs else "metadata only"
    out.print(
        f"pulled {reference} into {dest}: {len(m.data_layers)} layer(s), "
        f"{format_size(stored)} stored in {where}, {trace} ({what})"
    )


@app.command()
def stats(
    target: Path = typer.Argument(..., help="Directory an image is mounted on."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw statistics document."),
) -> None:
    """Show what a mount read and, for a pulled image, fetched: bytes, cache hits, prefetch."""
    from tidal.blockdev import mounts

    doc = mounts.image_stats(target)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    fuse = doc["fuse"]
    table = Table(title=f"{target.resolve()}" + ("" if doc["server_alive"] else " (server dead)"))
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("reads served", f"{fuse['reads']} ({format_size(fuse['bytes_read'])})")
    table.add_row("writes served", f"{fuse['writes']} ({format_size(fuse['bytes_written'])})")
    table.add_row("I/O errors (EIO)", str(fuse["errors"]))
    lazy = doc.get("lazy")
    if lazy:
        total = lazy["total"]
        pre = lazy["prefetch"]
        table.add_row("bytes fetched", format_size(total["bytes_fetched"]))
        table.add_row("range requests", str(total["requests"]))
        table.add_row("chunk cache hits / misses", f"{total['hits']} / {total['misses']}")
        table.add_row(
            "chunks prefetched",
            f"{total['prefetched_chunks']} ({format_size(total['prefetched_bytes'])})",
        )
        if "cache" not in lazy:
            state = "not needed (blobs in the local store)"
        else:
            state = "running" if pre["running"] else "done" if pre["groups"] else "no trace"
        table.add_row("prefetch", f"{state}, {pre['errors']} error(s)")
        table.add_row("checksum failures (refetched)", str(total["check_failures"]))
        table.add_row("source", str(lazy["source"]))
    else:
        table.add_row("source", "local blobs (nothing fetched)")
    warm = doc.get("warm")
    if warm:
        state = "done" if warm["done"] else "running"
        table.add_row(
            "trace pushed to the page cache",
            f"{warm['pushed_runs']} of {warm['runs']} runs ({format_size(warm['pushed_bytes'])}), "
            f"{state} in {warm['seconds']:.2f} s, {warm['errors']} error(s)",
        )
    out.print(table)


@app.command()
def record(
    image: Path = typer.Argument(..., help="Local image directory to record a trace for."),
    command: list[str] = typer.Argument(
        None, help="Command to run (after --); default: the image's Entrypoint + Cmd."
    ),
    timeout: float = typer.Option(
        DEFAULT_RECORD_TIMEOUT_S, "--timeout", help="Stop recording after this many seconds."
    ),
    ready_line: str = typer.Option(
        None, "--ready-line", help="Stop as soon as an output line contains this text."
    ),
    push: str = typer.Option(None, "--push", help="Push the image with its trace afterwards."),
) -> None:
    """Run a command from the image and store the block ranges it read as the trace layer.

    A cold lazy mount of the pushed image replays the trace in the background, so the blocks
    arrive before the application asks for them. Servers never exit: end their recording
    with --ready-line or --timeout.
    """
    from tidal.blockdev import record as recording
    from tidal.image.manifest import attach_trace

    if (Path(image) / "origin.json").exists():
        raise ConfigError(
            f"{image} is a pulled image; record on the local image it was built from, then push"
        )
    argv = list(command or []) or recording.image_command(image)
    err.print(
        f"[dim]recording {escape(' '.join(argv))} in {escape(str(image))} (limit {timeout:.0f} s)[/]"
    )
    res = recording.record_trace(
        image,
        argv,
        timeout_s=timeout,
        ready_line=ready_line,
        on_output=lambda line: err.print(f"   [cyan]|[/] {escape(line)}", highlight=False),
    )
    rec = attach_trace(image, res.trace.serialize())
    ended = f"exit {res.exit_code}" if res.ended_by == "exit" else res.ended_by
    out.print(
        f"recorded {len(res.trace.ranges)} ranges ({format_size(res.trace.total_bytes)} of "
        f"the device) in {res.seconds:.1f} s ({ended}); trace layer {short_digest(rec.digest)}"
    )
    if push:
        _push(image, push)
