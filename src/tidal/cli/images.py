"""``tidal pull``, ``tidal images`` and ``tidal rmi``: the node's image store by reference.

The store is a node-local directory (:mod:`tidal.node.images`), so these commands work with or
without the engine daemon; which containers use an image comes from the engine's state
database, the record of every container on the node whether the daemon runs or not.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import typer

from tidal.cli.console import out


def _users() -> dict[str, list[str]]:
    """Image directory -> names of the containers whose image it is."""
    from tidal.engine.settings import load_settings
    from tidal.engine.store import Store

    db = load_settings().resolved_state_dir() / "state.db"
    if not db.is_file():
        return {}
    store = Store(db)
    try:
        found: dict[str, list[str]] = defaultdict(list)
        for rec in store.list():
            found[rec.spec.image].append(rec.name)
        return dict(found)
    finally:
        store.close()


def _release_hot_mounts(image_dir: Path) -> None:
    """Unmount the engine's hot mounts of an image no container uses (its image cache) before
    the image goes; the engine mounts it afresh if the image comes back."""
    from tidal.blockdev.mounts import list_mounts
    from tidal.node import client as node

    for info in list_mounts():
        if Path(info.image_dir).resolve() == image_dir.resolve():
            node.unmount(info.target, force=True)


def _size(n_bytes: int) -> str:
    value = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{n_bytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n_bytes} B"


def register(app: typer.Typer) -> None:
    @app.command()
    def pull(reference: str = typer.Argument(..., help="HOST:PORT/NAME:TAG (or NAME:TAG)")) -> None:
        """Pull an image's metadata into the node's store; its data comes lazily at run.
        By the node service when it runs."""
        from tidal.node.client import running_node

        node = running_node()
        if node is not None:
            with node:
                doc = node.pull(reference)
            ref, digest, layers, stored = (
                doc["reference"], doc["manifest_digest"], doc["layers"], doc["stored_bytes"]
            )  # fmt: skip
        else:
            from tidal.node.images import ImageStore

            image = ImageStore().pull(reference)
            ref, digest = image.reference, image.manifest_digest
            layers, stored = len(image.layers), image.stored_bytes
        out.print(
            f"{ref}: {digest} ({layers} layers, {_size(stored)} in the registry, none fetched yet)",
            markup=False,
        )

    @app.command()
    def images(
        as_json: bool = typer.Option(False, "--json"),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="references only"),
    ) -> None:
        """The node's images: reference, manifest digest, layers, bytes, containers using it."""
        from tidal.node.images import ImageStore

        store = ImageStore()
        stored = store.list()
        if quiet:
            for image in stored:
                out.print(image.reference, markup=False)
            return
        users = _users()
        rows = [
            (image, store.fetched_bytes(image), users.get(str(image.path), [])) for image in stored
        ]
        if as_json:
            doc = [
                {
                    "reference": image.reference,
                    "manifest_digest": image.manifest_digest,
                    "layers": len(image.layers),
                    "stored_bytes": image.stored_bytes,
                    "fetched_bytes": fetched,
                    "used_by": used_by,
                    "path": str(image.path),
                }
                for image, fetched, used_by in rows
            ]
            out.print(json.dumps(doc, indent=2), markup=False)
            return
        out.print(
            f"{'REFERENCE':<40}  {'DIGEST':<19}  {'LAYERS':>6}  {'STORED':>9}  "
            f"{'FETCHED':>9}  USED BY",
            markup=False,
        )
        for image, fetched, used_by in rows:
            out.print(
                f"{image.reference:<40}  {image.manifest_digest[:19]:<19}  "
                f"{len(image.layers):>6}  {_size(image.stored_bytes):>9}  {_size(fetched):>9}  "
                f"{', '.join(used_by) or '-'}",
                markup=False,
            )

    @app.command()
    def rmi(
        reference: list[str] = typer.Argument(..., help="references to remove"),
        force: bool = typer.Option(False, "--force", "-f", help="even if containers use it"),
    ) -> None:
        """Remove images from the node; refused while a container uses one (unless --force).
        Chunk-cache entries no stored image needs any more are collected."""
        from tidal.node.images import ImageStore

        store = ImageStore()
        users = _users()
        for ref in reference:
            image = store.get(ref)
            used_by = users.get(str(image.path), [])
            if not used_by:
                _release_hot_mounts(image.path)
            res = store.remove(ref, users=used_by, force=force)
            what = (
                f"removed, {res.cache_entries_removed} cached chunks "
                f"({_size(res.cache_bytes_removed)}) collected"
                if res.directory_removed
                else "untagged (another reference names the same image)"
            )
            out.print(f"{res.image.reference}: {what}", markup=False)
