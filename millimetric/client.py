"""`Client`: send events from Python without ever blocking the caller, and say what was accepted.

`track()` stamps the event with its `event_id` and time, appends it to a bounded in-memory queue
and returns; one background thread per client and process takes up to `max_batch` events at a
time (or whatever is queued once `flush_interval_s` passed) and hands them to `delivery.py`, which
posts them to `/v1/batch`, retries, splits, and settles each one: accepted, or passed to
`on_error` in a `Failure` and counted (so nothing is dropped silently; a full queue and a closed
client are failures too). Retries resend the same bytes, so the same `event_id` and timestamp,
which the warehouse collapses.

Standard library only (http.client, json, gzip, threading), so it can be installed and vendored
without the pipeline's dependencies.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from millimetric.delivery import Delivery
from millimetric.messages import Failure, FlushResult, Message, RejectedError
from millimetric.transport import Transport

log = logging.getLogger("millimetric.client")
ABANDON_JOIN_S = 1.0  # after close() gave up: how long the in-flight batch may take to settle


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
        transport = Transport(self.host, self.key, self.timeout_s)
        self._delivery = Delivery(
            transport, self.max_batch_bytes, self._accept, self._report, self._abandon
        )
        self._queued = 0  # events ever queued; the sender settles them in order
        self._settled = 0
        self.accepted = 0
        self.failed: Counter[str] = Counter()
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

    @property
    def retries(self) -> Counter[str]:
        """Retries so far, by cause: "429", "503", "network", ..."""
        return self._delivery.retries

    @property
    def splits(self) -> int:
        """Batches split because the gateway answered 413."""
        return self._delivery.splits

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
        sender = self._sender
        if sender is not None and sender is not threading.current_thread():
            sender.join(ABANDON_JOIN_S)  # a backoff cut short settles at once; a request may not
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
                self._delivery.deliver(messages)
            except Exception:  # a bug must cost these events, not the sender thread
                log.exception("millimetric: sender failed on %d events", len(messages))
                self._report("client_error", "see the log", messages)

    # --- settling: every queued event ends up accepted or reported ---------------------------

    def _accept(self, count: int) -> None:
        with self._cond:
            self.accepted += count
            self._settled += count
            self._cond.notify_all()

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
