"""Client of the engine daemon's unix-socket API (used by the CLI, tests and benchmarks).

Errors come back as ``{"error": {"type", "message"}}`` and are re-raised as the same
:mod:`tidal.errors` class with the same message (:func:`tidal.service.wire.raise_for_error`),
so ``tidal rm web`` prints the daemon's message as if local: ``error: <message>``.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tidal.engine.spec import ContainerSpec
from tidal.engine.store import ContainerRecord
from tidal.errors import EngineError
from tidal.service.client import SocketClient

if TYPE_CHECKING:  # the runtime module (tool runner, drivers) loads only with an exec
    from tidal.engine.runtime import ExecResult

LONG_TIMEOUT_S = 600.0
"""Starts, stops and upgrades may take long (image mounts, stop timeouts)."""


class EngineClient(SocketClient):
    """Talks HTTP to ``tidal daemon`` over its unix socket."""

    what = "the engine daemon"
    start_hint = "tidal daemon"
    fallback = EngineError
    timeout_s = LONG_TIMEOUT_S

    def __init__(self, socket_path: Path, *, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(socket_path, transport=transport)

    def __enter__(self) -> EngineClient:
        return self

    def ping(self) -> dict[str, Any]:
        data: dict[str, Any] = self._request("GET", "/ping").json()
        return data

    def run(self, spec: ContainerSpec, *, start: bool = True) -> ContainerRecord:
        resp = self._request("POST", "/containers", json={"spec": spec.to_json(), "start": start})
        return ContainerRecord.from_json(resp.json())

    def list_all(self) -> list[ContainerRecord]:
        return [ContainerRecord.from_api(d) for d in self.describe_all()]

    def describe_all(self) -> list[dict[str, Any]]:
        """Every container as the API shows it (the record plus derived keys: ``services``)."""
        data: list[dict[str, Any]] = self._request("GET", "/containers").json()
        return data

    def inspect(self, ref: str) -> dict[str, Any]:
        data: dict[str, Any] = self._request("GET", f"/containers/{ref}").json()
        return data

    def get(self, ref: str) -> ContainerRecord:
        return ContainerRecord.from_api(self.inspect(ref))

    def _post(self, ref: str, action: str, body: dict[str, Any] | None = None) -> ContainerRecord:
        resp = self._request("POST", f"/containers/{ref}/{action}", json=body or {})
        return ContainerRecord.from_json(resp.json())

    def start(self, ref: str) -> ContainerRecord:
        return self._post(ref, "start")

    def stop(self, ref: str, timeout_s: float | None = None) -> ContainerRecord:
        return self._post(ref, "stop", {"timeout_s": timeout_s})

    def kill(self, ref: str, signal: str = "KILL") -> ContainerRecord:
        return self._post(ref, "kill", {"signal": signal})

    def wait(self, ref: str, timeout_s: float | None = None) -> ContainerRecord:
        return self._post(ref, "wait", {"timeout_s": timeout_s})

    def remove(self, ref: str, *, force: bool = False) -> None:
        self._request("DELETE", f"/containers/{ref}", params={"force": "1" if force else "0"})

    def update(
        self,
        ref: str,
        *,
        cpus: float | None = None,
        memory_bytes: int | None = None,
        pids_limit: int | None = None,
    ) -> ContainerRecord:
        body = {"cpus": cpus, "memory_bytes": memory_bytes, "pids_limit": pids_limit}
        return self._post(ref, "update", body)

    def upgrade(
        self,
        ref: str,
        image: str,
        command: tuple[str, ...] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> ContainerRecord:
        """``timeout_s``: SIGTERM to SIGKILL when stopping the old image (None: the default)."""
        body = {"image": image, "command": list(command or ()), "timeout_s": timeout_s}
        return self._post(ref, "upgrade", body)

    def exec(
        self, ref: str, argv: list[str], *, env: list[str] | None = None, stdin: bytes = b""
    ) -> ExecResult:
        body = {"argv": argv, "env": env or [], "stdin_b64": base64.b64encode(stdin).decode()}
        from tidal.engine.runtime import ExecResult

        d = self._request("POST", f"/containers/{ref}/exec", json=body).json()
        return ExecResult(
            int(d["exit_code"]),
            base64.b64decode(d["stdout_b64"]),
            base64.b64decode(d["stderr_b64"]),
        )

    def logs(
        self, ref: str, offset: int = 0, *, tail: int | None = None
    ) -> tuple[bytes, int, bool]:
        """Log data from ``offset``, or from the start of the last ``tail`` lines."""
        params = {"offset": offset} if tail is None else {"tail": tail}
        resp = self._request("GET", f"/containers/{ref}/logs", params=params)
        return (
            resp.content,
            int(resp.headers["X-Tidal-Next-Offset"]),
            resp.headers.get("X-Tidal-Running") == "1",
        )

    def follow_logs(
        self, ref: str, *, poll_s: float = 0.05, tail: int | None = None, offset: int = 0
    ) -> Iterator[bytes]:
        """Yield log data from ``offset`` (or from the last ``tail`` lines, if given) until
        the container has exited and everything was read."""
        if tail is not None:
            data, offset, _ = self.logs(ref, tail=tail)
            if data:
                yield data
        while True:
            data, offset, running = self.logs(ref, offset)
            if data:
                yield data
                continue
            if not running:
                data, offset, _ = self.logs(ref, offset)
                if data:
                    yield data
                return
            time.sleep(poll_s)
