"""The instance API's routes and client without a socket: ``Service.handle`` behind an
``httpx.MockTransport``, over a stand-in manager. Errors arrive as the same class and words."""

from __future__ import annotations

from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidal.errors import InstanceNotFoundError, InstanceStateError, NoCapacityError
from tidal.instance.capacity import Capacity
from tidal.instance.catalog import Catalog
from tidal.instance.client import InstanceClient
from tidal.instance.service import instance_routes
from tidal.instance.spec import InstanceSpec, Limits
from tidal.service.server import Service
from tidal.units import GiB


class StandIn:
    """What the routes call on an InstanceManager, recording the calls."""

    def __init__(self) -> None:
        self.catalog = Catalog()
        self.calls: list[tuple[str, Any]] = []

    def run(self, spec: InstanceSpec) -> dict[str, Any]:
        self.calls.append(("run", spec))
        if spec.specs == ("8c32g",):
            raise NoCapacityError(
                "no instance spec fits the node's free capacity: 8c32g needs 8 CPUs (free 2)"
            )
        return {"name": spec.name, "ip": "10.88.0.2"}

    def describe(self, rec: dict[str, Any]) -> dict[str, Any]:
        return {**rec, "status": "running", "containers": []}

    def get(self, ref: str) -> dict[str, Any]:
        raise InstanceNotFoundError(
            f"no instance {ref!r}; 'tidal instance ls' lists the ones that exist"
        )

    def list_all(self) -> list[dict[str, Any]]:
        return [{"name": "web", "ip": "10.88.0.2"}]

    def remove(self, ref: str, *, force: bool = False) -> None:
        self.calls.append(("remove", (ref, force)))
        if not force:
            raise InstanceStateError(
                f"instance {ref} is running; stop it first or use 'tidal instance rm --force'"
            )

    def capacity(self) -> Capacity:
        return Capacity(2, 8 * GiB)

    def reserved(self) -> Capacity:
        return Capacity(1, 2 * GiB)


@pytest.fixture
def wired(tmp_path: Path) -> tuple[StandIn, InstanceClient]:
    manager = StandIn()
    service = Service("the engine daemon", instance_routes(manager))  # type: ignore[arg-type]

    def handler(req: httpx.Request) -> httpx.Response:
        resp = service.handle(req.method, req.url.raw_path.decode(), Message(), req.content)
        return httpx.Response(resp.status, content=resp.body, headers=dict(resp.headers))

    return manager, InstanceClient(tmp_path / "unused.sock", transport=httpx.MockTransport(handler))


def test_run_sends_the_spec_and_returns_the_instance(wired: tuple[StandIn, InstanceClient]) -> None:
    manager, client = wired
    spec = InstanceSpec(image="/img", name="web", limits=Limits(egress_bps=5_000_000))
    got = client.run_instance(spec)
    assert got == {"name": "web", "ip": "10.88.0.2", "status": "running", "containers": []}
    assert manager.calls == [("run", spec)]
    assert [d["name"] for d in client.instances()] == ["web"]


def test_errors_come_back_as_the_same_class_and_words(
    wired: tuple[StandIn, InstanceClient],
) -> None:
    _, client = wired
    with pytest.raises(
        NoCapacityError, match=r"^no instance spec fits .*8c32g needs 8 CPUs \(free 2\)$"
    ):
        client.run_instance(InstanceSpec(image="/img", specs=("8c32g",)))
    with pytest.raises(InstanceNotFoundError, match="no instance 'nope'"):
        client.instance("nope")
    with pytest.raises(InstanceStateError, match="stop it first"):
        client.remove_instance("web")
    client.remove_instance("web", force=True)


def test_capacity_route(wired: tuple[StandIn, InstanceClient]) -> None:
    _, client = wired
    cap = client.capacity()
    assert (cap["cpus"], cap["reserved_cpus"]) == (2, 1)
    assert cap["types"]["2c4g"]["memory_bytes"] == 4 * GiB
