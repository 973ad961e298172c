"""A circuit breaker per remote source: fail fast while it is known down, probe to recover.

Without one, every lazy read of a file while the registry is down pays the whole retry
schedule (about 3 s with the default backoff) before its EIO; a directory walk over 199 files
took more than ten minutes. With it, the first request that fails after its retries opens the
breaker; from then on requests fail at once, except one probe every ``probe_interval_s`` --
a single attempt without backoff -- and the first success closes it again, so reads recover
within one probe interval of the source coming back.

Written here rather than taken from ``pybreaker``: the probe must be one attempt with no
backoff (the retry loop lives in the caller and is told so), and callers that arrive while a
probe is out must fail fast rather than queue behind it; ``pybreaker``'s half-open state lets
every caller through and knows nothing of the caller's retries.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum

from tidal.errors import BlobUnavailableError


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    PROBING = "probing"


class CircuitBreaker:
    """Thread-safe; ``clock`` is injectable so that tests take no time."""

    def __init__(
        self,
        name: str,
        *,
        probe_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        error: type[BlobUnavailableError] = BlobUnavailableError,
    ) -> None:
        self.name = name
        self.probe_interval_s = probe_interval_s
        self._clock = clock
        self._error = error
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._cause = ""
        self.opened = 0
        """Times the breaker opened (a metric)."""
        self.refused = 0
        """Requests failed fast while open."""

    @property
    def state(self) -> BreakerState:
        return self._state

    def admit(self) -> bool:
        """Before a request: ``False`` = go ahead normally, ``True`` = go ahead as the probe
        (one attempt, no retries); raises the breaker's error while the source is down."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return False
            now = self._clock()
            if self._state is BreakerState.OPEN and now - self._opened_at >= self.probe_interval_s:
                self._state = BreakerState.PROBING
                return True
            self.refused += 1
            wait = max(0.0, self.probe_interval_s - (now - self._opened_at))
            raise self._error(
                f"{self.name} is down ({self._cause}); failing fast, next probe in {wait:.1f} s"
            )

    def success(self) -> None:
        """The source answered (any HTTP status counts: it is up)."""
        with self._lock:
            self._state = BreakerState.CLOSED

    def failure(self, cause: str) -> None:
        """A request failed after its retries (or the probe failed): open, or stay open."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                self.opened += 1
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._cause = cause
