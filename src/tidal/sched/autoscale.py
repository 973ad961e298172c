"""Replica targets from an HPA-style rule and cron rules, whichever is higher.

Tidal does not replace the autoscalers a team already runs: the HPA keeps following load, cron
rules scale ahead of a known daily peak, and the threshold only decides *where* the replicas
go. Cron rules can be written by hand or derived from the predictor's next-day profile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tidal.errors import ConfigError

MINUTES_PER_DAY = 1440


@dataclass(frozen=True)
class HpaRule:
    """Kubernetes HPA semantics: replicas = ceil(load / target utilisation), clamped."""

    target_utilisation: float = 0.8
    min_replicas: int = 1
    max_replicas: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target_utilisation <= 1:
            raise ConfigError(
                f"HPA target utilisation must be in (0, 1], got {self.target_utilisation}"
            )

    def desired(self, load_replicas: float, growth: float = 1.0) -> int:
        """``load_replicas``: busy replica-equivalents (load at 100 % of one replica).

        ``growth`` (Tidal's predictive variant; 1.0 is the stock HPA) scales the observed load
        by the rise the forecast expects before new replicas are ready.
        """
        n = math.ceil(load_replicas * growth / self.target_utilisation - 1e-9)
        n = max(n, self.min_replicas)
        return n if self.max_replicas is None else min(n, self.max_replicas)


@dataclass(frozen=True)
class CronRule:
    """``replicas`` between ``start_minute`` and ``end_minute`` of the day on ``weekdays``."""

    start_minute: int
    end_minute: int
    replicas: int
    weekdays: frozenset[int] = frozenset(range(7))

    def __post_init__(self) -> None:
        if not (
            0 <= self.start_minute < MINUTES_PER_DAY and 0 < self.end_minute <= MINUTES_PER_DAY
        ):
            raise ConfigError(
                f"cron rule window {self.start_minute}-{self.end_minute} is outside 0-1440 minutes"
            )
        if self.replicas < 0:
            raise ConfigError(f"cron rule replicas must be >= 0, got {self.replicas}")

    def active(self, minute_of_day: int, weekday: int) -> bool:
        if weekday not in self.weekdays:
            return False
        if self.start_minute < self.end_minute:
            return self.start_minute <= minute_of_day < self.end_minute
        return minute_of_day >= self.start_minute or minute_of_day < self.end_minute


def replica_target(
    load_replicas: float,
    minute_of_day: int,
    weekday: int,
    hpa: HpaRule | None,
    crons: Sequence[CronRule] = (),
    growth: float = 1.0,
) -> int:
    """The higher of the HPA's and the active cron rules' replica counts."""
    target = hpa.desired(load_replicas, growth) if hpa is not None else 0
    for rule in crons:
        if rule.active(minute_of_day, weekday):
            target = max(target, rule.replicas)
    return target


def cron_rules_from_profile(
    profile: Sequence[float],
    *,
    step_minutes: int = 15,
    lead_minutes: int = 0,
    cover: bool = True,
) -> tuple[CronRule, ...]:
    """Turn a per-minute next-day profile into step cron rules.

    The profile is shifted ``lead_minutes`` ahead so replicas are requested early enough to be
    ready (creation latency). ``cover=True`` takes each window's maximum: the rules alone
    cover the profile. ``cover=False`` takes the minimum: a floor that never runs more than
    the profile asks at any minute, for use beside an HPA that follows the ramps.
    """
    if len(profile) != MINUTES_PER_DAY:
        raise ConfigError(f"profile must have {MINUTES_PER_DAY} minutes, got {len(profile)}")
    rules = []
    for start in range(0, MINUTES_PER_DAY, step_minutes):
        end = min(start + step_minutes, MINUTES_PER_DAY)
        window = [profile[(m + lead_minutes) % MINUTES_PER_DAY] for m in range(start, end)]
        level = max(window) if cover else min(window)
        rules.append(CronRule(start, end, math.ceil(level - 1e-9)))
    return tuple(rules)
