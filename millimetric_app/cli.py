"""`millimetric`: the one command. The composition root: it alone imports the stages, lazily.

millimetric dev                      the whole pipeline, embedded
millimetric gateway|processor|sink   one stage (production: one process each, scaled apart)
millimetric destinations run         forward enriched events to PostHog, Mixpanel, Amplitude...
millimetric destinations add|list|remove   a project's own destinations
millimetric keys create|list|revoke  API keys
millimetric keys limits              a project's rate limit on one route
millimetric hooks create|list|rotate|revoke   webhook receivers (Stripe, GitHub, Shopify, ...)
millimetric sql "SELECT ..."         query the configured ClickHouse (TSV)
millimetric forget status ID         whether an erasure is done, with what it deleted
millimetric classify --url URL       explain how a visit would be attributed
millimetric status [--json|--watch] the pipeline's health, from the stages' metrics
millimetric bench [--quick]          every stage's throughput beside a same-run baseline
millimetric backfill FILE...         import history (NDJSON/CSV, .gz/.zst) through /v1/batch
millimetric dead-letters list|replay what stages dead-lettered and why; send them back
millimetric replay --since TIME      re-derive a window of the raw topic (after a rule fix)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging.config
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from ingest.dev_extra import DevExtraMissing
from ingest.logs import dict_config
from ingest.settings import Settings

KEY_PROPAGATION_S = 1.0


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for name in (
        "data_dir",
        "kafka_bootstrap_servers",
        "clickhouse_url",
        "gateway_host",
        "gateway_port",
        "dev_ephemeral",
    ):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    return Settings(**overrides)


def _bootstrap(settings: Settings) -> str:
    from millimetric_app.dev import running_dev_bootstrap

    bootstrap = settings.kafka_bootstrap_servers or running_dev_bootstrap(settings.data_dir)
    if bootstrap is None:
        sys.exit(
            "millimetric: no broker: set MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS, "
            f"or start `millimetric dev` (data dir {settings.data_dir})"
        )
    return bootstrap


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from millimetric_app.dev import run

    asyncio.run(run(settings))
    return 0


def cmd_gateway(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.app import run

    run(settings, _bootstrap(settings))
    return 0


def cmd_processor(settings: Settings, args: argparse.Namespace) -> int:
    from processors.app import run

    run(settings, _bootstrap(settings))
    return 0


def cmd_sink(settings: Settings, args: argparse.Namespace) -> int:
    from sinks.app import serve

    asyncio.run(serve(settings, _bootstrap(settings)))
    return 0


# `destinations add` options: (name -> help); secrets are encrypted at rest (README, Destinations).
DESTINATION_OPTIONS = {
    "api_key": "posthog, amplitude: the project API key (secret)",
    "token": "mixpanel: the project token (secret)",
    "api_secret": "mixpanel: the API secret, for the import API (secret)",
    "host": "posthog, mixpanel, amplitude: the API host",
    "url": "webhook: where batches are POSTed",
    "auth": "webhook: the Authorization header (secret)",
    "secret": "webhook: a whsec_ signing secret (secret)",
    "personal_api_key": "posthog: a personal API key (person:write), to forward forgets (secret)",
    "project_id": "posthog: the project's id, to forward forgets",
    "gdpr_token": "mixpanel: an OAuth token for the GDPR API, to forward forgets (secret)",
    "secret_key": "amplitude: the secret key, to forward forgets (secret)",
    "app_host": "posthog, mixpanel, amplitude: the deletion API's host",
}


def cmd_destinations(settings: Settings, args: argparse.Namespace) -> int:
    from sinks.destinations.app import serve

    asyncio.run(serve(settings, _bootstrap(settings)))
    return 0


def cmd_project_destinations(settings: Settings, args: argparse.Namespace) -> int:
    from ingest.kafka_connection import security_options
    from sinks.destinations import project_destinations as pd

    bootstrap, security = _bootstrap(settings), security_options(settings)
    try:
        if args.destinations_command == "add":
            given = {n: getattr(args, n) for n in DESTINATION_OPTIONS if getattr(args, n)}
            record = pd.new_record(settings, args.project, args.type, given)
            asyncio.run(pd.publish(bootstrap, record, security=security))
            print(f"added {args.type} destination for project {args.project!r}:", file=sys.stderr)
            print(record["destination_id"])
        elif args.destinations_command == "list":
            found = pd.current(bootstrap, security=security)
            for row in pd.shown(list(asyncio.run(found).values())):
                if args.project in (None, row["project"]):
                    print(json.dumps(row))
        else:
            asyncio.run(pd.remove(bootstrap, args.destination_id, security=security))
            print(f"destination {args.destination_id}: removed")
    except (ValueError, OSError) as error:
        sys.exit(f"millimetric destinations: {error}")
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    from gateway import key_admin
    from ingest.kafka_connection import security_options

    bootstrap = _bootstrap(settings)
    idem = settings.kafka_idempotence and settings.kafka_bootstrap_servers is not None
    security = security_options(settings)
    if args.keys_command == "create":
        if args.origin and args.type != "pk":
            sys.exit("millimetric: --origin applies to pk keys only")
        raw = asyncio.run(
            key_admin.create_key(
                bootstrap,
                args.project,
                args.type,
                args.env,
                args.origin or [],
                idem,
                security=security,
            )
        )
        # Gateways pick a new key up within a few hundred ms: give them that before the
        # caller's first request, so `KEY=$(millimetric keys create ...)` then curl just works.
        time.sleep(KEY_PROPAGATION_S)
        print(
            f"created {args.type} key for project {args.project!r} (shown once; store it now):",
            file=sys.stderr,
        )
        print(raw)
    elif args.keys_command == "limits":
        from gateway.rate_limit import Limit

        if args.reset == (args.rate is not None or args.burst is not None):
            sys.exit("millimetric: give --rate and --burst, or --reset")
        try:
            limit = None if args.reset else Limit(args.rate, args.burst)
            asyncio.run(
                key_admin.set_project_limit(
                    bootstrap, args.project, args.route, limit, idem, security=security
                )
            )
        except ValueError as error:
            sys.exit(f"millimetric: {error}")
        shown = "the default" if limit is None else f"{limit.rate:g}/s, burst {limit.burst}"
        print(f"project {args.project!r} /v1/{args.route}: {shown}")
    elif args.keys_command == "list":
        everything = asyncio.run(key_admin.read_key_records(bootstrap, security=security))
        records = key_admin.current_keys(everything)
        print("prefix\tproject\ttype\torigins\tstatus")
        for r in records.values():
            if args.project in (None, r["project"]):
                status = "revoked" if r["revoked_at"] else "active"
                print(
                    f"{r['prefix']}…\t{r['project']}\t{r['kind']}\t"
                    f"{','.join(r['origins'])}\t{status}"
                )
        limits = key_admin.current_limits(everything)
        if limits:
            print("\nproject\troute\trate\tburst")
            for (project, route), r in sorted(limits.items()):
                if args.project in (None, project):
                    print(f"{project}\t{route}\t{r['rate']:g}\t{r['burst']}")
    else:
        count = asyncio.run(key_admin.revoke_key(bootstrap, args.key, idem, security=security))
        print(f"revoked {count} key(s)")
        return 0 if count else 1
    return 0


def cmd_hooks(settings: Settings, args: argparse.Namespace) -> int:
    from gateway import hook_admin
    from gateway.key_admin import read_key_records

    bootstrap = _bootstrap(settings)
    idem = settings.kafka_idempotence and settings.kafka_bootstrap_servers is not None
    fresh: str | None = None
    try:
        if args.hooks_command == "create":
            from pathlib import Path

            from processors.hook_mapping import load_mapping_file

            mapping = load_mapping_file(Path(args.mapping)) if args.mapping else None
            hook, fresh = asyncio.run(
                hook_admin.create_hook(
                    bootstrap, args.project, args.provider, args.secret, mapping,
                    args.signature_header, idem,
                )
            )  # fmt: skip
            time.sleep(KEY_PROPAGATION_S)  # as for keys: gateways pick the hook up first
            print(f"created {args.provider} hook for project {args.project!r}:", file=sys.stderr)
            print(f"url: /v1/hooks/{hook['hook_id']}")
        elif args.hooks_command == "list":
            hooks = hook_admin.current_hooks(asyncio.run(read_key_records(bootstrap)))
            print("hook_id\tproject\tprovider\tsecrets\tmapping\tstatus")
            for h in hooks.values():
                if args.project in (None, h["project"]):
                    status = "revoked" if h["revoked_at"] else "active"
                    print(
                        f"{h['hook_id']}\t{h['project']}\t{h['provider']}\t{len(h['secrets'])}"
                        f"\t{'file' if h['mapping'] else 'default'}\t{status}"
                    )
        elif args.hooks_command == "rotate":
            _, fresh = asyncio.run(
                hook_admin.rotate_hook(bootstrap, args.hook_id, args.secret, idem)
            )
            print(
                f"hook {args.hook_id}: new secret added; the old ones stay valid", file=sys.stderr
            )
        elif args.old_secrets:
            asyncio.run(hook_admin.retire_old_secrets(bootstrap, args.hook_id, idem))
            print(f"hook {args.hook_id}: only the newest secret is valid now")
        else:
            asyncio.run(hook_admin.revoke_hook(bootstrap, args.hook_id, idem))
            print(f"hook {args.hook_id}: revoked")
    except (ValueError, OSError) as error:
        sys.exit(f"millimetric hooks: {error}")
    if fresh is not None:
        print("signing secret (shown once; give it to the provider):", file=sys.stderr)
        print(f"secret: {fresh}")
    return 0


def _query(settings: Settings, query: str, write: bool = False) -> str:
    """Run a query on the configured ClickHouse and return TSV; exit with its message on error.

    Without `write`, only one read query is allowed (the sink's endpoint enforces it too)."""
    from sinks.clickhouse import open_configured
    from sinks.sql_endpoint import SqlRefused, query_endpoint, read_only_refusal

    if not write and (refusal := read_only_refusal(query)):
        sys.exit(f"millimetric sql: {refusal}")
    if settings.clickhouse_url is None:
        # A running sink holds the embedded store: ask it.
        try:
            return query_endpoint(settings.data_dir, query, write=write)
        except SqlRefused as error:
            sys.exit(f"millimetric sql: {error}")
        except OSError:
            pass  # no sink serves (or a stale endpoint file): open the store directly
    try:
        ch = open_configured(settings)
    except RuntimeError as error:
        sys.exit(
            f"millimetric sql: cannot open the embedded store in {settings.data_dir} "
            f"(another process may hold it and is not serving queries yet): {error}"
        )
    try:
        return ch.query_tsv(query)
    except Exception as error:
        sys.exit(f"millimetric sql: {error}")
    finally:
        ch.close()


def cmd_sql(settings: Settings, args: argparse.Namespace) -> int:
    sys.stdout.write(_query(settings, args.query, args.write))
    return 0


def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.key_admin import read_forget_status
    from ingest.kafka_connection import security_options

    forget_id = args.forget_id
    if not re.fullmatch(r"fgt_[0-9a-f]{32}", forget_id):
        sys.exit("millimetric forget: a forget id looks like fgt_ and 32 hex digits")
    bootstrap = _bootstrap(settings)
    # The keys topic, which the gateway's GET /v1/forget/{forget_id} answers from too.
    status = asyncio.run(
        read_forget_status(bootstrap, forget_id, security=security_options(settings))
    )
    # Per-project destinations (`destinations add`) record outcomes without any setting on.
    if (
        outcomes := _forget_destinations(settings, bootstrap, forget_id)
    ) or settings.destinations():
        status["destinations"] = outcomes
    print(json.dumps(status))
    return 0


def _forget_destinations(settings: Settings, bootstrap: str, forget_id: str) -> dict[str, Any]:
    """Each destination's outcome of a forget (PostHog, Mixpanel, Amplitude deletion), the
    per-project ones named by their id."""
    from ingest.kafka_connection import security_options
    from sinks.destinations.forgets import outcomes

    found = asyncio.run(outcomes(bootstrap, forget_id, security_options(settings)))
    return {name: {"status": o["status"], "detail": o["detail"]} for name, o in found.items()}


def cmd_classify(settings: Settings, args: argparse.Namespace) -> int:
    from processors.classify_cli import run_classify_cli

    return run_classify_cli(args.url, args.referrer, sys.stdin, sys.stdout)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from ingest import status

    if args.watch:
        with contextlib.suppress(KeyboardInterrupt):
            status.watch(settings, args.interval)
        return 0
    figures = status.collect(status.metrics_urls(settings))
    if args.json or not sys.stdout.isatty():
        print(json.dumps(figures))
    else:
        from rich.console import Console

        Console().print(status.render(figures))
    return 1 if figures["unhealthy"] else 0


def _import_bench() -> Any:
    """bench.run, which is not in the wheel: from the checkout this package was installed from
    (`pip install -e`), or an exit saying where to run it."""
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "bench" / "run.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))  # an editable install maps only the shipped packages
    try:
        import bench.run
    except ModuleNotFoundError as error:
        if error.name not in ("bench", "bench.run"):
            raise DevExtraMissing(
                f"{error.name} is not installed: the benches need the bench extra "
                "(pip install -e '.[bench]' in a checkout)"
            ) from error
        sys.exit(
            "millimetric bench: the benches are not part of the installed package; run them "
            "from a checkout: git clone the repository, then pip install -e '.[bench]' "
            "and run .venv/bin/millimetric bench there"
        )
    return bench.run


def cmd_bench(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    run_bench = _import_bench().main
    return run_bench(args.quick, Path(args.json) if args.json else None, args.read_events)


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from ingest.backfill import run

    host = args.host or settings.host or f"http://127.0.0.1:{settings.gateway_port}"
    key = args.key or (settings.key.get_secret_value() if settings.key else None)
    if not key:
        sys.exit("millimetric backfill: give --key or MILLIMETRIC_KEY (an sk_ key)")
    paths = [Path(p) for p in args.files]
    if missing := [str(p) for p in paths if not p.is_file()]:
        sys.exit(f"millimetric backfill: no such file: {', '.join(missing)}")
    size = min(args.batch_size, settings.batch_max_events)
    return run(host, key, paths, size, settings.batch_max_bytes * 9 // 10)


def cmd_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from ingest.dead_letter_replay import list_letters, replay

    bootstrap = _bootstrap(settings)
    if args.dl_command == "list":
        return list_letters(bootstrap, args.reason, args.since, settings.data_dir)
    return replay(bootstrap, settings.data_dir, args.reason, args.wait)


def _instant(text: str, flag: str) -> int:
    """Epoch ms of an ISO 8601 time (UTC when it names no zone)."""
    from ingest.iso_time import epoch_ms

    try:
        return epoch_ms(text)
    except ValueError:
        sys.exit(f"millimetric replay: {flag} {text!r} is not an ISO 8601 time")


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from processors.replay import Window, replay, wait_for_sink

    since = _instant(args.since, "--since")
    until = _instant(args.until, "--until") if args.until else None
    if until is not None and until <= since:
        sys.exit("millimetric replay: --until must be later than --since")
    bootstrap = _bootstrap(settings)
    window = Window(since, until, args.project)
    outcome = asyncio.run(replay(settings, bootstrap, window))
    print(
        f"replayed {outcome.events} events (version {outcome.version}), "
        f"{outcome.failed} failed again (dead-lettered before: see `millimetric dead-letters`)"
    )
    print("waiting for the sinks to store them...", file=sys.stderr)
    if not asyncio.run(wait_for_sink(bootstrap, settings, args.wait)):
        sys.exit(
            f"millimetric replay: the sinks did not store the replayed rows within {args.wait:g}s;"
            " daily_rollup and sessions are not rebuilt yet: run the same replay again"
        )
    days = _rebuild_rollups(settings, (since, until, args.project), outcome.days)
    print(f"rebuilt daily_rollup and sessions for {days} project-days")
    return 1 if outcome.failed else 0


def _rebuild_rollups(
    settings: Settings, window: tuple[int, int | None, str | None], replayed: dict[str, set[str]]
) -> int:
    """Rebuild the aggregates of the days the window's (since ms, until ms, project) events fall
    on; returns how many project-days."""
    from sinks.clickhouse import ClickHouse, open_configured
    from sinks.rollup_rebuild import rebuild, received_days
    from sinks.sql_endpoint import EndpointClickHouse

    ch: ClickHouse | None = None
    if settings.clickhouse_url is None:
        with contextlib.suppress(OSError):  # a running sink holds the embedded store
            ch = EndpointClickHouse(settings.data_dir)
    ch = ch or open_configured(settings)
    try:
        days = received_days(ch, *window)
        for project, dates in replayed.items():
            days.setdefault(project, set()).update(dates)
        for project, dates in days.items():
            rebuild(ch, project, dates)
        return sum(map(len, days.values()))
    finally:
        ch.close()


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="millimetric",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", dest="data_dir", help="MILLIMETRIC_DATA_DIR")
    p.add_argument(
        "--kafka", dest="kafka_bootstrap_servers", help="MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS"
    )
    p.add_argument("--clickhouse-url", dest="clickhouse_url", help="MILLIMETRIC_CLICKHOUSE_URL")
    sub = p.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="run the whole pipeline, embedded")
    dev.add_argument(
        "--ephemeral",
        dest="dev_ephemeral",
        action="store_const",
        const=True,
        help="keep the queue in memory (MILLIMETRIC_DEV_EPHEMERAL)",
    )
    dev.set_defaults(run=cmd_dev)
    gw = sub.add_parser("gateway", help="run the HTTP gateway")
    gw.add_argument("--host", dest="gateway_host")
    gw.add_argument("--port", dest="gateway_port", type=int)
    gw.set_defaults(run=cmd_gateway)
    sub.add_parser("processor", help="run a processor worker").set_defaults(run=cmd_processor)
    sub.add_parser("sink", help="run a ClickHouse sink").set_defaults(run=cmd_sink)
    dest = sub.add_parser("destinations", help="forward enriched events to other tools")
    dest_commands = dest.add_subparsers(dest="destinations_command", required=True)
    dest_commands.add_parser(
        "run", help="run every destination configured (README, Destinations)"
    ).set_defaults(run=cmd_destinations)
    dadd = dest_commands.add_parser("add", help="add a destination of one project")
    dadd.set_defaults(run=cmd_project_destinations)
    dadd.add_argument("--project", required=True)
    dadd.add_argument(
        "--type", required=True, choices=["posthog", "mixpanel", "amplitude", "webhook"]
    )
    for name, about in DESTINATION_OPTIONS.items():
        dadd.add_argument("--" + name.replace("_", "-"), dest=name, help=about)
    dls = dest_commands.add_parser("list", help="list per-project destinations (no secrets)")
    dls.set_defaults(run=cmd_project_destinations)
    dls.add_argument("--project")
    drm = dest_commands.add_parser("remove", help="remove a per-project destination")
    drm.set_defaults(run=cmd_project_destinations)
    drm.add_argument("destination_id")

    keys = sub.add_parser("keys", help="manage API keys")
    keys.set_defaults(run=cmd_keys)
    ks = keys.add_subparsers(dest="keys_command", required=True)
    create = ks.add_parser("create", help="create a key; prints it alone on the last line")
    create.add_argument("--project", required=True)
    create.add_argument("--type", choices=("pk", "sk", "rk"), required=True)
    create.add_argument("--env", choices=("live", "test"), default="live")
    create.add_argument(
        "--origin",
        action="append",
        help="allowed Origin for a pk key (repeatable), e.g. https://site.example",
    )
    ls = ks.add_parser("list", help="list keys (prefixes only)")
    ls.add_argument("--project")
    revoke = ks.add_parser("revoke", help="revoke a key (whole key, or its listed prefix)")
    revoke.add_argument("key")
    limits = ks.add_parser("limits", help="override a project's rate limit on one route")
    limits.add_argument("--project", required=True)
    limits.add_argument(
        "--route",
        required=True,
        help="track, identify, batch, batch_historical, forget, hooks or read",
    )
    limits.add_argument("--rate", type=float, help="requests per second")
    limits.add_argument("--burst", type=int, help="bucket size")
    limits.add_argument("--reset", action="store_true", help="back to the default")

    hooks = sub.add_parser("hooks", help="manage webhook receivers")
    hooks.set_defaults(run=cmd_hooks)
    hs = hooks.add_subparsers(dest="hooks_command", required=True)
    hcreate = hs.add_parser("create", help="create a hook; prints its URL (and a new secret)")
    hcreate.add_argument("--project", required=True)
    hcreate.add_argument(
        "--provider",
        required=True,
        help="a row of gateway/webhook_schemes.toml: stripe, github, shopify, standard, "
        "generic (HMAC) or bearer",
    )
    hcreate.add_argument("--secret", help="the provider's signing secret (generated if omitted)")
    hcreate.add_argument("--mapping", help="a TOML mapping file (see README, Webhooks)")
    hcreate.add_argument("--signature-header", help="generic hooks: the header with the HMAC")
    hls = hs.add_parser("list", help="list hooks (no secrets)")
    hls.add_argument("--project")
    hrotate = hs.add_parser("rotate", help="add a signing secret; the old ones stay valid")
    hrotate.add_argument("hook_id")
    hrotate.add_argument("--secret", help="the new secret (generated if omitted)")
    hrevoke = hs.add_parser("revoke", help="revoke a hook, or with --old-secrets end a rotation")
    hrevoke.add_argument("hook_id")
    hrevoke.add_argument("--old-secrets", action="store_true", help="keep only the newest secret")

    forget = sub.add_parser("forget", help="erasure requests")
    fs = forget.add_subparsers(dest="forget_command", required=True)
    status = fs.add_parser("status", help="pending or done, with rows deleted (JSON)")
    status.add_argument("forget_id")
    forget.set_defaults(run=cmd_forget)

    sql = sub.add_parser("sql", help="run a query on the configured ClickHouse, print TSV")
    sql.add_argument("query")
    sql.add_argument(
        "--write", action="store_true", help="allow statements that change data or schema"
    )
    sql.set_defaults(run=cmd_sql)

    classify = sub.add_parser(
        "classify", help="attribute a visit; JSON lines on stdin without --url"
    )
    classify.add_argument("--url")
    classify.add_argument("--referrer")
    classify.set_defaults(run=cmd_classify)

    st = sub.add_parser(
        "status",
        help="the pipeline on one screen, from the stages' metrics",
        description="Example: millimetric status --json | jq .lag\n"
        "Exit status 1 when something is unhealthy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    st.add_argument("--json", action="store_true", help="one JSON object (also when piped)")
    st.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    st.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    st.set_defaults(run=cmd_status)

    bench = sub.add_parser("bench", help="benchmark every stage against same-run baselines")
    bench.add_argument("--quick", action="store_true", help="small sizes: about 6 minutes")
    bench.add_argument("--json", default="bench-results.json", help="where to write the rows")
    bench.add_argument(
        "--read-events",
        type=int,
        help="events the read API bench loads (default 100k quick, 1M full; 0 skips it)",
    )
    bench.set_defaults(run=cmd_bench)

    backfill = sub.add_parser("backfill", help="import history through /v1/batch (resumable)")
    backfill.add_argument("files", nargs="+", help="NDJSON or CSV (with a header), .gz/.zst too")
    backfill.add_argument("--host", help="gateway URL (MILLIMETRIC_HOST)")
    backfill.add_argument("--key", help="an sk_ key (MILLIMETRIC_KEY)")
    backfill.add_argument("--batch-size", type=int, default=1000, help="events per request")
    backfill.set_defaults(run=cmd_backfill)

    dead = sub.add_parser("dead-letters", help="list or replay dead-lettered records")
    ds = dead.add_subparsers(dest="dl_command", required=True)
    dl_list = ds.add_parser("list", help="what was dead-lettered, when and why (TSV)")
    dl_list.add_argument("--reason", help="only letters whose reason contains this")
    dl_list.add_argument("--since", help="only letters since this ISO 8601 time")
    dl_replay = ds.add_parser("replay", help="send letters back through the pipeline, once each")
    dl_replay.add_argument("--reason", help="only letters whose reason contains this")
    dl_replay.add_argument(
        "--wait", type=float, default=20.0, help="seconds to watch for letters failing again"
    )
    dead.set_defaults(run=cmd_dead_letters)

    rp = sub.add_parser(
        "replay", help="re-derive a window of the raw topic; the new rows replace the old"
    )
    rp.add_argument("--since", required=True, help="ISO 8601 time (UTC unless it says)")
    rp.add_argument("--until", help="ISO 8601 time; default: the raw topic's end")
    rp.add_argument("--project", help="only this project's events")
    rp.add_argument(
        "--wait", type=float, default=600.0, help="seconds to wait for the sinks to store them"
    )
    rp.set_defaults(run=cmd_replay)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `millimetric` script."""
    args = parser().parse_args(argv)
    settings = _settings(args)
    logging.config.dictConfig(dict_config(settings.log_level))
    try:
        return int(args.run(settings, args) or 0)
    except DevExtraMissing as error:  # production installs: say which extra, not a traceback
        sys.exit(f"millimetric {args.command}: {error}")


if __name__ == "__main__":
    sys.exit(main())
