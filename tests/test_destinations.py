"""Destinations: PostHog, Mixpanel, Amplitude and a webhook, against a receiver started here.

The providers' official SDKs are the oracle of each request's shape. The runner is tested on the
session broker (enriched records put on the topic here); the whole pipeline in the chaos test.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr

from bench.services import Proc
from ingest.records import EnrichedEvent, envelope
from ingest.retry import retrying
from ingest.settings import Settings
from ingest.topics import ensure_topics, topic
from sinks.destinations.amplitude import Amplitude
from sinks.destinations.configured import configured, deletions
from sinks.destinations.contract import Destination, TryLater, insert_id
from sinks.destinations.forgets import ForgetForwarder, outcomes
from sinks.destinations.mixpanel import Mixpanel
from sinks.destinations.posthog import PostHog
from sinks.destinations.runner import Runner
from sinks.destinations.webhook import Webhook
from sinks.erasure_filter import ErasureFilter
from tests.destination_receiver import POISON, Receiver, running_receiver
from tests.services import Pipeline

BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
PROVIDERS = ("posthog", "mixpanel", "amplitude", "webhook")
# The receiver's message when it refuses the poison event, as each provider words it.
REFUSAL = {
    "posthog": "poison is refused",
    "mixpanel": "poison is refused",
    "amplitude": "Invalid field values on some events",
    "webhook": "poison is refused",
}
# What only an SDK sends: its own name and version, and facts about the machine it runs on.
SDK_ONLY = {
    "$lib", "$lib_version", "mp_lib", "library", "$python_runtime", "$python_version",
    "$os_version", "$os_distro", "$geoip_disable", "$is_server",
}  # fmt: skip


def enriched(**fields: Any) -> EnrichedEvent:
    """An enriched record as the processor writes it."""
    event: dict[str, Any] = {
        "v": 1, "type": "track", "project": "demo", "event_id": uuid.uuid4().hex,
        "event": "signup", "timestamp": 1_700_000_000_123, "received_at": 1_700_000_000_200,
        "anonymous_id": "device_1", "user_id": "user_42", "session_id": "device_1-1",
        "url": "https://site.example/?utm_source=x", "path": "/", "referrer": "",
        "properties": '{"plan":"free"}', "source": "x", "medium": "", "campaign": "",
        "channel": "Referral", "source_confidence": 0.9, "source_rule_id": "utm",
        "click_id": "", "click_id_network": "", "classifier_version": "1", "country": "FR",
        "device_type": "desktop", "browser": "Firefox", "os": "Linux", "is_bot": False,
        "ip_hash": "ab" * 16,
    }  # fmt: skip
    event.update(fields)
    return event  # type: ignore[return-value]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver playing every provider."""
    with running_receiver() as r:
        yield r


def shape(value: Any) -> Any:
    """A JSON value's names, nesting and types, without its values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items() if k not in SDK_ONLY}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(
        value).__name__  # fmt: skip


def contained(sdk: Any, ours: Any, where: str = "") -> list[str]:
    """Where `ours` lacks, or shapes differently, something the SDK sent."""
    if isinstance(sdk, dict):
        if not isinstance(ours, dict):
            return [f"{where}: {ours!r} is not an object"]
        return [m for k, v in sdk.items() for m in contained(v, ours.get(k), f"{where}.{k}")]
    if isinstance(sdk, list):
        if not isinstance(ours, list):
            return [f"{where}: not a list"]
        return contained(sdk[0], ours[0], f"{where}[]") if sdk and ours else []
    return [] if sdk == ours else [f"{where}: {ours!r} where the SDK sends {sdk!r}"]


def send(destination: Destination, events: list[EnrichedEvent]) -> httpx.Response:
    """Send one batch as the runner does."""
    with httpx.Client() as client:
        return client.send(destination.request(events))


def sdk_requests(receiver: Receiver) -> None:
    """One `signup` by user_42 on device_1 through each official SDK, to the receiver."""
    import mixpanel
    import posthog
    from amplitude import Amplitude as AmplitudeSdk
    from amplitude import BaseEvent, Config

    ph = posthog.Posthog("phc_key", host=receiver.url("posthog"), sync_mode=True)
    ph.capture(
        "signup",
        distinct_id="user_42",
        properties={"plan": "free"},
        uuid=str(uuid.uuid4()),
        timestamp=None,
    )
    ph.set(distinct_id="user_42", properties={"email": "a@example.com"})
    consumer = mixpanel.BufferedConsumer(
        import_url=receiver.url("mixpanel") + "/import", max_size=1
    )
    mp = mixpanel.Mixpanel("mp_token", consumer=consumer)
    mp.import_data(None, "user_42", "signup", 1_700_000_000, {"plan": "free"}, api_secret="mps")
    amp = AmplitudeSdk("amp_key", Config(server_url=receiver.url("amplitude") + "/2/httpapi"))
    amp.track(
        BaseEvent(
            event_type="signup",
            user_id="user_42",
            device_id="device_1",
            event_properties={"plan": "free"},
            insert_id=str(uuid.uuid4()),
            time=1_700_000_000_000,
        )
    )
    amp.shutdown()


def test_requests_carry_what_the_official_sdks_send_where_they_send_it(
    receiver: Receiver,
) -> None:
    sdk_requests(receiver)
    sdk = {p: receiver.of(p) for p in ("posthog", "mixpanel", "amplitude")}
    assert [len(sdk[p]) for p in sdk] == [2, 1, 1], [r.path for r in receiver.requests]
    receiver.requests.clear()
    track, identify = enriched(), enriched(type="identify", properties='{"email":"a@example.com"}')
    for destination in (
        PostHog("phc_key", receiver.url("posthog")),
        Mixpanel("mp_token", receiver.url("mixpanel"), "mps"),
        Amplitude("amp_key", receiver.url("amplitude")),
    ):
        events = [track, identify] if destination.name == "posthog" else [track]
        assert send(destination, events).status_code == 200
    for provider, theirs in sdk.items():
        ours = receiver.of(provider)
        assert [r.path for r in ours] == [r.path for r in theirs][:1]
        for header in ("authorization", "content-type"):  # auth and encoding in the same place
            assert (
                ours[0].headers.get(header, "").split(";")[0]
                == theirs[0].headers.get(header, "").split(";")[0]
            ), (provider, header)
        # Every name, nesting and type the SDK sends (the buffered Mixpanel one: a list too).
        assert contained(shape(theirs[0].payload()), shape(ours[0].payload())) == [], provider
    # PostHog: `$set` (the SDK's set(); ours: $identify) at the event's top level, an object.
    ours_identify = receiver.of("posthog")[0].payload()["batch"][1]
    sdk_set = sdk["posthog"][1].payload()["batch"][0]
    assert ours_identify["event"] == "$identify" and ours_identify["$set"] == sdk_set["$set"]
    # The insert ids are the event ids' UUIDs, where each SDK puts its own.
    assert receiver.of("posthog")[0].payload()["batch"][0]["uuid"] == insert_id(track["event_id"])
    assert receiver.of("amplitude")[0].payload()["events"][0]["insert_id"] == insert_id(
        track["event_id"]
    )


def test_without_an_api_secret_mixpanel_gets_what_its_sdk_sends_to_the_track_api(
    receiver: Receiver,
) -> None:
    import mixpanel

    consumer = mixpanel.BufferedConsumer(events_url=receiver.url("mixpanel") + "/track", max_size=1)
    mixpanel.Mixpanel("mp_token", consumer=consumer).track("user_42", "signup", {"plan": "free"})
    assert send(Mixpanel("mp_token", receiver.url("mixpanel"), None), [enriched()]).is_success
    theirs, ours = receiver.of("mixpanel")
    assert ours.path == theirs.path == "/mixpanel/track"
    assert "authorization" not in ours.headers
    assert contained(shape(theirs.payload()), shape(ours.payload())) == []
    assert ours.payload()[0]["properties"]["time"] == 1_700_000_000.123  # seconds, as /track takes


def test_a_webhook_batch_is_signed_the_standard_webhooks_way(receiver: Receiver) -> None:
    from standardwebhooks import Webhook as Verifier

    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    hook = Webhook(receiver.url("webhook"), "Bearer hook-token", secret)
    events = [enriched(), enriched()]
    assert send(hook, events).status_code == 200
    got = receiver.of("webhook")[0]
    assert got.headers["authorization"] == "Bearer hook-token"
    verified = Verifier(secret).verify(got.body, got.headers)
    assert [e["event_id"] for e in verified["batch"]] == [e["event_id"] for e in events]
    assert verified["batch"][0]["properties"] == {"plan": "free"}
    with pytest.raises(Exception, match="signature"):
        Verifier("whsec_" + "A" * 32).verify(got.body, got.headers)


def test_destinations_are_on_when_their_key_setting_is_set() -> None:
    assert configured(Settings()) == []
    on = Settings(
        posthog_api_key=SecretStr("phc"),
        mixpanel_token=SecretStr("tok"),
        amplitude_api_key=SecretStr("amp"),
        amplitude_host="https://api.eu.amplitude.com",
        tracking_webhook_url="https://hooks.example/in",
    )
    found = configured(on)
    assert [d.name for d in found] == list(PROVIDERS) == on.destinations()
    assert found[2].url == "https://api.eu.amplitude.com/2/httpapi"  # type: ignore[attr-defined]
    assert found[0].url == "https://us.i.posthog.com/batch/"  # type: ignore[attr-defined]
    assert "phc" not in repr(on)


async def test_a_retry_waits_as_long_as_retry_after_asks() -> None:
    calls: list[float] = []

    async def busy() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise TryLater("429", retry_after_s=1.0)

    await retrying("test_retry_after", busy, first_delay_s=0.001, max_delay_s=5.0)
    assert calls[1] - calls[0] >= 1.0


def runner_settings(receiver: Receiver, **extra: Any) -> Settings:
    """Every destination on, pointed at the receiver, with quick batches and retries."""
    return Settings(
        posthog_api_key=SecretStr("phc_key"),
        posthog_host=receiver.url("posthog"),
        mixpanel_token=SecretStr("mp_token"),
        mixpanel_api_secret=SecretStr("mps"),
        mixpanel_host=receiver.url("mixpanel"),
        amplitude_api_key=SecretStr("amp_key"),
        amplitude_host=receiver.url("amplitude"),
        tracking_webhook_url=receiver.url("webhook") + "/in",
        destinations_batch_events=10,
        destinations_batch_seconds=0.3,
        destinations_attempts=2,
        destinations_retry_max_s=0.5,
        destinations_pause_s=0.5,
        kafka_idempotence=False,
        **extra,
    )


async def produce(bootstrap: str, events: list[EnrichedEvent]) -> list[tuple[TopicPartition, int]]:
    """Put enriched records on the enriched topic, as the processor does; where they went."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        sent = [
            await producer.send(
                topic("enriched").name,
                orjson.dumps(e),
                key=f"{e['project']}:{e['anonymous_id']}".encode(),
            )
            for e in events
        ]
        written = [await f for f in sent]
    finally:
        await producer.stop()
    return [(TopicPartition(m.topic, m.partition), m.offset) for m in written]


async def wait_until(check: Any, timeout: float = 90) -> None:
    """Poll `check()` until it is true (or fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


class Runners:
    """Every destination's runner in this process, each in a consumer group of this test's."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        erasures: ErasureFilter,
        group: str | None = None,
    ) -> None:
        self.settings, self.bootstrap, self.erasures = settings, bootstrap, erasures
        self.group = group or f"test-{uuid.uuid4().hex[:8]}"
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Runners:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await self.producer.start()
        self.client = httpx.AsyncClient(timeout=10)
        self.runners = [
            Runner(d, self.settings, self.bootstrap, {}, self.client, self.producer,
                   self.erasures, group_id=f"{self.group}-{d.name}")
            for d in configured(self.settings)
        ]  # fmt: skip
        await asyncio.gather(*(r.start() for r in self.runners))
        self.tasks = [asyncio.ensure_future(r.run(self.stop)) for r in self.runners]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for r in self.runners:
            await r.stop()
        await self.client.aclose()
        await self.producer.stop()


async def test_each_destination_gets_each_event_once_and_a_refused_one_is_dead_lettered(
    broker: str, receiver: Receiver
) -> None:
    await ensure_topics(broker)
    erasures = ErasureFilter()
    forgotten = enriched(user_id="gone", anonymous_id="gone_device")
    erasures.add(
        {"v": 1, "forget_id": "fgt_1", "project": "demo", "user_id": "gone",
         "anonymous_ids": ["gone_device"], "cutoff": 2**62, "suppress": False, "requested_at": 0}
    )  # fmt: skip
    wanted = [enriched(anonymous_id=f"d{i % 7}") for i in range(40)]
    poison = enriched(event=POISON)
    skipped = [enriched(is_bot=True), enriched(env="test"), forgotten]
    events = [*wanted[:20], poison, *skipped, *wanted[20:]]
    expected = {insert_id(e["event_id"]) for e in wanted}
    async with Runners(runner_settings(receiver), broker, erasures):
        await produce(broker, events)
        await wait_until(
            lambda: all(expected <= set(receiver.accepted.get(p, {})) for p in PROVIDERS)
        )
        letters = {p: await dead_letters(broker, p, poison["event_id"]) for p in PROVIDERS}
    mine = {insert_id(e["event_id"]) for e in events}
    for p in PROVIDERS:
        counts = {k: v for k, v in receiver.accepted[p].items() if k in mine}
        assert set(counts) == expected, p  # neither the poison, a bot, a test key nor the forgotten
        assert set(counts.values()) == {1}, p
    for p, found in letters.items():  # the poison alone, once, with the provider's message
        assert [r["record"]["event_id"] for r in found] == [poison["event_id"]], p
        assert REFUSAL[p] in found[0]["reason"], p
        assert found[0]["stage"] == f"destination:{p}"


async def dead_letters(bootstrap: str, provider: str, event_id: str) -> list[dict[str, Any]]:
    """The letters of a destination's dead-letter topic about one event (waits for one)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic(f"dead_letter_{provider}").name, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=300)).values():
                for m in messages:
                    letter = orjson.loads(m.value)
                    if letter["record"]["event_id"] == event_id:
                        found.append(letter)
            if found and (await consumer.position(tp)) >= (await consumer.end_offsets([tp]))[tp]:
                return found
        return found
    finally:
        await consumer.stop()


async def test_a_provider_down_holds_back_only_itself_and_catches_up_without_loss(
    broker: str, receiver: Receiver
) -> None:
    await ensure_topics(broker)
    receiver.down.add("amplitude")
    events = [enriched(anonymous_id=f"d{i % 5}") for i in range(30)]
    expected = {insert_id(e["event_id"]) for e in events}
    others = ("posthog", "mixpanel", "webhook")
    async with Runners(runner_settings(receiver), broker, ErasureFilter()):
        await produce(broker, events)
        await wait_until(lambda: all(expected <= set(receiver.accepted.get(p, {})) for p in others))
        await wait_until(lambda: len(receiver.of("amplitude")) >= 4)  # past its attempts: paused
        assert not expected & set(receiver.accepted.get("amplitude", {}))
        receiver.down.clear()
        await wait_until(lambda: expected <= set(receiver.accepted.get("amplitude", {})))
    for p in PROVIDERS:
        assert {n for k, n in receiver.accepted[p].items() if k in expected} == {1}, p
    retried = [r for r in receiver.of("amplitude") if r.status == 503]
    assert retried and all(r.events() for r in retried)


async def test_a_batch_of_envelopes_is_sent_in_requests_of_the_batch_size(
    broker: str, receiver: Receiver
) -> None:
    # A fetch counts records, and an envelope carries many events: requests stay within
    # MILLIMETRIC_DESTINATIONS_BATCH_EVENTS (10 here) all the same.
    await ensure_topics(broker)
    events = [enriched(anonymous_id="same_device") for _ in range(35)]
    expected = {insert_id(e["event_id"]) for e in events}
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    try:
        value = envelope([orjson.dumps(e) for e in events])
        await producer.send_and_wait(topic("enriched").name, value, key=b"demo:same_device")
    finally:
        await producer.stop()
    async with Runners(runner_settings(receiver), broker, ErasureFilter()):
        await wait_until(lambda: expected <= set(receiver.accepted.get("webhook", {})))
    sizes = [len(r.events()) for r in receiver.of("webhook")]
    assert max(sizes) <= 10, sizes


def post_as_a_browser(pipeline: Pipeline, body: dict[str, Any]) -> list[str]:
    """POST a batch with a browser's User-Agent (an HTTP library's is a bot's, never forwarded),
    again after Retry-After while the gateway answers 503; its event ids."""
    headers = {"Authorization": f"Bearer {pipeline.key}", "User-Agent": BROWSER}
    while True:
        r = httpx.post(f"{pipeline.base_url}/v1/batch", json=body, headers=headers, timeout=30)
        if r.status_code != 503:
            assert r.status_code == 202, r.text
            return list(r.json()["event_ids"])
        time.sleep(float(r.headers.get("Retry-After", "1")))


@pytest.mark.slow
def test_the_pipeline_feeds_every_destination_once_while_one_is_down_and_clickhouse_flows(
    fresh_broker: str, data_dir: Path
) -> None:
    """Chaos: Amplitude answers 503 while 1,000 events cross the pipeline; ClickHouse and the
    other destinations get them all meanwhile, Amplitude every one once it is back, and the one
    event each provider refuses is dead-lettered alone."""
    with running_receiver() as receiver:
        receiver.down.add("amplitude")
        env = {
            "MILLIMETRIC_POSTHOG_API_KEY": "phc_key",
            "MILLIMETRIC_POSTHOG_HOST": receiver.url("posthog"),
            "MILLIMETRIC_MIXPANEL_TOKEN": "mp_token",
            "MILLIMETRIC_MIXPANEL_API_SECRET": "mps",
            "MILLIMETRIC_MIXPANEL_HOST": receiver.url("mixpanel"),
            "MILLIMETRIC_AMPLITUDE_API_KEY": "amp_key",
            "MILLIMETRIC_AMPLITUDE_HOST": receiver.url("amplitude"),
            "MILLIMETRIC_TRACKING_WEBHOOK_URL": receiver.url("webhook") + "/in",
            "MILLIMETRIC_TRACKING_WEBHOOK_SECRET": "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "MILLIMETRIC_DESTINATIONS_BATCH_SECONDS": "0.5",
            "MILLIMETRIC_DESTINATIONS_ATTEMPTS": "3",
            "MILLIMETRIC_DESTINATIONS_RETRY_MAX_S": "1",
            "MILLIMETRIC_DESTINATIONS_PAUSE_S": "1",
        }
        pipeline = Pipeline(fresh_broker, None, data_dir, extra_env=env)
        pipeline.stages["destinations"] = Proc(
            ["-m", "millimetric_app.cli", "destinations", "run"],
            pipeline.env,
            data_dir / "destinations.log",
        )
        try:
            pipeline.start()
            body = {
                "events": [
                    {"event": POISON if i == 500 else "page",
                     "anonymous_id": f"v{i % 37}"}
                    for i in range(1000)
                ]
            }  # fmt: skip
            ids = post_as_a_browser(pipeline, body)
            pipeline.wait_for("SELECT count() FROM events", "1000\n", timeout=120)
            poison = insert_id(ids[500])
            expected = {insert_id(i) for i in ids} - {poison}
            others = ("posthog", "mixpanel", "webhook")
            deadline = time.monotonic() + 120
            while not all(expected <= set(receiver.accepted.get(p, {})) for p in others):
                assert time.monotonic() < deadline, {
                    p: len(receiver.accepted.get(p, {})) for p in PROVIDERS
                }
                time.sleep(0.3)
            assert receiver.of("amplitude") and not receiver.accepted.get("amplitude")
            receiver.down.clear()
            while not expected <= set(receiver.accepted.get("amplitude", {})):
                assert time.monotonic() < deadline + 60, "amplitude did not catch up"
                time.sleep(0.3)
            letters = {p: asyncio.run(dead_letters(fresh_broker, p, ids[500])) for p in PROVIDERS}
        finally:
            pipeline.stages["destinations"].stop()
            pipeline.stop()
    for p in PROVIDERS:
        assert set(receiver.accepted[p]) == expected, p
        assert set(receiver.accepted[p].values()) == {1}, p
        assert [r["record"]["event_id"] for r in letters[p]] == [ids[500]], p


def test_status_reads_the_destinations_only_where_their_metrics_are(tmp_path: Path) -> None:
    from ingest import status

    assert "destinations" not in status.metrics_urls(Settings(data_dir=tmp_path))
    urls = status.metrics_urls(Settings(data_dir=tmp_path, destinations_metrics_port=9109))
    assert urls["destinations"] == "http://127.0.0.1:9109/metrics"
    names = [s["name"] for s in status.collect({"destinations": "http://127.0.0.1:9/m"})["stages"]]
    assert names == ["gateway", "processor", "sink", "destinations"]
    samples = [
        status.Sample("millimetric_destination_events_sent_total", {"destination": "posthog"}, 7),
        status.Sample(
            "millimetric_destination_events_failed_total",
            {"destination": "posthog", "reason": "rejected"},
            1,
        ),
    ]
    assert status.destination_figures(samples) == {"posthog": {"sent": 7, "failed": 1}}


async def test_a_destination_stopped_while_its_provider_is_down_commits_nothing_it_holds(
    broker: str, receiver: Receiver
) -> None:
    """What a provider never accepted is read again at the next start: its offsets stay put."""
    await ensure_topics(broker)
    receiver.down.add("webhook")
    events = [enriched() for _ in range(12)]
    settings = Settings(
        tracking_webhook_url=receiver.url("webhook") + "/in",
        destinations_batch_seconds=0.3,
        destinations_retry_max_s=0.5,
        destinations_pause_s=0.5,
    )
    async with Runners(settings, broker, ErasureFilter()) as runners:
        written = await produce(broker, events)
        await wait_until(lambda: len(receiver.of("webhook")) >= 3)  # retried, then paused
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(
            f"{runners.group}-webhook", partitions=sorted({tp for tp, _ in written})
        )
    finally:
        await admin.close()
    for tp, offset in written:
        meta = committed.get(tp)
        assert meta is None or meta.offset <= offset, (tp, offset, meta)


async def test_a_forget_reaches_every_destination_with_a_deletion_api(
    broker: str, receiver: Receiver
) -> None:
    await ensure_topics(broker)
    settings = runner_settings(
        receiver,
        posthog_personal_api_key=SecretStr("phx_personal"),
        posthog_project_id="42",
        posthog_app_host=receiver.url("posthog"),
        mixpanel_gdpr_token=SecretStr("gdpr_oauth"),
        mixpanel_app_host=receiver.url("mixpanel"),
        amplitude_secret_key=SecretStr("amp_secret"),
        amplitude_app_host=receiver.url("amplitude"),
    )
    identified, anonymous = f"fgt_{uuid.uuid4().hex}", f"fgt_{uuid.uuid4().hex}"
    erasures = [
        {"v": 1, "forget_id": identified, "project": "demo", "user_id": "u_gone",
         "anonymous_ids": ["d_1", "d_2"], "cutoff": 1, "suppress": False, "requested_at": 1},
        {"v": 1, "forget_id": anonymous, "project": "demo", "user_id": None,
         "anonymous_ids": ["d_3"], "cutoff": 1, "suppress": False, "requested_at": 1},
    ]  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    stop = asyncio.Event()
    group = f"test-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient() as client:
        forwarders = [
            ForgetForwarder(d, settings, broker, {}, client, producer, group_id=f"{group}-{d.name}")
            for d in deletions(settings)
        ]
        try:
            await asyncio.gather(*(f.start() for f in forwarders))
            tasks = [asyncio.ensure_future(f.run(stop)) for f in forwarders]
            for erasure in erasures:
                await producer.send_and_wait(topic("erasures").name, orjson.dumps(erasure))
            deadline = time.monotonic() + 60
            while len(found := await outcomes(broker, anonymous)) < 3:
                assert time.monotonic() < deadline, found
            done = await outcomes(broker, identified)
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for f in forwarders:
                await f.stop()
            await producer.stop()
    assert {n: o["status"] for n, o in done.items()} == dict.fromkeys(PROVIDERS[:3], "done")
    assert found["amplitude"]["status"] == "nothing_to_delete"  # it deletes users, not devices
    sent = {r.provider: r for r in receiver.requests if "delet" in r.path and b"u_gone" in r.body}
    assert sent["posthog"].path == "/posthog/api/projects/42/persons/bulk_delete/"
    assert sent["posthog"].headers["authorization"] == "Bearer phx_personal"
    assert sent["posthog"].payload() == {
        "distinct_ids": ["u_gone", "d_1", "d_2"],
        "delete_events": True,
    }
    assert sent["mixpanel"].query == {"token": ["mp_token"]}
    assert sent["mixpanel"].headers["authorization"] == "Bearer gdpr_oauth"
    assert sent["mixpanel"].payload()["distinct_ids"] == ["u_gone", "d_1", "d_2"]
    assert (
        sent["amplitude"].headers["authorization"]
        == "Basic " + base64.b64encode(b"amp_key:amp_secret").decode()
    )
    assert sent["amplitude"].payload()["user_ids"] == ["u_gone"]


async def test_a_forget_forwarder_stops_at_once_while_its_provider_is_down(
    broker: str, receiver: Receiver
) -> None:
    # It waited for the provider for ever: a remove or SIGTERM took the whole stop timeout, and
    # the destinations process's others waited behind it.
    await ensure_topics(broker)
    receiver.down.add("posthog")
    settings = runner_settings(
        receiver,
        posthog_personal_api_key=SecretStr("phx_personal"),
        posthog_project_id="42",
        posthog_app_host=receiver.url("posthog"),
    )
    [posthog] = [d for d in deletions(settings) if d.name == "posthog"]
    forget_id = f"fgt_{uuid.uuid4().hex}"
    erasure = {"v": 1, "forget_id": forget_id, "project": "demo", "user_id": "u_gone",
               "anonymous_ids": [], "cutoff": 1, "suppress": False, "requested_at": 1}  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=broker)
    await producer.start()
    group = f"test-{uuid.uuid4().hex[:8]}"
    stop = asyncio.Event()
    async with httpx.AsyncClient() as client:
        forwarder = ForgetForwarder(posthog, settings, broker, {}, client, producer, group_id=group)
        try:
            await forwarder.start()
            task = asyncio.ensure_future(forwarder.run(stop))
            await producer.send_and_wait(topic("erasures").name, orjson.dumps(erasure))
            await wait_until(lambda: any(b"u_gone" in r.body for r in receiver.of("posthog")))
            stop.set()
            await asyncio.wait_for(task, timeout=5)
            partitions = forwarder.consumer.assignment()
            committed = [await forwarder.consumer.committed(tp) for tp in partitions]
        finally:
            stop.set()
            await forwarder.stop()
            await producer.stop()
    assert not any(committed), committed  # forwarded again by the next one to run
    assert await outcomes(broker, forget_id) == {}


def test_forget_status_names_each_destinations_outcome(broker: str) -> None:
    from millimetric_app.cli import _forget_destinations

    asyncio.run(ensure_topics(broker, roles=["forget_destinations"]))
    forget_id = f"fgt_{uuid.uuid4().hex}"

    async def record() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:
            for name, status in (("posthog", "refused"), ("posthog", "done")):
                outcome = {"forget_id": forget_id, "destination": name, "status": status,
                           "detail": "", "project": "demo", "v": 1, "at": 1}  # fmt: skip
                await producer.send_and_wait(
                    topic("forget_destinations").name, orjson.dumps(outcome)
                )
        finally:
            await producer.stop()

    asyncio.run(record())
    settings = Settings(kafka_bootstrap_servers=broker, posthog_api_key=SecretStr("phc"))
    assert _forget_destinations(settings, broker, forget_id) == {
        "posthog": {"status": "done", "detail": ""}  # the latest outcome
    }


def test_destinations_waiting_for_the_sinks_store_stop_when_asked(
    broker: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": broker,
        "MILLIMETRIC_KAFKA_IDEMPOTENCE": "false",
        "MILLIMETRIC_DATA_DIR": str(tmp_path),  # no sink serves this store: it waits
        "MILLIMETRIC_TRACKING_WEBHOOK_URL": "http://127.0.0.1:9/in",
    }
    log = tmp_path / "destinations.log"
    proc = Proc(["-m", "millimetric_app.cli", "destinations", "run"], env, log).start()
    try:
        deadline = time.monotonic() + 60
        while "no sink serves the embedded store" not in log.read_text():
            assert time.monotonic() < deadline and proc.proc.poll() is None, log.read_text()
            time.sleep(0.2)
        proc.proc.terminate()
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop(kill=True)


def millimetric(env: dict[str, str], *args: str) -> str:
    """Run the `millimetric` command; its stdout (it must succeed)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "millimetric_app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@contextlib.asynccontextmanager
async def running_projects(
    settings: Settings, bootstrap: str, erasures: ErasureFilter
) -> AsyncIterator[Any]:
    """The per-project destinations' runners following the keys topic, as the process runs
    them; stopped (each flushing) on leaving."""
    from sinks.destinations.project_runners import ProjectRunners

    stop = asyncio.Event()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    async with httpx.AsyncClient(timeout=10) as client:
        projects = ProjectRunners(settings, bootstrap, {}, {}, client, producer, erasures)
        task = asyncio.ensure_future(projects.run(stop))
        try:
            yield projects
        finally:
            stop.set()
            await task
            await producer.stop()


def webhook_events(receiver: Receiver, path: str | None = None) -> set[str]:
    """The event ids the receiver's webhook got (at `path` only, when given)."""
    return {
        e["event_id"] for r in receiver.of("webhook") if path in (None, r.path) for e in r.events()
    }


async def test_a_projects_own_destination_gets_its_events_only_until_it_is_removed(
    broker: str, receiver: Receiver, tmp_path: Path
) -> None:

    await ensure_topics(broker)
    own, other = f"own_{uuid.uuid4().hex[:6]}", f"other_{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS": broker,
        "MILLIMETRIC_KAFKA_IDEMPOTENCE": "false",
        "MILLIMETRIC_DATA_DIR": str(tmp_path),  # where the encryption key is generated
    }
    url, auth = receiver.url("webhook") + "/own", "Bearer s3cret-own-token"
    add = ["destinations", "add", "--project", own, "--type", "webhook", "--url", url]
    added = await asyncio.to_thread(millimetric, env, *add, "--auth", auth)
    destination_id = added.strip()
    listed = await asyncio.to_thread(millimetric, env, "destinations", "list", "--project", own)
    assert destination_id in listed and auth not in listed
    stored = await raw_keys_records(broker, f"destination:{destination_id}".encode())
    assert stored and all(auth.encode() not in value for value in stored)

    settings = runner_settings(receiver, data_dir=tmp_path)
    async with running_projects(settings, broker, ErasureFilter()) as projects:
        mine, theirs = enriched(project=own), enriched(project=other)
        await produce(broker, [mine, theirs])

        def arrived() -> set[str]:
            return webhook_events(receiver, "/webhook/own")

        await wait_until(lambda: mine["event_id"] in arrived())
        assert receiver.of("webhook")[0].headers["authorization"] == auth
        await asyncio.to_thread(millimetric, env, "destinations", "remove", destination_id)
        await wait_until(lambda: not projects.running)
        later = enriched(project=own)
        await produce(broker, [later])
        await asyncio.sleep(2)  # ten times the batch age: it would have been sent
        assert arrived() & {theirs["event_id"], later["event_id"]} == set()


async def raw_keys_records(bootstrap: str, key: bytes) -> list[bytes]:
    """The values on the keys topic under `key`, as stored."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic("keys").name, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        found: list[bytes] = []
        while await consumer.position(tp) < end:
            for messages in (await consumer.getmany(tp, timeout_ms=1000)).values():
                found += [m.value or b"" for m in messages if m.key == key]
        return found
    finally:
        await consumer.stop()


def test_gateways_ignore_destination_records_on_the_keys_topic(tmp_path: Path) -> None:
    from gateway.auth import KeyStore
    from sinks.destinations.project_destinations import new_record

    settings = Settings(data_dir=tmp_path)
    record = new_record(settings, "shop", "posthog", {"api_key": "phc_plain"})
    assert "phc_plain" not in orjson.dumps(record).decode()
    KeyStore({}).apply(dict(record))  # raised KeyError('revoked_at') before gateways knew them


async def put_letter(bootstrap: str, destination: str, letter: dict[str, Any]) -> None:
    """Put a letter on a destination's dead-letter topic, as its runner does."""
    role = f"dead_letter_{destination}"
    await ensure_topics(bootstrap, roles=[role])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic(role).name, orjson.dumps(letter))
    finally:
        await producer.stop()


def test_dead_letters_list_shows_the_destinations_letters(
    broker: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ingest.dead_letter_replay import list_letters

    event, reason = enriched(), f"refused {uuid.uuid4().hex}"
    letter = {"stage": "destination:ds_abc", "reason": reason, "record": event}
    asyncio.run(put_letter(broker, "webhook", letter))
    assert list_letters(broker, reason, None, tmp_path) == 0
    [row] = capsys.readouterr().out.splitlines()[1:]
    stage, place, event_id, replayed, text = row.split("\t")[1:]
    assert (stage, event_id, replayed, text) == (
        "destination:ds_abc",
        event["event_id"],
        "-",
        reason,
    )
    assert place.startswith("webhook/")


async def test_a_forget_reaches_a_projects_own_destinations_and_stops_their_events(
    broker: str, receiver: Receiver, tmp_path: Path
) -> None:
    from sinks.destinations import project_destinations as pd

    await ensure_topics(broker)
    own, other = f"own_{uuid.uuid4().hex[:6]}", f"other_{uuid.uuid4().hex[:6]}"
    settings = runner_settings(receiver, data_dir=tmp_path)
    deleting = {"api_key": "phc_own", "host": receiver.url("posthog"), "project_id": "7",
                "personal_api_key": "phx_own", "app_host": receiver.url("posthog")}  # fmt: skip
    mine = pd.new_record(settings, own, "posthog", deleting)
    theirs = pd.new_record(settings, other, "posthog", {**deleting, "project_id": "8"})
    plain = pd.new_record(settings, own, "webhook", {"url": receiver.url("webhook") + "/plain"})
    for record in (mine, theirs, plain):
        await pd.publish(broker, record)
    forget_id = f"fgt_{uuid.uuid4().hex}"
    erasure = {"v": 1, "forget_id": forget_id, "project": own, "user_id": "u_gone",
               "anonymous_ids": ["d_gone"], "cutoff": 2**62, "suppress": False,
               "requested_at": 1}  # fmt: skip
    erasures = ErasureFilter()
    erasures.add(erasure)  # as the process's follower of the erasures topic does
    async with running_projects(settings, broker, erasures):
        producer = AIOKafkaProducer(bootstrap_servers=broker)
        await producer.start()
        try:
            await producer.send_and_wait(topic("erasures").name, orjson.dumps(erasure))
        finally:
            await producer.stop()
        deadline = time.monotonic() + 60
        while mine["destination_id"] not in (found := await outcomes(broker, forget_id)):
            assert time.monotonic() < deadline, found
        gone = enriched(project=own, user_id="u_gone", anonymous_id="d_gone")
        kept = enriched(project=own)
        await produce(broker, [gone, kept])

        def arrived() -> set[str]:
            return webhook_events(receiver)

        await wait_until(lambda: kept["event_id"] in arrived())
    assert set(found) == {mine["destination_id"]}  # not another project's, not a webhook
    assert found[mine["destination_id"]]["status"] == "done"
    [sent] = [r for r in receiver.requests if "bulk_delete" in r.path and b"u_gone" in r.body]
    assert sent.path == "/posthog/api/projects/7/persons/bulk_delete/"
    assert sent.headers["authorization"] == "Bearer phx_own"
    assert gone["event_id"] not in arrived()
    assert insert_id(gone["event_id"]) not in receiver.accepted.get("posthog", {})


async def test_a_projects_own_destination_has_its_own_metrics_and_lag_in_status(
    broker: str, receiver: Receiver, tmp_path: Path
) -> None:
    from prometheus_client import REGISTRY

    from ingest import status
    from ingest.lag import watch
    from ingest.ops_port import serve
    from millimetric_app.embedded import free_port
    from sinks.destinations import project_destinations as pd

    await ensure_topics(broker)
    own = f"own_{uuid.uuid4().hex[:6]}"
    settings = runner_settings(receiver, data_dir=tmp_path, lag_interval_s=0.5)
    record = pd.new_record(settings, own, "webhook", {"url": receiver.url("webhook") + "/lag"})
    await pd.publish(broker, record)
    destination_id = record["destination_id"]
    port = free_port()
    serve("destinations", port, "127.0.0.1")
    url = f"http://127.0.0.1:{port}/metrics"

    def sent(label: str) -> float:
        value = REGISTRY.get_sample_value(
            "millimetric_destination_events_sent_total", {"destination": label}
        )
        return value or 0.0

    builtin_before = sent("webhook")
    lag = asyncio.ensure_future(watch(broker, [], "destinations", settings))
    async with running_projects(settings, broker, ErasureFilter()):
        await produce(broker, [enriched(project=own) for _ in range(3)])
        await wait_until(lambda: sent(destination_id) == 3)

        def groups() -> dict[str, Any]:
            return status.collect({"destinations": url})["lag"]

        await wait_until(lambda: any(destination_id in g for g in groups()), timeout=30)
        shown = await asyncio.to_thread(status.collect, {"destinations": url})
    try:
        # Its runner stopped: the next round drops its gauges.
        await wait_until(lambda: not any(destination_id in g for g in groups()), timeout=30)
    finally:
        lag.cancel()
        await asyncio.gather(lag, return_exceptions=True)
    assert sent("webhook") == builtin_before  # not counted as the settings' webhook
    assert shown["destinations"][destination_id] == {"sent": 3, "failed": 0}
    [group] = [g for g in shown["lag"] if destination_id in g]
    assert group == f"millimetric-destination-webhook-{destination_id}"


def test_dead_letters_replay_says_it_does_not_replay_the_destinations_letters(
    fresh_broker: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ingest.dead_letter_replay import replay

    reason = f"refused {uuid.uuid4().hex}"
    letter = {"stage": "destination:ds_replay", "reason": reason, "record": enriched()}
    asyncio.run(put_letter(fresh_broker, "posthog", letter))
    assert replay(fresh_broker, tmp_path, reason, 0) == 1  # asked for, not done: not a success
    out = capsys.readouterr().out
    assert "not replayed (a destination's letter): posthog/" in out
    assert "\tdestination:ds_replay" in out
    assert "1 destinations' letters are not replayed" in out
    assert out.rstrip().endswith("destinations' letters not replayed 1")
    # A replay of every letter is not failed by the destinations' (kept 7 days): named only.
    assert replay(fresh_broker, tmp_path, None, 0) == 0
    assert "not replayed (a destination's letter): posthog/" in capsys.readouterr().out


async def test_a_crashing_project_destination_restarts_and_stops_no_other(
    broker: str, receiver: Receiver, tmp_path: Path
) -> None:
    from prometheus_client import REGISTRY

    from sinks.destinations import project_destinations as pd

    await ensure_topics(broker)
    own = f"own_{uuid.uuid4().hex[:6]}"
    settings = runner_settings(receiver, data_dir=tmp_path)
    url = receiver.url("webhook")
    # A secret that is no base64: the record is taken, every request it signs raises.
    unsigned = pd.new_record(settings, own, "webhook", {"url": url, "secret": "whsec_abc"})
    mangled = {**pd.new_record(settings, own, "webhook", {"url": url}), "secrets": {"auth": 5}}
    good = pd.new_record(settings, own, "webhook", {"url": url + "/good"})
    records = (mangled, unsigned, good)  # the mangled one first: it once stopped every later one
    for record in records:
        await pd.publish(broker, record)  # type: ignore[arg-type]

    def restarts(record: Any) -> float:
        operation = f"destination_{record['destination_id']}_run"
        value = REGISTRY.get_sample_value("millimetric_retries_total", {"operation": operation})
        return value or 0.0

    try:
        async with running_projects(settings, broker, ErasureFilter()) as projects:
            first = enriched(project=own)
            await produce(broker, [first])

            def arrived() -> set[str]:
                return webhook_events(receiver, "/webhook/good")

            await wait_until(lambda: first["event_id"] in arrived())
            await wait_until(lambda: restarts(unsigned) >= 2 and restarts(mangled) >= 2)
            later = enriched(project=own)
            await produce(broker, [later])
            await wait_until(lambda: later["event_id"] in arrived())
            assert set(projects.running) >= {r["destination_id"] for r in records}
    finally:
        for record in (mangled, unsigned):  # none later in the session starts them again
            await pd.remove(broker, record["destination_id"])


async def test_the_keys_reader_reads_to_the_topics_real_end(broker: str, tmp_path: Path) -> None:
    from ingest.keys_topic import KeysReader
    from sinks.destinations import project_destinations as pd

    await ensure_topics(broker, roles=["keys"])
    settings = Settings(data_dir=tmp_path)
    records = [pd.new_record(settings, "batched", "webhook", {"url": "http://x/in"})
               for _ in range(20)]  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=200)
    await producer.start()
    try:  # one batch: the broker's ListOffsets(latest) is its base offset + 1
        sent = [
            await producer.send(
                topic("keys").name,
                orjson.dumps(r),
                key=f"destination:{r['destination_id']}".encode(),
            )
            for r in records
        ]
        [last, *_] = [await f for f in sent[::-1]]
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker)
    await consumer.start()
    try:
        tp = TopicPartition(topic("keys").name, 0)
        listed = (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()
    assert listed < last.offset + 1  # Tansu answers short: no reader may stop there
    found = await pd.current(broker)
    assert {r["destination_id"] for r in records} <= set(found)
    reader = KeysReader({"bootstrap_servers": broker})
    fetches = reader.fetches()
    seen: set[str] = set()
    try:
        while not reader.loaded.is_set():
            seen |= {r.get("destination_id", "") for r in await anext(fetches)}
            assert reader.position <= last.offset + 1 or reader.caught_up
    finally:
        await fetches.aclose()
        await reader.stop()
    assert reader.position >= last.offset + 1
    assert {r["destination_id"] for r in records} <= seen


def test_a_destination_with_part_of_its_deletion_credentials_is_refused(tmp_path: Path) -> None:
    # It was stored, and forwarded no forget without saying so.
    from sinks.destinations import project_destinations as pd

    settings = Settings(data_dir=tmp_path)
    for given, lacking in (
        ({"personal_api_key": "phx"}, "--project-id"),
        ({"project_id": "42"}, "--personal-api-key"),
        ({"app_host": "https://eu.posthog.com"}, "--personal-api-key, --project-id"),
    ):
        with pytest.raises(ValueError, match=f"deletion API .* needs {lacking}$"):
            pd.new_record(settings, "shop", "posthog", {"api_key": "phc", **given})
    whole = {"api_key": "phc", "personal_api_key": "phx", "project_id": "42"}
    assert pd.deletion(pd.new_record(settings, "shop", "posthog", whole), pd.cipher(settings))
