"""Hypothesis stateful tests: each policy against a small list-based reference model of the same algorithm.

The reference models are written for obviousness, not speed (linear scans over lists). Each machine draws
capacities, then random inserts, hits, removes (and time steps for TTL) and checks after every step that the
real policy evicted exactly the same keys in the same order, tracks the same keys and the same bytes.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cachelm.clock import ManualClock
from cachelm.policy import FIFOPolicy, GDSFPolicy, LFUPolicy, LRUPolicy, S3FIFOPolicy, TTLPolicy
from cachelm.policy.base import Policy

KEYS = st.sampled_from([f"k{i}" for i in range(8)])
SIZES = st.integers(min_value=0, max_value=12)
COSTS = st.sampled_from([0.0, 1.0, 2.0, 3.0])


class RefModel:
    """The shared insert discipline (see cachelm.policy._common), over `self.items`: key -> dict."""

    def __init__(self, max_entries: int | None, max_bytes: int | None) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.items: dict[str, dict[str, Any]] = {}
        self.seq = 0

    @property
    def total_bytes(self) -> int:
        return sum(item["size"] for item in self.items.values())

    def over(self, extra_entries: int = 0, extra_bytes: int = 0) -> bool:
        n = len(self.items) + extra_entries
        return (self.max_entries is not None and n > self.max_entries) or (
            self.max_bytes is not None and self.total_bytes + extra_bytes > self.max_bytes
        )

    def insert(self, key: str, size: int, cost: float) -> list[str]:
        if self.max_bytes is not None and size > self.max_bytes:
            self.remove(key)
            return [key]
        evicted = []
        if key in self.items:
            self.items[key].update(size=size, cost=cost)
            self.hit(key)
            while self.over():
                evicted.append(self.evict())
            return evicted
        while self.over(1, size):
            evicted.append(self.evict())
        self.add(key, size, cost)
        return evicted

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    def add(self, key: str, size: int, cost: float) -> None:
        self.items[key] = {"size": size, "cost": cost, "touched": self.tick(), "freq": 1}

    def hit(self, key: str) -> None:
        self.items[key]["touched"] = self.tick()
        self.items[key]["freq"] += 1

    def access(self, key: str) -> None:
        if key in self.items:
            self.hit(key)

    def remove(self, key: str) -> None:
        self.items.pop(key, None)

    def evict(self) -> str:
        victim = min(self.items, key=self.rank)
        del self.items[victim]
        return victim

    def rank(self, key: str) -> tuple[float, ...]:
        raise NotImplementedError


class RefLRU(RefModel):
    def rank(self, key: str) -> tuple[float, ...]:
        return (self.items[key]["touched"],)


class RefFIFO(RefModel):
    def hit(self, key: str) -> None:
        pass

    def rank(self, key: str) -> tuple[float, ...]:
        return (self.items[key]["touched"],)


class RefLFU(RefModel):
    def rank(self, key: str) -> tuple[float, ...]:
        return (self.items[key]["freq"], self.items[key]["touched"])


class RefGDSF(RefModel):
    def __init__(self, max_entries: int | None, max_bytes: int | None) -> None:
        super().__init__(max_entries, max_bytes)
        self.inflation = 0.0

    def _prioritise(self, key: str) -> None:
        item = self.items[key]
        item["h"] = self.inflation + item["freq"] * item["cost"] / max(item["size"], 1)

    def add(self, key: str, size: int, cost: float) -> None:
        super().add(key, size, cost)
        self._prioritise(key)

    def hit(self, key: str) -> None:
        super().hit(key)
        self._prioritise(key)

    def rank(self, key: str) -> tuple[float, ...]:
        return (self.items[key]["h"], self.items[key]["touched"])

    def evict(self) -> str:
        victim = min(self.items, key=self.rank)
        self.inflation = max(self.inflation, self.items[victim]["h"])
        del self.items[victim]
        return victim


class RefS3FIFO(RefModel):
    """The paper's algorithm over three plain lists (index 0 = tail = oldest)."""

    def __init__(self, max_entries: int | None, max_bytes: int | None) -> None:
        super().__init__(max_entries, max_bytes)
        self.small: list[str] = []
        self.main: list[str] = []
        self.ghost: list[tuple[str, int]] = []

    def _bytes(self, keys: list[str]) -> int:
        return sum(self.items[k]["size"] for k in keys)

    def _over_share(self, n: int, nbytes: int) -> bool:
        return (self.max_entries is not None and n > 0.9 * self.max_entries) or (
            self.max_bytes is not None and nbytes > 0.9 * self.max_bytes
        )

    def add(self, key: str, size: int, cost: float) -> None:
        self.items[key] = {"size": size, "freq": 0}
        ghosted = [g for g in self.ghost if g[0] == key]
        if ghosted:
            self.ghost.remove(ghosted[0])
            self.main.append(key)
        else:
            self.small.append(key)

    def hit(self, key: str) -> None:
        self.items[key]["freq"] = min(self.items[key]["freq"] + 1, 3)

    def remove(self, key: str) -> None:
        if self.items.pop(key, None) is not None:
            (self.small if key in self.small else self.main).remove(key)
        self.ghost = [g for g in self.ghost if g[0] != key]

    def evict(self) -> str:
        if self.small and not self._over_share(len(self.main), self._bytes(self.main)):
            while self.small:
                key = self.small.pop(0)
                if self.items[key]["freq"] >= 1:
                    self.main.append(key)
                    continue
                self.ghost.append((key, self.items.pop(key)["size"]))
                while self.ghost and self._over_share(len(self.ghost), sum(s for _, s in self.ghost)):
                    self.ghost.pop(0)
                return key
        while True:
            key = self.main.pop(0)
            if self.items[key]["freq"] > 0:
                self.items[key]["freq"] -= 1
                self.main.append(key)
                continue
            del self.items[key]
            return key


class PolicyMachine(RuleBasedStateMachine):
    """Compares `policy_cls` with `ref_cls` step by step."""

    policy_cls: type[Policy]
    ref_cls: type[RefModel]
    check_order = True

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()

    def build(self, max_entries: int | None, max_bytes: int | None) -> tuple[Policy, RefModel]:
        policy = self.policy_cls(max_entries=max_entries, max_bytes=max_bytes, timer=self.clock)
        return policy, self.ref_cls(max_entries, max_bytes)

    @initialize(
        max_entries=st.one_of(st.none(), st.integers(1, 5)),
        max_bytes=st.one_of(st.none(), st.integers(1, 30)),
    )
    def setup(self, max_entries: int | None, max_bytes: int | None) -> None:
        self.policy, self.ref = self.build(max_entries, max_bytes)

    @rule(key=KEYS, size=SIZES, cost=COSTS)
    def insert(self, key: str, size: int, cost: float) -> None:
        assert self.policy.insert(key, size, cost) == self.ref.insert(key, size, cost)

    @rule(key=KEYS)
    def access(self, key: str) -> None:
        self.policy.access(key)
        self.ref.access(key)

    @rule(key=KEYS)
    def remove(self, key: str) -> None:
        self.policy.remove(key)
        self.ref.remove(key)

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "policy"):
            return
        assert set(self.policy) == set(self.ref.items)
        assert self.policy.total_bytes == self.ref.total_bytes
        if self.check_order:
            assert list(self.policy) == sorted(self.ref.items, key=self.ref.rank)


class LRUMachine(PolicyMachine):
    policy_cls, ref_cls = LRUPolicy, RefLRU


class FIFOMachine(PolicyMachine):
    policy_cls, ref_cls = FIFOPolicy, RefFIFO


class LFUMachine(PolicyMachine):
    policy_cls, ref_cls = LFUPolicy, RefLFU


class GDSFMachine(PolicyMachine):
    policy_cls, ref_cls = GDSFPolicy, RefGDSF


class S3FIFOMachine(PolicyMachine):
    policy_cls, ref_cls = S3FIFOPolicy, RefS3FIFO
    check_order = False  # no single eviction order exists: a pass may promote or reinsert keys


class RefTTL(RefLRU):
    """LRU plus deadlines; expired keys (earliest deadline first) are dropped before every insert."""

    def __init__(self, clock: ManualClock, ttl: float, sliding: bool, **caps: int | None) -> None:
        super().__init__(caps["max_entries"], caps["max_bytes"])
        self.clock, self.ttl, self.sliding = clock, ttl, sliding
        self.deadlines: dict[str, tuple[float, int]] = {}

    def insert(self, key: str, size: int, cost: float) -> list[str]:
        now = self.clock()
        expired = sorted((d for d in self.deadlines.items() if d[1][0] <= now), key=lambda d: d[1])
        for k, _ in expired:
            del self.deadlines[k]
            del self.items[k]
        evicted = super().insert(key, size, cost)
        for k in evicted:
            self.deadlines.pop(k, None)
        if key in self.items:
            self.deadlines[key] = (now + self.ttl, self.tick())
        # The key being rewritten is not reported expired: a caller would drop the value it is writing.
        return [k for k, _ in expired if k != key] + evicted

    def access(self, key: str) -> None:
        if key not in self.deadlines:
            return
        if self.clock() >= self.deadlines[key][0]:
            self.remove(key)  # an expired key is collected by the access
            return
        super().access(key)
        if self.sliding:
            self.deadlines[key] = (self.clock() + self.ttl, self.tick())

    def remove(self, key: str) -> None:
        super().remove(key)
        self.deadlines.pop(key, None)


class TTLMachine(PolicyMachine):
    sliding = False

    def build(self, max_entries: int | None, max_bytes: int | None) -> tuple[Policy, RefModel]:
        inner = LRUPolicy(max_entries=max_entries, max_bytes=max_bytes, timer=self.clock)
        policy = TTLPolicy(inner, ttl=5.0, sliding=self.sliding, timer=self.clock)
        ref = RefTTL(self.clock, 5.0, self.sliding, max_entries=max_entries, max_bytes=max_bytes)
        return policy, ref

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 5.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class SlidingTTLMachine(TTLMachine):
    sliding = True


_settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
for _machine in (
    LRUMachine,
    FIFOMachine,
    LFUMachine,
    GDSFMachine,
    S3FIFOMachine,
    TTLMachine,
    SlidingTTLMachine,
):
    globals()[f"Test{_machine.__name__}"] = _machine.TestCase
    _machine.TestCase.settings = _settings
