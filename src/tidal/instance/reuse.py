"""How big each warm pool should be, learned from the shape's create/release history. Pure.

The model (one :class:`ReuseModel` per node, state per shape, no I/O and no clock of its
own: every call is given the time):

- A pool must cover the creates that arrive before a new member can be made, so the demand
  a shape shows at a create at time ``c`` is its **burst**: the number of creates of that
  shape in ``(c - refill_s, c]``, where ``refill_s`` is how long the pool needs to make one
  member (measured by the pool and passed in, never guessed here).
- Bursts are remembered for ``window_s`` and fade with **exponential decay**: at time ``t``
  a burst ``b`` seen at ``c`` counts ``b * 2 ** (-(t - c) / half_life_s)``. The learned size
  is the largest faded burst, rounded half up; with no create in the window it is 0.
- The target is that size bounded: ``min(pool_max, max(pool_min, learned))``. An idle shape
  shrinks to ``pool_min`` (its bursts fade and leave the window); a shape created and
  released often keeps a pool as large as its recent bursts; ``pool_max`` caps it.

Releases are recorded too (``releases_in``), but they do not raise the target: a released
sandbox goes back to its pool (:mod:`tidal.instance.pool`), so churn is served by reuse, and
counting releases as demand would make a pool of a shape that only cycles grow without
bound.

Why this shape of model: it needs two parameters that mean something to an operator (how
far back to look, how quickly to forget), reacts at the first burst (the peak, not a mean,
is what empties a pool), and costs O(creates in the window) per shape.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 600.0
"""How long a burst is remembered: ten minutes covers a deploy or a batch job's ramp."""
HALF_LIFE_S = 120.0
"""After two minutes a burst counts half: a shape idle for a few minutes gives its room back."""
DEFAULT_REFILL_S = 1.0
"""The refill time before any member was measured (a runc sandbox takes ~0.2-0.5 s here)."""


@dataclass(frozen=True)
class ModelParams:
    """The model's two parameters (see the module docstring)."""

    window_s: float = WINDOW_S
    half_life_s: float = HALF_LIFE_S

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.half_life_s <= 0:
            raise ValueError(
                f"reuse model window_s and half_life_s must be positive, got {self.window_s} "
                f"and {self.half_life_s}"
            )


@dataclass
class _History:
    creates: deque[float] = field(default_factory=deque)
    """Create times within the window plus one refill time (a burst looks back that far)."""
    bursts: deque[tuple[float, int]] = field(default_factory=deque)
    """(create time, burst) within the window."""
    releases: deque[float] = field(default_factory=deque)


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


class ReuseModel:
    """Per-shape create/release history and the pool target it implies."""

    def __init__(self, params: ModelParams | None = None) -> None:
        self.params = params or ModelParams()
        self._shapes: dict[str, _History] = {}

    def _history(self, shape: str) -> _History:
        return self._shapes.setdefault(shape, _History())

    def _forget(self, h: _History, now: float, refill_s: float) -> None:
        horizon = now - self.params.window_s
        while h.bursts and h.bursts[0][0] < horizon:
            h.bursts.popleft()
        while h.creates and h.creates[0] < horizon - refill_s:
            h.creates.popleft()
        while h.releases and h.releases[0] < horizon:
            h.releases.popleft()

    def record_create(self, shape: str, now: float, refill_s: float = DEFAULT_REFILL_S) -> int:
        """Note one create; returns its burst (creates of the shape within one refill time)."""
        h = self._history(shape)
        self._forget(h, now, refill_s)
        h.creates.append(now)
        burst = sum(1 for c in h.creates if c > now - refill_s)
        h.bursts.append((now, burst))
        return burst

    def seed(self, shape: str, burst: int, now: float) -> None:
        """Start a shape's history with one burst seen ``now`` (a restarted daemon carries
        its last learned size over; it fades from there like any burst)."""
        if burst > 0:
            self._history(shape).bursts.append((now, burst))

    def record_release(self, shape: str, now: float) -> None:
        h = self._history(shape)
        h.releases.append(now)

    def releases_in(self, shape: str, now: float) -> int:
        """Releases of the shape within the window (shown beside the target, not used by it)."""
        h = self._history(shape)
        return sum(1 for r in h.releases if r >= now - self.params.window_s)

    def learned(self, shape: str, now: float) -> int:
        """The largest faded burst within the window, rounded half up (0: no recent create)."""
        h = self._shapes.get(shape)
        if h is None:
            return 0
        best = 0.0
        for at, burst in h.bursts:  # a query forgets nothing: only records move the window
            if at < now - self.params.window_s or at > now:
                continue
            age = now - at
            best = max(best, burst * 2.0 ** (-age / self.params.half_life_s))
        return round_half_up(best)

    def target(self, shape: str, now: float, *, pool_min: int, pool_max: int) -> int:
        """``min(pool_max, max(pool_min, learned))``; 0 when ``pool_max`` is 0 (pools off)."""
        return min(pool_max, max(pool_min, self.learned(shape, now)))

    def shapes(self) -> list[str]:
        return sorted(self._shapes)
