"""Application latency from a Prometheus endpoint: the pull side of the latency signal.

A service that already exports its p95 (a gauge, or a summary's 0.95 quantile) needs no push
client: the agent scrapes it each round. Parsing is pure (text in, number out); fetching is a
plain ``fetch(url) -> str`` function so tests need no server.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tidal.errors import QosError

DEFAULT_SCRAPE_TIMEOUT_S = 0.5
"""A round is one second; a slow endpoint must not stall the agent."""


def parse_metric(text: str, metric: str, labels: dict[str, str]) -> float | None:
    """The value of the first sample named ``metric`` whose labels include ``labels``."""
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == metric and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
    except ValueError as exc:
        raise QosError(f"metrics text does not parse as Prometheus exposition: {exc}") from exc
    return None


def http_fetch(url: str, timeout_s: float = DEFAULT_SCRAPE_TIMEOUT_S) -> str:
    try:
        r = httpx.get(url, timeout=timeout_s)
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise QosError(f"cannot scrape latency from {url}: {exc}") from exc
    return r.text


Fetch = Callable[[str], str]
