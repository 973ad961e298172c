"""Client of the instance API (``/v1/instances`` on the engine daemon's unix socket).

The same transport and error handling as :class:`~tidal.engine.client.EngineClient`: a
daemon error comes back as the same :mod:`tidal.errors` class with the same message.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tidal.engine.client import EngineClient
from tidal.engine.runtime import ExecResult
from tidal.errors import InstanceError, TidalError
from tidal.instance.spec import InstanceSpec
from tidal.service.wire import error_class


class InstanceClient(EngineClient):
    """Instances over the engine daemon's socket (the engine's verbs stay available)."""

    def __init__(self, socket_path: Path, *, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(socket_path, transport=transport)

    def __enter__(self) -> InstanceClient:
        return self

    def run_instance(self, spec: InstanceSpec) -> dict[str, Any]:
        data: dict[str, Any] = self._request(
            "POST", "/instances", json={"spec": spec.to_json()}
        ).json()
        return data

    def prewarm_pool(self, spec: InstanceSpec, count: int) -> dict[str, Any]:
        """Fill the pool of the spec's shape to at least ``count`` ready sandboxes."""
        data: dict[str, Any] = self._request(
            "POST", "/instances/pools", json={"spec": spec.to_json(), "count": count}
        ).json()
        return data

    def pools(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", "/instances/pools").json()
        return data

    def wait_pools_ready(self, timeout_s: float) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request(
            "POST", "/instances/pools/wait", json={"timeout_s": timeout_s}
        ).json()
        return data

    def drain_pools(self) -> int:
        """Tear down every idle warm sandbox and stop refilling until the next prewarm."""
        return int(self._request("DELETE", "/instances/pools").json()["drained"])

    def run_instances(self, specs: list[InstanceSpec]) -> list[dict[str, Any] | TidalError]:
        """Many instances in one request (``POST /v1/instances/batch``): per spec, in order,
        the instance (as :meth:`run_instance` returns it) or the error that stopped it, as
        the same :mod:`tidal.errors` class the daemon raised. One failure does not stop the
        others; bad input (a malformed spec) raises before any instance is made."""
        data = self._request(
            "POST", "/instances/batch", json={"specs": [s.to_json() for s in specs]}
        ).json()
        return [batch_result(r) for r in data["results"]]

    def instances(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", "/instances").json()
        return data

    def instance(self, ref: str) -> dict[str, Any]:
        data: dict[str, Any] = self._request("GET", f"/instances/{ref}").json()
        return data

    def stop_instance(self, ref: str, timeout_s: float | None = None) -> dict[str, Any]:
        data: dict[str, Any] = self._request(
            "POST", f"/instances/{ref}/stop", json={"timeout_s": timeout_s}
        ).json()
        return data

    def remove_instance(self, ref: str, *, force: bool = False) -> None:
        self._request("DELETE", f"/instances/{ref}", params={"force": "1" if force else "0"})

    def capacity(self) -> dict[str, Any]:
        data: dict[str, Any] = self._request("GET", "/node/capacity").json()
        return data

    def instance_exec(
        self,
        ref: str,
        argv: list[str],
        *,
        container: str | None = None,
        env: list[str] | None = None,
        stdin: bytes = b"",
    ) -> ExecResult:
        body = {
            "argv": argv,
            "container": container,
            "env": env or [],
            "stdin_b64": base64.b64encode(stdin).decode(),
        }
        d = self._request("POST", f"/instances/{ref}/exec", json=body).json()
        return ExecResult(
            int(d["exit_code"]),
            base64.b64decode(d["stdout_b64"]),
            base64.b64decode(d["stderr_b64"]),
        )

    def instance_logs(
        self, ref: str, container: str | None = None, offset: int = 0
    ) -> tuple[bytes, int, bool]:
        params: dict[str, Any] = {"offset": offset}
        if container:
            params["container"] = container
        resp = self._request("GET", f"/instances/{ref}/logs", params=params)
        return (
            resp.content,
            int(resp.headers["X-Tidal-Next-Offset"]),
            resp.headers.get("X-Tidal-Running") == "1",
        )

    def follow_instance_logs(
        self, ref: str, container: str | None = None, *, poll_s: float = 0.05
    ) -> Iterator[bytes]:
        offset = 0
        while True:
            data, offset, running = self.instance_logs(ref, container, offset)
            if data:
                yield data
                continue
            if not running:
                return
            time.sleep(poll_s)


def batch_result(item: dict[str, Any]) -> dict[str, Any] | TidalError:
    """One entry of a batch answer: the instance, or its error rebuilt as its class."""
    if "instance" in item:
        inst: dict[str, Any] = item["instance"]
        return inst
    err = item.get("error") or {}
    return error_class(err.get("type"), InstanceError)(str(err.get("message", "no message")))
