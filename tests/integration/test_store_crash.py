"""Crash safety of the SQLite store: SIGKILL a writer mid-writes, reopen, find no corruption and no loss.

The child runs `run_writer`: a deterministic sequence of puts (small and multi-page values, overwrites),
deletes and gets (whose buffered hit counts are flushed every few hits), printing each step's number after
the step returns. The parent kills it with SIGKILL after a delay, replays the same sequence, and requires
the reopened store to hold exactly the state after the last reported step, or after one or two more steps
(the step in flight, and one whose report was cut off) — never a torn or corrupt record.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cachelm.store import Match, Record, SQLiteStore

NUM_KEYS = 40
REPO = Path(__file__).resolve().parents[2]


def payload(step: int) -> bytes:
    """The value written at `step`: sizes from a few bytes to ~24 KB (several overflow pages)."""
    size = (step * 7919) % 24_000 + 8
    unit = f"<{step}>".encode()
    return (unit * (size // len(unit) + 1))[:size]


def op(step: int) -> tuple[str, str]:
    """('put' | 'delete' | 'get', key) of `step`."""
    key = f"k{(step * 13) % NUM_KEYS}"
    if step % 5 == 4:
        return "delete", key
    if step % 5 == 2:
        return "get", key
    return "put", key


def expected_state(steps: int) -> dict[str, bytes]:
    """Key → value after the first `steps` steps."""
    state: dict[str, bytes] = {}
    for step in range(steps):
        kind, key = op(step)
        if kind == "put":
            state[key] = payload(step)
        elif kind == "delete":
            state.pop(key, None)
    return state


def run_writer(path: str) -> None:  # pragma: no cover - runs in the child process
    store = SQLiteStore(path, hit_flush_threshold=3, hit_flush_interval_s=0.01)
    step = 0
    while True:
        kind, key = op(step)
        if kind == "put":
            store.put(Record(key=key, value=payload(step), tenant="t", tags=frozenset({f"s{step % 3}"})))
        elif kind == "delete":
            store.delete(key)
        else:
            store.get(key)
        step += 1
        # Reported only after the step returned: everything up to here is committed.
        sys.stdout.write(f"{step}\n")
        sys.stdout.flush()


def _kill_writer_after(path: Path, delay: float) -> int:
    """Start the writer, let it run `delay` seconds past its first step, SIGKILL it; steps it reported."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"}
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from tests.integration.test_store_crash import run_writer; run_writer({str(path)!r})",
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    assert child.stdout is not None
    first = child.stdout.readline()  # blocks until the child has completed one step
    assert first.strip() == b"1", first
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    out = first + child.stdout.read()
    child.wait()
    assert child.returncode == -signal.SIGKILL
    lines = out.split(b"\n")
    complete = [int(x) for x in lines[:-1]]  # the last element is the (possibly cut) unterminated tail
    return complete[-1]


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.6])
def test_sigkill_mid_writes_leaves_no_corruption(tmp_path: Path, delay: float) -> None:
    path = tmp_path / "crash.db"
    reported = _kill_writer_after(path, delay)
    assert reported >= 1

    store = SQLiteStore(path)
    try:
        found = {r.key: r.value for r in store.scan()}
        for key in [f"k{i}" for i in range(NUM_KEYS)]:
            got = store.get(key)
            assert (got is None) == (key not in found)
            assert got is None or got.value == found[key]
        assert store.stats.corrupt_reads == 0
        # Exactly a state the writer passed through: the last reported step, or one or two past it.
        candidates = [expected_state(reported + extra) for extra in range(3)]
        assert found in candidates, f"state after kill matches no step in {reported}..{reported + 2}"
        conn = store._conn()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # The store keeps working after the crash.
        store.put(Record(key="after-crash", value=b"fine", tenant="t"))
        assert store.get("after-crash") is not None
    finally:
        store.close()
    reopened = SQLiteStore(path)
    try:
        assert reopened.get("after-crash") is not None and reopened.stats.corrupt_reads == 0
        assert reopened.purge(Match(tenant="t")) == len(found) + 1  # the indexes agree with the records
        assert len(reopened) == 0
    finally:
        reopened.close()


def run_concurrent_writer(path: str, worker: int, count: int) -> None:  # pragma: no cover - child process
    store = SQLiteStore(path, hit_flush_threshold=7)
    for i in range(count):
        store.put(Record(key=f"w{worker}-{i}", value=payload(worker * count + i), tenant=f"t{worker}"))
        assert store.get(f"w{worker}-{i}") is not None
        store.get("shared")  # every process counts hits on one record
    store.close()


def test_processes_share_one_file(tmp_path: Path) -> None:
    """Three processes write and count hits in one file at once: no lost writes, no lost hits, no errors."""
    path = tmp_path / "shared.db"
    with SQLiteStore(path) as store:
        store.put(Record(key="shared", value=b"s"))
    workers, count = 3, 150
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"}
    code = "from tests.integration.test_store_crash import run_concurrent_writer as w; w({!r}, {}, {})"
    children = [
        subprocess.Popen([sys.executable, "-c", code.format(str(path), w, count)], cwd=REPO, env=env)
        for w in range(workers)
    ]
    assert [c.wait() for c in children] == [0] * workers
    with SQLiteStore(path) as store:
        found = {r.key: r.value for r in store.scan()}
        expected = {f"w{w}-{i}": payload(w * count + i) for w in range(workers) for i in range(count)}
        assert found == {**expected, "shared": b"s"}
        assert store.peek("shared").hits == workers * count  # type: ignore[union-attr]
        assert store.stats.corrupt_reads == 0
