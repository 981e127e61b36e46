"""Delivery: post what the sender took from the queue until each message is settled.

Track events go to /v1/batch in bodies of at most `byte_cap` bytes. A 413 splits the body in
halves (and lowers `byte_cap` for later batches); a 400 that names events settles those as failed
and resends the rest; transient answers and network errors are retried with `backoff.delay_s`,
resending the same bytes. Every message ends in exactly one call of `accept` or `report`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from millimetric.backoff import RETRYABLE, delay_s
from millimetric.messages import Message, encode
from millimetric.transport import NETWORK_ERRORS, Answer, Transport

Accept = Callable[[int], None]  # so many messages were accepted
Report = Callable[[str, str, list[Message]], None]  # (reason, message, messages): never will be


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


class Delivery:
    """The sender thread's side: one transport, the retry loop, splitting; not thread-safe."""

    def __init__(
        self,
        transport: Transport,
        byte_cap: int,
        accept: Accept,
        report: Report,
        abandon: threading.Event,
    ) -> None:
        self.transport = transport
        self.byte_cap = byte_cap
        self.accept, self.report = accept, report
        self.abandon = abandon  # set by close() when it gives up: no more retries
        self.retries: Counter[str] = Counter()  # by cause: "429", "503", "network", ...
        self.splits = 0

    def deliver(self, messages: list[Message]) -> None:
        """Settle these messages: one identify or forget, or consecutive track events."""
        route, body, future = messages[0]
        if route != "batch":
            answer = self._send(route, encode(body))
            if answer is not None and answer.status == 202:
                self.accept(1)
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
                self.report("unserializable", str(error), [message])
        chunk: list[tuple[Message, bytes]] = []
        size = 0
        for item in encoded:
            if chunk and size + len(item[1]) + 1 > self.byte_cap:
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
                self.accept(len(part))
            elif answer is not None and answer.status == 413 and len(part) > 1:
                self.byte_cap = max(1024, min(self.byte_cap, len(body) // 2))
                self.splits += 1
                half = len(part) // 2
                work += [part[half:], part[:half]]  # the first half is sent first
            elif answer is not None and (bad := _bad_indexes(answer, len(part))):
                for index, message in sorted(bad.items()):
                    self.report(answer.error, message, [part[index][0]])
                rest = [item for i, item in enumerate(part) if i not in bad]
                if rest:
                    work.append(rest)
            else:
                self._refuse(answer, [message for message, _ in part])

    def _send(self, route: str, body: bytes) -> Answer | None:
        """POST until an answer that is not worth retrying; None when close() gave up."""
        attempt = 0
        while not self.abandon.is_set():
            retry_after = None
            try:
                answer = self.transport.post(route, body)
            except NETWORK_ERRORS:
                cause = "network"
            else:
                if answer.status not in RETRYABLE:
                    return answer
                cause, retry_after = str(answer.status), answer.retry_after
            self.retries[cause] += 1
            self.abandon.wait(delay_s(attempt, retry_after))
            attempt += 1
        return None

    def _refuse(self, answer: Answer | None, messages: list[Message]) -> None:
        if answer is None:
            self.report("closed", "still unsent when close() gave up", messages)
        else:
            reason = answer.error or f"http_{answer.status}"
            self.report(reason, str(answer.body.get("message", "")), messages)
