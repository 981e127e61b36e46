"""Which sink carries out each forget, in batches, retried until done, none blocking the others.

The sinks share the erasures topic through the consumer group `millimetric-erasure`: the one that
owns its partition takes every forget waiting there (up to `forget_batch_max`) and carries them
out together (sinks/erasure_executor.py). A batch that fails is halved until the failing forget
stands alone; that one is retried in the background with the shared retry policy (backoff with
jitter, logged, counted), and each failure is published as its `pending` status with the reason,
while the forgets after it go on. Offsets are committed up to the oldest forget not done, so a
restart takes up again every unfinished one; forgets `forget_audit` records as done
(sinks/erasure_audit.py) are not carried out twice, their status is only published again.
"""

from __future__ import annotations

import asyncio
import logging
import re
from functools import partial

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ingest.kafka_connection import group_options, security_options
from ingest.metrics import FORGETS
from ingest.records import Erasure, ForgetStatusRecord, decode, encode
from ingest.retry import retrying
from ingest.settings import Settings
from ingest.topics import namespaced, topic
from sinks.erasure_audit import Forget, ForgetAudit, status_record
from sinks.erasure_executor import ErasureExecutor, MutationsPending
from sinks.erasure_filter import ErasureFilter

log = logging.getLogger(__name__)

EXECUTOR_GROUP = "millimetric-erasure"

_Item = tuple[TopicPartition, int, Erasure]


def reason(error: BaseException) -> str:
    """Why an attempt failed, in words safe to publish (no SQL, so no personal ids)."""
    if isinstance(error, MutationsPending):
        return str(error)
    code = getattr(error, "code", None)
    if code is None and (match := re.search(r"Code: (\d+)", str(error))):
        code = match[1]
    return f"attempt failed: {type(error).__name__}" + (f" (code {code})" if code else "")


class ErasureQueue:
    """The executor's consumer loop; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        executor: ErasureExecutor,
        audit: ForgetAudit,
        erasures: ErasureFilter,
        producer: AIOKafkaProducer,
    ) -> None:
        self._settings = settings
        self._bootstrap = bootstrap
        self._executor = executor
        self._audit = audit
        self._erasures = erasures
        self._producer = producer
        self._open: dict[TopicPartition, dict[int, str]] = {}  # offsets not done yet
        self._next: dict[TopicPartition, int] = {}  # offset after the last one read
        self._retries: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Carry out forgets until `stop` is set."""
        consumer = AIOKafkaConsumer(
            topic("erasures").name,
            bootstrap_servers=self._bootstrap,
            **security_options(self._settings),
            group_id=namespaced(EXECUTOR_GROUP),
            **group_options(self._settings),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            while not stop.is_set():
                fetched = await consumer.getmany(
                    timeout_ms=500, max_records=self._settings.forget_batch_max
                )
                items: list[_Item] = []
                for tp, messages in fetched.items():
                    for message in messages:
                        items.append((tp, message.offset, decode(message.value)))
                        self._next[tp] = message.offset + 1
                if items:
                    await self._take(items, stop)
                commit = {
                    tp: min(self._open.get(tp) or {end: ""}) for tp, end in self._next.items()
                }
                if commit:
                    await consumer.commit(commit)
        finally:
            for task in self._retries:
                task.cancel()
            await asyncio.gather(*self._retries, return_exceptions=True)
            await consumer.stop()

    async def _take(self, items: list[_Item], stop: asyncio.Event) -> None:
        ids = [e["forget_id"] for _, _, e in items]
        done = await asyncio.to_thread(self._audit.done_before, ids)
        for status in done.values():  # carried out before a restart: say so again, only
            await self._publish(status)
        todo = [item for item in items if item[2]["forget_id"] not in done]
        FORGETS.labels("requested").inc(len(todo))
        for tp, offset, erasure in todo:
            self._open.setdefault(tp, {})[offset] = erasure["forget_id"]
        while not stop.is_set() and not self._erasures.seen.issuperset(
            e["forget_id"] for _, _, e in todo
        ):
            await asyncio.sleep(0.1)  # our own filter has them before the grace period starts
        if todo and not stop.is_set():
            await self._carry_out(todo)

    async def _carry_out(self, items: list[_Item]) -> None:
        try:
            statuses = await asyncio.to_thread(self._executor.execute, [e for *_, e in items])
        except Exception as error:
            log.warning("%d forgets failed (%s); isolating", len(items), reason(error))
            FORGETS.labels("failed").inc(len(items))
            halves = (
                [items] if len(items) == 1 else [items[: len(items) // 2], items[len(items) // 2 :]]
            )
            for half in halves:
                retry = self._retry(half[0], error) if len(half) == 1 else self._carry_out(half)
                task = asyncio.create_task(retry)
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)
            return
        await self._finish(items, statuses)

    async def _retry(self, item: _Item, first: BaseException) -> None:
        """Retry one forget until it is done, publishing each failure as its status."""
        erasure = item[2]
        attempts = 1
        await self._pending(erasure, first, attempts)

        async def attempt() -> list[ForgetStatusRecord]:
            nonlocal attempts
            try:
                return await asyncio.to_thread(self._executor.execute, [erasure])
            except Exception as error:
                attempts += 1
                await self._pending(erasure, error, attempts)
                raise

        statuses = await retrying(
            "forget", attempt, max_delay_s=self._settings.forget_retry_max_s, first_delay_s=1.0
        )
        await self._finish([item], [{**statuses[0], "attempts": attempts}])  # type: ignore[list-item]

    async def _pending(self, erasure: Erasure, error: BaseException, attempts: int) -> None:
        """Record why a forget is still pending (best effort: the store or broker may be away)."""
        why = reason(error)
        log.warning("forget %s pending: %s", erasure["forget_id"], why)
        if attempts > 1:  # the first failure was counted with its batch
            FORGETS.labels("failed").inc()
        status = status_record(
            erasure["forget_id"],
            erasure["project"],
            "pending",
            [len(erasure["anonymous_ids"]), 0, 0, 0, erasure["requested_at"], 0, attempts],
            why,
        )
        try:
            await asyncio.wait_for(self._publish(status), 10)
            forget = Forget(erasure, set(erasure["anonymous_ids"]))
            await asyncio.to_thread(self._audit.record, [forget], "pending", why, attempts)
        except Exception as failure:
            log.warning("could not record forget %s as pending: %r", erasure["forget_id"], failure)

    async def _finish(self, items: list[_Item], statuses: list[ForgetStatusRecord]) -> None:
        for status in statuses:
            await retrying("forget status", partial(self._publish, status))
        for tp, offset, _ in items:
            self._open.get(tp, {}).pop(offset, None)
        FORGETS.labels("done").inc(len(items))

    async def _publish(self, status: ForgetStatusRecord) -> None:
        await self._producer.send_and_wait(
            topic("keys").name, encode(status), key=f"forget:{status['forget_id']}".encode()
        )
