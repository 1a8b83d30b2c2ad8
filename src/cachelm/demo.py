"""``python -m cachelm.demo``: the exact response cache end to end, offline, on the embedded default store.

It needs no network, no upstream and no model download: the "model" is a deterministic local function that
returns OpenAI-shaped answers after a simulated 40 ms of work. The demo walks through misses and hits,
single-flight (eight concurrent identical requests, one computation), the sampled-request rule,
invalidation by tag, a tool call cached with `memoize`, export and import as JSONL, and the metrics
snapshot. Every step checks its own outcome (a reused answer must equal a recomputed one) and the demo
exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachelm.metrics import CacheMetrics
from cachelm.response.exact import ExactCache
from cachelm.response.memoize import memoize
from cachelm.store.sqlite import SQLiteStore

MODEL = "gpt-4o-mini"
WORK_S = 0.04  # simulated upstream latency per call


class LocalModel:
    """A deterministic stand-in for an LLM API: the same request always gets the same answer."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        time.sleep(WORK_S)
        question = request["messages"][-1]["content"]
        digest = hashlib.sha256(question.encode()).hexdigest()[:8]
        content = f"Answer {digest}: {question[::-1]}"
        prompt_tokens = sum(len(m["content"].split()) for m in request["messages"])
        completion_tokens = len(content.split())
        return {
            "id": f"chatcmpl-{digest}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": request["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def ask(question: str, **params: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are a helpful support assistant."},
            {"role": "user", "content": question},
        ],
        **params,
    }


class Demo:
    def __init__(self, workdir: Path, out: Any) -> None:
        self.workdir = workdir
        self.out = out
        self.model = LocalModel()
        self.store = SQLiteStore(workdir / "cache.db")
        self.store.clear()  # a kept folder from an earlier run: its answers would turn misses into hits
        self.cache = ExactCache(self.store, metrics=CacheMetrics())
        self.failures: list[str] = []

    def say(self, text: str = "") -> None:
        print(text, file=self.out)

    def check(self, ok: bool, what: str) -> None:
        self.say(f"  {'ok ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)

    def timed(self, question: str, **options: Any) -> tuple[dict[str, Any], bool, float]:
        request = ask(question)
        start = time.perf_counter()
        response, hit = self.cache.get_or_compute(request, lambda: self.model(request), **options)
        return response, hit, (time.perf_counter() - start) * 1000

    def step_hits(self) -> None:
        self.say("1. Misses, then hits (SQLite store, WAL)")
        questions = ["How do I reset my password?", "What are your opening hours?", "Can I get a refund?"]
        for round_ in ("first", "again"):
            for q in questions:
                _, hit, ms = self.timed(q, tags=["faq"])
                self.say(f"  {round_:5s} {'HIT ' if hit else 'MISS'} {ms:6.2f} ms  {q}")
        fresh = LocalModel()(ask(questions[0]))
        cached = self.cache.lookup(ask(questions[0]))
        self.check(cached is not None and cached.response == fresh, "a reused answer equals a recomputed one")
        self.check(self.model.calls == 3, f"the model ran 3 times for 6 requests (ran {self.model.calls})")

    def step_single_flight(self) -> None:
        self.say("\n2. Single-flight: 8 concurrent identical requests")
        before = self.model.calls
        results: list[tuple[dict[str, Any], bool]] = []
        request = ask("Where is my order #1234?")

        def worker() -> None:
            results.append(self.cache.get_or_compute(request, lambda: self.model(request)))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ran = self.model.calls - before
        self.check(ran == 1, f"the model ran {ran} time(s) for 8 concurrent requests")
        self.check(len({r["id"] for r, _ in results}) == 1, "all 8 callers got the same answer")

    def step_sampled(self) -> None:
        self.say("\n3. Sampled requests (temperature > 0) are not served from the cache by default")
        request = ask("Write a haiku about caches.", temperature=0.9)
        before = self.model.calls
        for _ in range(2):
            self.cache.get_or_compute(request, lambda: self.model(request))
        self.check(self.model.calls - before == 2, "two sampled calls reached the model twice")

    def step_invalidate(self) -> None:
        self.say("\n4. Invalidation by tag")
        removed = self.cache.invalidate_tag("faq")
        self.check(removed == 3, f"invalidate_tag('faq') removed {removed} entries")
        _, hit, _ = self.timed("What are your opening hours?", tags=["faq"])
        self.check(not hit, "the next request for an invalidated answer is a miss and is recomputed")

    def step_memoize(self) -> None:
        self.say("\n5. A tool call cached with @memoize")
        calls: list[str] = []

        @memoize(self.cache, ttl=3600, namespace="demo.weather")
        def weather(city: str, unit: str = "C") -> dict[str, Any]:
            calls.append(city)
            return {"city": city, "temp": 10 + len(city), "unit": unit}

        first, second = weather("Oslo"), weather(city="Oslo", unit="C")
        self.check(first == second and calls == ["Oslo"], "weather('Oslo') ran once for two calls")

    def step_export_import(self) -> None:
        self.say("\n6. Export and import as JSONL")
        dump = io.StringIO()
        exported = self.cache.export_jsonl(dump)
        path = self.workdir / "export.jsonl"
        path.write_text(dump.getvalue(), encoding="utf-8")
        with SQLiteStore(self.workdir / "copy.db") as copy_store:
            copy_store.clear()  # as cache.db: start from an empty copy
            copy = ExactCache(copy_store)
            with path.open(encoding="utf-8") as fp:
                imported = copy.import_jsonl(fp)
            hit = copy.lookup(ask("Where is my order #1234?"))
        self.say(f"  exported {exported} entries to {path.name}, imported {imported} into copy.db")
        self.check(imported == exported and hit is not None, "the imported copy serves the same answers")

    def step_metrics(self) -> None:
        self.say("\n7. Metrics snapshot")
        snap = self.cache.metrics.snapshot()
        for layer, stats in sorted(snap["layers"].items()):
            line = f"  {layer:6s} hits {stats['hits']:3d}  misses {stats['misses']:3d}"
            line += f"  hit rate {stats['hit_rate']:.0%}"
            lookup = stats.get("lookup_latency")
            if lookup:
                line += f"  lookup P50 {lookup['p50_ms']:.3f} ms  P95 {lookup['p95_ms']:.3f} ms"
            self.say(line)
        exact = snap["layers"]["exact"]
        compute = exact.get("compute_latency", {})
        self.say(f"  compute P50 {compute.get('p50_ms', float('nan')):.1f} ms (the simulated model)")
        self.say(
            f"  tokens saved {snap['totals']['tokens_saved']}, estimated cost saved "
            f"${snap['totals']['cost_saved_usd']:.6f} ({MODEL} list price), coalesced {exact['coalesced']}"
        )
        self.check(exact["hits"] > 0 and exact["misses"] > 0, "hits and misses were counted")

    def run(self) -> int:
        self.say(f"cachelm demo: store {self.store.url}\n")
        try:
            for step in (
                self.step_hits,
                self.step_single_flight,
                self.step_sampled,
                self.step_invalidate,
                self.step_memoize,
                self.step_export_import,
                self.step_metrics,
            ):
                step()
        finally:
            self.store.close()
        self.say(f"\n{'all checks passed' if not self.failures else f'{len(self.failures)} check(s) FAILED'}")
        return 0 if not self.failures else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cachelm.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--keep", metavar="DIR", type=Path, help="write the store and export here and keep them"
    )
    args = parser.parse_args(argv)
    if args.keep:
        try:
            args.keep.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"`--keep` must be a folder, got {str(args.keep)!r}: {exc.strerror}")
        return Demo(args.keep, sys.stdout).run()
    with tempfile.TemporaryDirectory(prefix="cachelm-demo-") as tmp:
        return Demo(Path(tmp), sys.stdout).run()


if __name__ == "__main__":
    sys.exit(main())
