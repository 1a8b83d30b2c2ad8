"""Injected clocks, so TTL and latency logic can be tested exactly and instantly."""

from __future__ import annotations

import math
import time
from typing import Protocol

from cachelm.errors import ConfigError


class Clock(Protocol):
    """Returns the current time in seconds. Wall time for stored timestamps, monotonic for intervals."""

    def __call__(self) -> float: ...


wall_clock: Clock = time.time
monotonic_clock: Clock = time.monotonic


class ManualClock:
    """A clock that moves only when told to; for tests and trace simulation."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if not 0 <= seconds < math.inf:  # also refuses nan, which would stick: every later time is nan
            raise ConfigError(f"`seconds` must be a finite number >= 0, got {seconds!r}")
        self.now += seconds
