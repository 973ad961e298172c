"""In-place upgrade: a new image under a container, with rollback to the old one.

The old generation's writable layer and image mount stay until the new generation has run for
the probe period; any failure puts the old generation back (and restarts the container if it
was running) and raises. Storage steps go through :class:`~tidal.engine.storage.Storage`, so
this module is the upgrade's *order* of steps and nothing else.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tidal.engine.rootfs import drop_layer_dirs, provider_for
from tidal.engine.spec import ContainerSpec
from tidal.engine.state import LayerState, RootfsState
from tidal.engine.store import ContainerRecord
from tidal.errors import EngineError, TidalError

if TYPE_CHECKING:
    from tidal.engine.containers import Engine

log = logging.getLogger(__name__)


def upgrade(
    engine: Engine,
    ref: str,
    image: str,
    command: tuple[str, ...] | None = None,
    *,
    stop_timeout_s: float | None = None,
) -> ContainerRecord:
    """Swap the image under a container, keeping id, name, volumes, IP, quota, limits.

    Command precedence: ``command``, else the old container's own, else the new image's.
    ``stop_timeout_s``: SIGTERM to SIGKILL for the old image, as ``stop -t`` (None: the
    engine's default).
    """
    rec = engine.get(ref)
    provider_for(image)  # fail before stopping anything
    with engine._lock(rec.id):
        rec = engine.get(rec.id)
        was_running = rec.status == "running"
        if was_running:
            rec = engine.stop(rec.id, stop_timeout_s)
        old_state, old_spec = rec.rootfs, rec.spec
        old_layer = old_state.layer
        if old_layer is None:
            raise EngineError(f"container {rec.name} has no root file system to upgrade")
        new_spec = old_spec.replace(image=image, command=command or old_spec.command)
        engine.storage.unmount_layer(old_layer)
        new_layer: LayerState | None = None
        try:
            new_layer = engine.storage.mount_layer(
                rec.id,
                engine.cdir(rec.id),
                image,
                old_state.volume,
                old_layer.generation + 1,
                readonly=old_layer.readonly,
            )
            rec = engine.store.update(rec.id, rootfs=old_state.with_layer(new_layer), spec=new_spec)
            engine.start(rec.id)
            rec = engine.wait(rec.id, engine.settings.upgrade_probe_s)
            if rec.status != "running" and rec.exit_code != 0:
                raise EngineError(
                    f"it exited with status {rec.exit_code} within "
                    f"{engine.settings.upgrade_probe_s}s: {engine.log_tail(rec.id)}"
                )
        except TidalError as exc:
            rollback(engine, rec.id, old_state, old_spec, was_running, new_layer)
            raise EngineError(
                f"upgrade of container {rec.name} to {image} failed ({exc}); rolled back to "
                f"{old_spec.image}" + (" and restarted it" if was_running else "")
            ) from exc
        drop_layer_dirs(old_layer)
        engine.storage.release_lower_if_unused(old_layer, except_id=None)
        return rec


def rollback(
    engine: Engine,
    cid: str,
    old_state: RootfsState,
    old_spec: ContainerSpec,
    was_running: bool,
    new_layer: LayerState | None,
) -> None:
    """Put the old image and writable layer back; drop only what the upgrade made.

    Cleanup of the new generation is best effort and logged; the old generation is restored
    (``start`` remounts it) even when that cleanup fails."""
    rec = engine.get(cid)
    if rec.status == "running":
        engine.stop(cid, timeout_s=2)
    engine.store.update(cid, rootfs=old_state, spec=old_spec)
    if new_layer is not None:
        layer = new_layer
        engine._try(
            f"rollback of {rec.name}: dropping the new layer",
            lambda: engine.storage.unmount_layer(layer, drop=True),
        )
        engine._try(
            f"rollback of {rec.name}: releasing the new image",
            lambda: engine.storage.release_lower_if_unused(layer, except_id=None),
        )
    if was_running:
        engine.start(cid)
