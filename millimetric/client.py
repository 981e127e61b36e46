"""`Client`: send events from Python without ever blocking the caller, and say what was accepted.

`track()` stamps the event with its `event_id` and time, appends it to a bounded in-memory queue
and returns; one background thread per client and process takes up to `max_batch` events at a
time (or whatever is queued once `flush_interval_s` passed) and posts them to `/v1/batch`. It
retries 429, 503, other transient statuses and network errors with backoff (`backoff.py`), always
resending the same bytes, so a retry carries the same `event_id` and timestamp and the warehouse
collapses any repeat. It splits a batch the gateway answers 413 for, and takes the events a 400
names out of their batch and resends the rest. Nothing is dropped silently: an event that cannot
be delivered (queue full, refused for good, still unsent when `close()` gave up) is passed to
`on_error` in a `Failure` and counted.

Standard library only (http.client, json, gzip, threading), so it can be installed and vendored
without the pipeline's dependencies.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from millimetric.backoff import RETRYABLE, delay_s
from millimetric.transport import NETWORK_ERRORS, Answer, Transport

log = logging.getLogger("millimetric.client")

# (route, body, future): "batch" for a track event; identify and forget go to their own routes
Message = tuple[str, dict[str, Any], "Future[str] | None"]


@dataclass(frozen=True, slots=True)
class Failure:
    """Events the gateway did not accept and never will from this client, and why.

    `reason` is the gateway's error code (`invalid_payload`, `invalid_api_key`, ...) or the
    client's own: `queue_full`, `unserializable`, `closed` (still unsent when close() gave up).
    """

    reason: str
    message: str
    events: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class FlushResult:
    """Events accepted and failed since the previous flush()/close(), and those still unsettled
    when the wait ran out (0 when the flush completed)."""

    accepted: int
    failed: int
    pending: int
    reasons: dict[str, int] = field(default_factory=dict)  # failed events by Failure.reason

    @property
    def ok(self) -> bool:
        """True when every event was accepted."""
        return not self.failed and not self.pending


class RejectedError(Exception):
    """Set on the future of forget() when the gateway refused it."""


def _iso(seconds: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{int(seconds * 1000) % 1000:03d}Z"


def _json_default(value: object) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(body: dict[str, Any]) -> bytes:
    """One event as compact JSON; its timestamp (epoch seconds when the client set it) as ISO."""
    if isinstance(body.get("timestamp"), float | int):
        body = {**body, "timestamp": _iso(body["timestamp"])}
    return json.dumps(
        body, separators=(",", ":"), allow_nan=False, default=_json_default, ensure_ascii=False
    ).encode()


class Client:
    """A non-blocking, batching, retrying sender of events to one project (see the module doc)."""

    def __init__(
        self,
        host: str,
        key: str,
        *,
        max_batch: int = 500,
        flush_interval_s: float = 1.0,
        max_queue: int = 100_000,
        on_error: Callable[[Failure], None] | None = None,
        max_batch_bytes: int = 512 * 1024,
        timeout_s: float = 15.0,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        if not key:
            raise ValueError("key is required (MILLIMETRIC_KEY)")
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.host, self.key = host, key
        self.max_batch, self.flush_interval_s, self.max_queue = (
            max_batch,
            flush_interval_s,
            max_queue,
        )
        self.max_batch_bytes, self.timeout_s = max_batch_bytes, timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.on_error = on_error
        Transport(host, key, timeout_s)  # a bad host fails here, not in the sender
        self._closed = False
        self._fresh()
        _LIVE.add(self)

    def _fresh(self) -> None:
        """New queue, counters, lock and (lazily) sender: at start, and in a forked child."""
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Message] = deque()
        self._oldest = 0.0  # monotonic time the oldest queued event waits since
        self._flushing = 0  # flush() callers waiting: send partial batches now
        self._closing = False
        self._abandon = threading.Event()  # close() gave up: stop retrying
        self._sender: threading.Thread | None = None
        self._transport = Transport(self.host, self.key, self.timeout_s)
        self._byte_cap = self.max_batch_bytes  # lowered when the gateway answers 413
        self._queued = 0  # events ever queued; the sender settles them in order
        self._settled = 0
        self.accepted = 0
        self.failed: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()  # by cause: "429", "503", "network", ...
        self.splits = 0
        self._reported = (0, Counter[str]())

    # --- the caller's side: never blocks on the network ------------------------------------

    def track(
        self,
        event: str,
        properties: dict[str, Any] | None = None,
        *,
        anonymous_id: str | None = None,
        user_id: str | None = None,
        url: str | None = None,
        referrer: str | None = None,
        timestamp: datetime | str | float | None = None,
    ) -> str:
        """Queue one event and return its event_id (retries reuse it)."""
        event_id = os.urandom(16).hex()
        body: dict[str, Any] = {
            "event": event,
            "event_id": event_id,
            "timestamp": time.time() if timestamp is None else timestamp,
        }
        if properties:
            body["properties"] = dict(properties)  # the caller may reuse its dict
        if anonymous_id is not None:
            body["anonymous_id"] = anonymous_id
        if user_id is not None:
            body["user_id"] = user_id
        if url is not None:
            body["url"] = url
        if referrer is not None:
            body["referrer"] = referrer
        self._enqueue(("batch", body, None))
        return event_id

    def identify(
        self, anonymous_id: str, user_id: str, traits: dict[str, Any] | None = None
    ) -> None:
        """Queue a link of `anonymous_id` to `user_id` (POST /v1/identify), after earlier events."""
        body = {"anonymous_id": anonymous_id, "user_id": user_id, "timestamp": time.time()}
        if traits:
            body["traits"] = dict(traits)
        self._enqueue(("identify", body, None))

    def forget(self, user_id: str | None = None, anonymous_id: str | None = None) -> Future[str]:
        """Queue an erasure (sk_ keys), sent after every event queued before it; the future gives
        its forget_id once accepted, or raises RejectedError."""
        if user_id is None and anonymous_id is None:
            raise ValueError("forget needs user_id, anonymous_id or both")
        body = {k: v for k, v in (("user_id", user_id), ("anonymous_id", anonymous_id)) if v}
        future: Future[str] = Future()
        self._enqueue(("forget", body, future))
        return future

    def _enqueue(self, message: Message) -> None:
        with self._cond:
            refused = "closed" if self._closed else ""
            if not refused and len(self._queue) >= self.max_queue:
                refused = "queue_full"
            if not refused:
                self._queue.append(message)
                self._queued += 1
                size = len(self._queue)
                if size == 1:
                    self._oldest = time.monotonic()
                    self._cond.notify()
                elif size == self.max_batch:
                    self._cond.notify()
                if self._sender is None:
                    self._start_sender()
        if refused:
            why = "the client is closed" if self._closed else f"{self.max_queue} events queued"
            self._report(refused, why, [message], settles=False)

    def _start_sender(self) -> None:
        self._sender = threading.Thread(target=self._run, name="millimetric-sender", daemon=True)
        self._sender.start()

    # --- flush and close ---------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Send everything queued so far and wait (at most `timeout` s) until each event was
        accepted or failed; return the counts since the previous flush()."""
        pending = self._wait(timeout)
        with self._cond:
            return self._result(pending)

    def _wait(self, timeout: float | None) -> int:
        """Wait until every event queued before the call is settled; return how many are not."""
        with self._cond:
            target = self._queued
            if threading.current_thread() is not self._sender:  # on_error may call flush
                self._flushing += 1
                self._cond.notify_all()
                try:
                    self._cond.wait_for(lambda: self._settled >= target, timeout)
                finally:
                    self._flushing -= 1
            return max(0, target - self._settled)

    def _result(self, pending: int) -> FlushResult:
        accepted, failed = self._reported
        self._reported = (self.accepted, self.failed.copy())
        reasons = self.failed - failed
        return FlushResult(self.accepted - accepted, sum(reasons.values()), pending, dict(reasons))

    def close(self, timeout: float | None = None) -> FlushResult:
        """Flush, waiting at most `timeout` (default `shutdown_timeout_s`), then stop; events still
        queued then are failed as `closed` (on_error), so none is lost without a word. `pending`
        counts those still in flight: if the gateway answers, they are settled later still."""
        with self._cond:
            if self._closed:
                return self._result(0)
            self._closing = True
            self._cond.notify_all()
        self._wait(self.shutdown_timeout_s if timeout is None else timeout)
        with self._cond:
            self._closed = True
            leftover = list(self._queue)
            self._queue.clear()
        self._abandon.set()  # whatever is still in flight gets one last answer, no retry
        if leftover:
            self._report("closed", "still queued when close() gave up", leftover)
        _LIVE.discard(self)
        with self._cond:
            return self._result(max(0, self._queued - self._settled))

    # --- the sender thread -------------------------------------------------------------------

    def _due(self) -> bool:
        size = len(self._queue)
        return bool(size) and (
            size >= self.max_batch
            or bool(self._flushing)
            or self._closing
            or time.monotonic() - self._oldest >= self.flush_interval_s
        )

    def _take(self) -> list[Message]:
        first = self._queue.popleft()
        taken = [first]
        if first[0] == "batch":
            while self._queue and len(taken) < self.max_batch and self._queue[0][0] == "batch":
                taken.append(self._queue.popleft())
        return taken

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due():
                    if self._closing and not self._queue:
                        return
                    wait = self.flush_interval_s - (time.monotonic() - self._oldest)
                    self._cond.wait(wait if self._queue else None)
                messages = self._take()
            try:
                self._deliver(messages)
            except Exception:  # a bug must cost these events, not the sender thread
                log.exception("millimetric: sender failed on %d events", len(messages))
                self._report("client_error", "see the log", messages)

    def _deliver(self, messages: list[Message]) -> None:
        route, body, future = messages[0]
        if route != "batch":
            answer = self._send(route, encode(body))
            if answer is not None and answer.status == 202:
                self._accept(1)
                if future is not None:
                    future.set_result(str(answer.body.get("forget_id", "")))
            else:
                self._refuse(answer, messages)
            return
        encoded: list[tuple[Message, bytes]] = []
        for message in messages:
            try:
                encoded.append((message, encode(message[1])))
            except (TypeError, ValueError) as error:
                self._report("unserializable", str(error), [message])
        chunk: list[tuple[Message, bytes]] = []
        size = 0
        for item in encoded:
            if chunk and size + len(item[1]) + 1 > self._byte_cap:
                self._post_batch(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += len(item[1]) + 1
        if chunk:
            self._post_batch(chunk)

    def _post_batch(self, items: list[tuple[Message, bytes]]) -> None:
        work = [items]
        while work:
            part = work.pop()
            body = b'{"events":[' + b",".join(data for _, data in part) + b"]}"
            answer = self._send("batch", body)
            if answer is not None and answer.status == 202:
                self._accept(len(part))
            elif answer is not None and answer.status == 413 and len(part) > 1:
                self._byte_cap = max(1024, min(self._byte_cap, len(body) // 2))
                self.splits += 1
                half = len(part) // 2
                work += [part[half:], part[:half]]  # the first half is sent first
            elif answer is not None and (bad := _bad_indexes(answer, len(part))):
                for index, message in sorted(bad.items()):
                    self._report(answer.error, message, [part[index][0]])
                rest = [item for i, item in enumerate(part) if i not in bad]
                if rest:
                    work.append(rest)
            else:
                self._refuse(answer, [message for message, _ in part])

    def _send(self, route: str, body: bytes) -> Answer | None:
        """POST until an answer that is not worth retrying; None when close() gave up."""
        attempt = 0
        while not self._abandon.is_set():
            retry_after = None
            try:
                answer = self._transport.post(route, body)
            except NETWORK_ERRORS:
                cause = "network"
            else:
                if answer.status not in RETRYABLE:
                    return answer
                cause, retry_after = str(answer.status), answer.retry_after
            with self._cond:
                self.retries[cause] += 1
            self._abandon.wait(delay_s(attempt, retry_after))
            attempt += 1
        return None

    # --- settling: every queued event ends up accepted or reported ---------------------------

    def _accept(self, count: int) -> None:
        with self._cond:
            self.accepted += count
            self._settled += count
            self._cond.notify_all()

    def _refuse(self, answer: Answer | None, messages: list[Message]) -> None:
        if answer is None:
            self._report("closed", "still unsent when close() gave up", messages)
        else:
            reason = answer.error or f"http_{answer.status}"
            self._report(reason, str(answer.body.get("message", "")), messages)

    def _report(
        self, reason: str, message: str, messages: list[Message], settles: bool = True
    ) -> None:
        with self._cond:
            self.failed[reason] += len(messages)
            if settles:
                self._settled += len(messages)
                self._cond.notify_all()
        for _, _, future in messages:
            if future is not None and not future.done():
                future.set_exception(RejectedError(f"{reason}: {message}"))
        failure = Failure(reason, message, [body for _, body, _ in messages])
        if self.on_error is None:
            log.warning(
                "millimetric: %d events not accepted: %s %s", len(messages), reason, message
            )
            return
        try:
            self.on_error(failure)
        except Exception:  # the application's handler must not stop the sender
            log.exception("millimetric: on_error raised")


def _bad_indexes(answer: Answer, size: int) -> dict[int, str]:
    """The events a 400 names (index -> message): the batch minus them can be resent."""
    if answer.status != 400 or answer.error != "invalid_payload":
        return {}
    bad: dict[int, str] = {}
    for detail in answer.body.get("details") or []:
        index = detail.get("index") if isinstance(detail, dict) else None
        if isinstance(index, int) and 0 <= index < size:
            bad.setdefault(index, str(detail.get("message", "")))
    return bad


_LIVE: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's queue is the parent's to send; the child starts empty with its own thread.
    for client in list(_LIVE):
        client._fresh()


def _close_all() -> None:
    for client in list(_LIVE):
        client.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all)
