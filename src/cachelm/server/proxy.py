"""The proxy's request path: exact lookup → semantic lookup → single-flight miss → upstream → store.

`Proxy.complete` serves ``/v1/chat/completions`` and ``/v1/completions``. The hit path is kept short on
purpose (one key computation, one L1 read, one JSON encode); everything a miss needs lives in `_lead`.

In-process single-flight is a dict of futures rather than `response.singleflight.AsyncSingleFlight`: the
leader of a *streaming* miss must forward chunks to its own client while the computation runs, which a
result-only flight cannot express. Streaming followers tail the leader's frames live (`Broadcast`);
the others wait for the leader's `Outcome` and replay it. Across
replicas the leader additionally takes the Redis lock (`shared.RedisLocks`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse

from cachelm.errors import BackendError
from cachelm.governance.journal import RequestLog
from cachelm.keys import is_sampled
from cachelm.response.exact import CachedResponse, ExactCache, cacheable_response
from cachelm.server.control import CacheControl
from cachelm.server.observability import ServerMetrics
from cachelm.server.semantic_layer import SemanticLayer, same_answer
from cachelm.server.shared import Invalidator, Lease, RedisLocks
from cachelm.server.sse import DONE, StreamRecorder, frame, replay
from cachelm.server.tenants import Tenant
from cachelm.server.upstream import Upstream, UpstreamError

log = logging.getLogger("cachelm.server")

PATHS = {"chat.completions": "chat/completions", "completions": "completions"}
JSON = "application/json"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@dataclass(slots=True)
class Outcome:
    """How a flight ended. `response` is set for a successful answer (stored or not)."""

    status: int
    body: bytes  # what a non-streaming caller receives
    response: dict[str, Any] | None = None
    created: float | None = None  # set when the answer came from the store (another replica's flight)
    storable: bool = True  # False: `response` is whole for its clients but must not be cached
    headers: dict[str, str] = field(default_factory=dict)  # an upstream error's retry-after & co.


@dataclass(slots=True)
class Call:
    """One request on the completion path."""

    endpoint: str
    body: dict[str, Any]
    raw: bytes
    tenant: Tenant
    user: str
    control: CacheControl
    request_id: str
    start: float
    saved_tokens: int = 0  # tokens a hit saved (for the dashboard's time series)
    saved_cost: float = 0.0
    verify: Any = None  # (SemanticCache, Candidate): a semantic candidate to check against the fresh answer

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def include_usage(self) -> bool:
        options = self.body.get("stream_options")
        return isinstance(options, Mapping) and options.get("include_usage") is True

    @property
    def expected_choices(self) -> int:
        """How many choices a whole answer has: ``n``, times the prompts of a batched legacy completion."""
        n = self.body.get("n")
        count = n if isinstance(n, int) else 1
        prompt = self.body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
            count *= len(prompt)  # one prompt of token ids is a list of ints, a batch a list of lists
        return count

    def upstream_body(self) -> bytes:
        """The body sent upstream: as received, minus cachelm's own ``cache`` field."""
        if "cache" not in self.body:
            return self.raw
        return orjson.dumps({k: v for k, v in self.body.items() if k != "cache"})

    def upstream_body_with_usage(self) -> bytes:
        """`upstream_body` with ``stream_options.include_usage`` set."""
        body = {k: v for k, v in self.body.items() if k != "cache"}
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, Mapping) else {}), "include_usage": True}
        return orjson.dumps(body)


def error_body(message: str, *, kind: str = "upstream_error", code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


class Proxy:
    """Everything a completion request touches. Built by `app.build_app`."""

    def __init__(
        self,
        *,
        cache: ExactCache,
        upstream: Upstream,
        metrics: ServerMetrics,
        hit_floor_ms: float = 0.0,
        semantic: SemanticLayer | None = None,
        semantic_default: bool = True,
        locks: RedisLocks | None = None,
        invalidator: Invalidator | None = None,
        origin: str = "",
        stream_usage: bool = True,
        request_log: RequestLog | None = None,
    ) -> None:
        self.cache = cache
        self.upstream = upstream
        self.metrics = metrics
        self.hit_floor_s = hit_floor_ms / 1000
        self.semantic = semantic
        self.semantic_default = semantic_default
        self.locks = locks
        self.invalidator = invalidator
        self.origin = origin
        self.stream_usage = stream_usage  # ask streaming upstreams for usage (stream_options.include_usage)
        self.request_log = request_log
        self._flights: dict[str, asyncio.Future[Outcome]] = {}
        # Streaming flights by key, with whether their leader asked for usage (followers that asked the
        # same tail the frames live; the others wait for the outcome and get their own replay).
        self._streams: dict[str, tuple[Broadcast, bool]] = {}
        self._background: set[asyncio.Task[None]] = set()  # strong references until they finish
        self.upstream_calls = 0

    # -- entry -----------------------------------------------------------------------------------------

    async def complete(self, call: Call) -> tuple[Response, str]:
        """Answer `call`; returns the response and its cache outcome (hit, semantic-hit, miss, bypass)."""
        control = call.control
        if control.bypass or (is_sampled(call.body) and not control.sampled):
            if not control.bypass:
                self.cache.metrics.bypass("exact", "sampled")
            return await self._forward(call), "bypass"
        if not control.refresh:
            cached = self.cache.lookup(
                call.body, tenant=call.tenant.tenant_id, endpoint=call.endpoint, allow_sampled=control.sampled
            )
            if cached is not None:
                return await self._serve_hit(call, cached, "hit"), "hit"
            if self._semantic_on(call):
                found = await self._semantic_lookup(call)
                if found is not None:
                    return await self._serve_hit(call, found, "semantic-hit"), "semantic-hit"
        response = await self._miss(call)
        # A coalesced answer is the hit its header says (no upstream call of its own): count it as one.
        return response, response.headers.get("x-cachelm-cache", "miss")

    def _semantic_on(self, call: Call) -> bool:
        wanted = call.control.semantic if call.control.semantic is not None else self.semantic_default
        return wanted and self.semantic is not None

    # -- hits ------------------------------------------------------------------------------------------

    async def _serve_hit(self, call: Call, cached: CachedResponse, kind: str) -> Response:
        usage = cached.response.get("usage")
        if isinstance(usage, Mapping):
            prompt, completion = _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")
            call.saved_tokens = prompt + completion
            price = self.cache.metrics.price(cached.model)
            call.saved_cost = 0.0 if price is None else price.cost(prompt, completion)
        headers = {
            "x-cachelm-cache": kind,
            "x-cachelm-age": str(int(cached.age(time.time()))),
            "x-request-id": call.request_id,
        }
        floor = call.tenant.hit_floor_ms / 1000 if call.tenant.hit_floor_ms is not None else self.hit_floor_s
        if floor:
            # Constant-latency padding: every hit takes at least `floor`, so hit timing says less about
            # which tier answered (or whether another caller of the tenant asked before).
            remaining = floor - (time.perf_counter() - call.start)
            if remaining > 0:
                await asyncio.sleep(remaining)
        if call.stream:
            frames = replay(call.endpoint, cached.response, include_usage=call.include_usage)
            return StreamingResponse(
                _iterate(frames), media_type="text/event-stream", headers={**headers, **SSE_HEADERS}
            )
        return Response(orjson.dumps(cached.response), media_type=JSON, headers=headers)

    async def _semantic_lookup(self, call: Call) -> CachedResponse | None:
        """A semantic hit served from the entry it points at; None on a miss or any failure."""
        semantic = self.semantic
        assert semantic is not None
        try:
            hit, call.verify = await asyncio.to_thread(
                semantic.search,
                call.body,
                tenant=call.tenant.tenant_id,
                delta=call.control.delta,
                user=call.user,  # header or body: the question vector cached on the way is theirs
            )
        except BackendError:
            self.cache.metrics.error("semantic", "backend")
            return None
        if hit is None:
            self.cache.metrics.miss("semantic", tenant=call.tenant.tenant_id)
            return None
        found = self._peek(hit.response_key)
        if found is None or found.tenant != call.tenant.tenant_id:
            # The entry was evicted or erased (or, defence in depth, belongs to another tenant).
            self.cache.metrics.miss("semantic", tenant=call.tenant.tenant_id)
            return None
        self.cache.metrics.hit(
            "semantic", tenant=call.tenant.tenant_id, model=found.model, usage=found.response.get("usage")
        )
        return found

    async def _verify(self, call: Call, response: dict[str, Any]) -> None:
        """Report whether the semantic candidate of `call` would have been right (δ-bounded protocol)."""
        facade, candidate = call.verify
        stored = self._peek(candidate.response_key)
        if stored is None:
            return
        correct = same_answer(stored.response, response)
        try:
            await asyncio.to_thread(facade.feedback, candidate.entry_id, correct)
        except BackendError:
            self.cache.metrics.error("semantic", "backend")

    def _peek(self, key: str) -> CachedResponse | None:
        """The stored answer under `key` without counting a hit; None when absent or unreadable."""
        try:
            record = self.cache.backend.peek(key)
            response = None if record is None else orjson.loads(record.value)
        except (BackendError, orjson.JSONDecodeError):
            return None
        if record is None or not isinstance(response, dict):
            return None
        return CachedResponse(
            key=key,
            response=response,
            created=record.created,
            hits=record.hits,
            tenant=record.tenant,
            model=record.model,
            tags=record.tags,
            expires=record.expires,
        )

    # -- bypass ----------------------------------------------------------------------------------------

    async def _forward(self, call: Call) -> Response:
        """Call upstream without touching the cache (bypass, or a sampled request)."""
        headers = {"x-cachelm-cache": "bypass", "x-request-id": call.request_id}
        self.upstream_calls += 1
        self.metrics.upstream_calls.labels(call.endpoint).inc()
        path = PATHS[call.endpoint]
        if not call.stream:
            try:
                status, body = await self.upstream.post(
                    path, call.upstream_body(), tenant=call.tenant.tenant_id
                )
            except UpstreamError as exc:
                return Response(
                    exc.body or error_body(str(exc)),
                    status_code=exc.status,
                    media_type=JSON,
                    headers={**headers, **exc.headers},
                )
            return Response(body, status_code=status, media_type=JSON, headers=headers)
        events = self.upstream.stream(path, call.upstream_body(), tenant=call.tenant.tenant_id)
        try:
            first = await anext(events)
        except UpstreamError as exc:
            return Response(
                exc.body or error_body(str(exc)),
                status_code=exc.status,
                media_type=JSON,
                headers={**headers, **exc.headers},
            )
        except StopAsyncIteration:
            return Response(
                error_body("upstream sent an empty stream"), status_code=502, media_type=JSON, headers=headers
            )

        async def relay() -> AsyncIterator[bytes]:
            yield frame(first)
            try:
                async for payload in events:
                    yield frame(payload)
            except UpstreamError as exc:
                yield frame(error_body(str(exc)))

        return StreamingResponse(relay(), media_type="text/event-stream", headers={**headers, **SSE_HEADERS})

    # -- misses ----------------------------------------------------------------------------------------

    async def _miss(self, call: Call) -> Response:
        key = self.cache.key_for(call.body, tenant=call.tenant.tenant_id, endpoint=call.endpoint)
        headers = {"x-cachelm-cache": "miss", "x-cachelm-age": "0", "x-request-id": call.request_id}
        flight = self._flights.get(key)
        if flight is not None:  # follower: tail the leader's stream live, or wait for its outcome and replay
            self.cache.metrics.coalesced("exact")
            live = self._streams.get(key)
            if call.stream and live is not None and live[1] == call.include_usage:
                headers["x-cachelm-cache"], headers["x-cachelm-coalesced"] = "hit", "1"
                return await self._stream_from(live[0], headers)
            outcome = await asyncio.shield(flight)
            headers["x-cachelm-coalesced"] = "1"
            if outcome.response is not None:  # served by the leader's computation: no upstream call of ours
                headers["x-cachelm-cache"] = "hit"
            return self._outcome_response(call, outcome, headers)
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        sink: Broadcast | None = None
        if call.stream:
            sink = Broadcast()
            self._streams[key] = (sink, call.include_usage)
        task = asyncio.ensure_future(self._lead(key, call, sink))
        task.add_done_callback(lambda t: self._land(key, flight, t))
        if sink is None:
            return self._outcome_response(call, await asyncio.shield(flight), headers)
        return await self._stream_from(sink, headers)

    async def _stream_from(self, broadcast: Broadcast, headers: dict[str, str]) -> Response:
        """Stream a flight's frames from its first one; a failure before any frame is a plain HTTP error."""
        reader = broadcast.read()
        first = await anext(reader, None)
        if first is None:  # cannot happen for a flight that ran: it always emits or fails
            return Response(error_body("empty stream"), status_code=502, media_type=JSON, headers=headers)
        if isinstance(first, Outcome):
            return Response(
                first.body, status_code=first.status, media_type=JSON, headers={**headers, **first.headers}
            )
        return StreamingResponse(
            _drain(first, reader), media_type="text/event-stream", headers={**headers, **SSE_HEADERS}
        )

    def _land(self, key: str, flight: asyncio.Future[Outcome], task: asyncio.Task[Outcome]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
            self._streams.pop(key, None)
        if task.cancelled():
            flight.set_result(Outcome(status=503, body=error_body("request cancelled")))
        elif task.exception() is not None:
            exc = task.exception()
            log.error("flight failed", exc_info=exc)
            flight.set_result(Outcome(status=500, body=error_body(f"internal error: {type(exc).__name__}")))
        else:
            flight.set_result(task.result())

    def _outcome_response(self, call: Call, outcome: Outcome, headers: dict[str, str]) -> Response:
        if outcome.created is not None:
            headers["x-cachelm-age"] = str(int(max(0.0, time.time() - outcome.created)))
        if call.stream and outcome.response is not None:
            frames = replay(call.endpoint, outcome.response, include_usage=call.include_usage)
            return StreamingResponse(
                _iterate(frames), media_type="text/event-stream", headers={**headers, **SSE_HEADERS}
            )
        return Response(
            outcome.body, status_code=outcome.status, media_type=JSON, headers={**headers, **outcome.headers}
        )

    async def _lead(self, key: str, call: Call, sink: Broadcast | None) -> Outcome:
        """Compute the answer once (across replicas when shared), store it if cacheable, report it."""
        lease: Lease | None = None
        try:
            if self.locks is not None:
                lease, found = await self._acquire(key, refresh=call.control.refresh)
                if found is not None:
                    return self._emit(sink, found, call)
            outcome = await (self._compute_stream(call, sink) if sink is not None else self._compute(call))
            if outcome.response is not None and outcome.storable:
                await self._store(key, call, outcome.response, lease)
                if call.verify is not None:
                    await self._verify(call, outcome.response)
            return outcome
        finally:
            if sink is not None:
                sink.put_nowait(_END)
            if lease is not None:
                # Released off the request path: the answer is stored already, so waiters on other
                # replicas find it on their next poll whether or not the lock is gone yet.
                task = asyncio.ensure_future(lease.release())
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _acquire(self, key: str, *, refresh: bool) -> tuple[Lease | None, Outcome | None]:
        """Take the cross-replica lock of `key`, or wait for its holder's answer. Redis trouble → no lock."""
        assert self.locks is not None
        polls = self.locks.polls()
        try:
            while True:
                lease = await self.locks.try_acquire(key)
                if lease is not None:
                    found = None if refresh else self._peek(key)  # landed between our miss and our lock
                    if found is not None:
                        await lease.release()
                        return None, self._found(found)
                    return lease, None
                if await anext(polls, -1) < 0:
                    self.metrics.degraded.labels("lock_wait_timeout").inc()
                    return None, None
                found = None if refresh else self._peek(key)
                if found is not None:
                    self.cache.metrics.coalesced("exact")
                    return None, self._found(found)
        except BackendError:
            self.metrics.degraded.labels("lock").inc()
            return None, None

    @staticmethod
    def _found(found: CachedResponse) -> Outcome:
        return Outcome(
            status=200, body=orjson.dumps(found.response), response=found.response, created=found.created
        )

    def _emit(self, sink: Broadcast | None, outcome: Outcome, call: Call) -> Outcome:
        if sink is not None and outcome.response is not None:
            for chunk in replay(call.endpoint, outcome.response, include_usage=call.include_usage):
                sink.put_nowait(chunk)
        elif sink is not None:
            sink.put_nowait(outcome)
        return outcome

    async def _compute(self, call: Call) -> Outcome:
        self.upstream_calls += 1
        self.metrics.upstream_calls.labels(call.endpoint).inc()
        started = time.perf_counter()
        try:
            status, body = await self.upstream.post(
                PATHS[call.endpoint], call.upstream_body(), tenant=call.tenant.tenant_id
            )
        except UpstreamError as exc:
            return Outcome(status=exc.status, body=exc.body or error_body(str(exc)), headers=exc.headers)
        self.cache.metrics.observe_compute("exact", time.perf_counter() - started)
        if status != 200:
            return Outcome(status=status, body=body)
        try:
            response = orjson.loads(body)
        except orjson.JSONDecodeError:
            return Outcome(status=502, body=error_body("upstream answered with invalid JSON"))
        ok = isinstance(response, dict) and cacheable_response(response, call.endpoint)
        return Outcome(status=200, body=body, response=response if ok else None)

    async def _compute_stream(self, call: Call, sink: Broadcast) -> Outcome:
        self.upstream_calls += 1
        self.metrics.upstream_calls.labels(call.endpoint).inc()
        started = time.perf_counter()
        recorder = StreamRecorder(call.endpoint, expected_choices=call.expected_choices)
        sent = False
        # Ask for the usage chunk even when this client did not, so the stored answer carries token counts
        # (hits then credit them); the extra chunk is not forwarded to a client that did not ask for it.
        hide_usage = self.stream_usage and not call.include_usage
        body = call.upstream_body() if not hide_usage else call.upstream_body_with_usage()
        try:
            async for payload in self.upstream.stream(
                PATHS[call.endpoint], body, tenant=call.tenant.tenant_id
            ):
                recorder.feed(payload)
                # `[DONE]` is held back until the stream is known to be whole: the SDK stops reading at
                # it, so an error event sent after it would never reach the client.
                if payload == DONE or (hide_usage and _usage_only(payload)):
                    continue
                sink.put_nowait(frame(payload))
                sent = True
            response = recorder.response() if recorder.complete else None
        except UpstreamError as exc:
            failed = Outcome(status=exc.status, body=exc.body or error_body(str(exc)), headers=exc.headers)
            # Before the first event the client still gets a plain HTTP error; after it, an error event
            # (the OpenAI SDK raises on it), so a cut stream is never mistaken for a short answer.
            sink.put_nowait(frame(error_body(str(exc))) if sent else failed)
            return failed
        except Exception as exc:  # anything else (a bug, a client library's surprise) must end the
            # client's stream with an error too, not with a clean end it would take for a whole answer.
            log.error("stream failed", exc_info=exc)
            failed = Outcome(status=502, body=error_body(f"upstream stream failed: {type(exc).__name__}"))
            sink.put_nowait(frame(failed.body) if sent else failed)
            return failed
        self.cache.metrics.observe_compute("exact", time.perf_counter() - started)
        if response is None:
            if not sent:
                failed = Outcome(status=502, body=error_body("upstream sent an empty stream"))
                sink.put_nowait(failed)
                return failed
            incomplete = error_body("upstream stream ended before it was complete")
            sink.put_nowait(frame(incomplete))  # the client must not take a truncated answer for a whole one
            return Outcome(status=502, body=incomplete)
        sink.put_nowait(frame(DONE))
        return Outcome(status=200, body=orjson.dumps(response), response=response, storable=recorder.whole)

    async def _store(self, key: str, call: Call, response: dict[str, Any], lease: Lease | None) -> None:
        if lease is not None and not await lease.holds():
            # Our lease ran out and another replica took the key over: its answer is the one to keep.
            self.metrics.degraded.labels("fenced_write").inc()
            return
        stored = self.cache.store(
            call.body,
            response,
            tenant=call.tenant.tenant_id,
            user=call.user,
            tags=call.control.tags,
            ttl=call.control.ttl,
            endpoint=call.endpoint,
            allow_sampled=call.control.sampled,
        )
        if stored is None:
            return
        if self.request_log is not None:
            await asyncio.to_thread(self._log_request, call, stored)
        if call.control.refresh and self.invalidator is not None:
            await self.invalidator.publish({"key": key, "origin": self.origin})
        if self.semantic is not None:
            try:
                await asyncio.to_thread(
                    self.semantic.add,
                    call.body,
                    tenant=call.tenant.tenant_id,
                    response_key=stored,
                    user=call.user,
                )
            except BackendError:
                self.cache.metrics.error("semantic", "backend")

    def _log_request(self, call: Call, response_key: str) -> None:
        """Log the request behind a stored answer; a failing store is counted, never fails the request."""
        assert self.request_log is not None
        try:
            answer = self.cache.backend.peek(response_key)
            if answer is not None:
                self.request_log.remember(call.body, answer, endpoint=call.endpoint)
        except BackendError:
            self.cache.metrics.error("governance", "backend")


class _End:
    """Marks the end of a flight's frames."""


_END: Any = _End()


class Broadcast:
    """The frames of one streaming flight: every reader gets all of them from the first, as they arrive.

    Items are SSE frames (bytes), or an `Outcome` when the flight failed before its first frame. Appends
    are O(1); frames are kept until the flight is over (a response's worth of bytes).
    """

    def __init__(self) -> None:
        self.items: list[bytes | Outcome] = []
        self.closed = False
        self._changed = asyncio.Event()

    def put_nowait(self, item: bytes | Outcome) -> None:
        if item is _END:
            self.closed = True
        else:
            self.items.append(item)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def read(self) -> AsyncIterator[bytes | Outcome]:
        index = 0
        while True:
            while index < len(self.items):
                yield self.items[index]
                index += 1
            if self.closed:
                return
            await self._changed.wait()


async def _iterate(frames: Any) -> AsyncIterator[bytes]:
    for chunk in frames:
        yield chunk


async def _drain(first: bytes, reader: AsyncIterator[bytes | Outcome]) -> AsyncIterator[bytes]:
    yield first
    async for item in reader:
        if isinstance(item, Outcome):
            return
        yield item


def _usage_only(payload: bytes) -> bool:
    """Whether an SSE payload is the usage-only chunk (``choices: []`` plus ``usage``)."""
    if b'"usage"' not in payload:
        return False
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and chunk.get("usage") is not None


def _tokens(usage: Mapping[str, Any], name: str) -> int:
    value = usage.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
