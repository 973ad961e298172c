"""Stand-ins the services need to serve metrics, without their parts behind them."""

from __future__ import annotations

from typing import Any


class FakeAgent:
    """A QoS StatusProvider: its API needs nothing more of the agent."""

    def status(self) -> dict[str, Any]:
        return {"rounds": 1}

    def profiles(self) -> dict[str, Any]:
        return {}

    def adjustments(self) -> dict[str, Any]:
        return {"active": {}, "history": []}

    def rules_doc(self) -> dict[str, Any]:
        return {}

    def events(self) -> list[dict[str, Any]]:
        return []

    def dry_run_doc(self) -> dict[str, Any]:
        return {}

    def report_latency(self, app: str, p95_ms: float) -> None:
        pass

    def health_problem(self) -> str | None:
        return None


class Layer:
    """A cached layer source for a P2P peer: the scrape never reaches its bytes."""

    size_bytes = 1 << 20
