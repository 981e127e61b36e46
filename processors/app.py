"""The processor: a Faust worker that enriches raw events, stitches identities, handles forgets.

`run` is where a worker's loop starts; `build_app` puts together the Faust app (`faust_app.py`:
topics and tables), the worker's /ready page and its three agents, one per module:
- `events_agent.py` reads the raw topic: enrichment in steps, each step's output acked by the
  broker before Faust commits its offsets; it keeps `identities` (raw topic's key
  `project:anonymous_id` -> user_id), which fills user_id in later events;
- `devices_agent.py` keeps `user_devices` (`project:user_id` -> anonymous_ids), fed through the
  identities topic, which re-keys links by user. A forget is resolved on that topic too: the
  forget agent only appends the request to the user's identities partition, so the devices agent
  meets it after every link published before it (two topics have no order between them: a
  forget read from the forgets topic could be handled before links its consumer had not fetched
  yet);
- `forgets_agent.py` forwards forget requests there, and says how one is resolved.
State lives in changelog-backed Faust tables, each co-partitioned with the topic its agent reads.
A forget fans out as control records on the raw topic, one per anonymous_id, so the agent that
owns each visitor's state drops it (a tombstone on the changelog) in order with their events;
an identify past the devices-per-user cap is undone the same way (an `unlink` control).
Tables live in RocksDB files under `<data_dir>/processor-tables` (or in memory, for tests).
"""

from __future__ import annotations

import logging
from typing import Any

import faust

from ingest.lag import watch_in_thread
from ingest.logs import dict_config
from ingest.ops_port import serve
from ingest.settings import Settings
from processors.devices_agent import add_devices_agent
from processors.events_agent import add_events_agent, configured_enricher
from processors.faust_app import new_processor
from processors.forgets_agent import add_forgets_agent
from processors.geo import CountryLookup

log = logging.getLogger(__name__)


def build_app(settings: Settings, bootstrap: str) -> faust.App:
    """The Faust app with its topics, tables and agents, ready for a worker."""
    processor = new_processor(settings, bootstrap)
    countries = CountryLookup(settings.geoip_path)
    log.warning("geo: %s", countries.description)

    @processor.app.page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        """Whether the worker runs with a geo database (country is empty without one)."""
        return web.json(
            {"ok": True, "geo_available": countries.available, "geo": countries.description}
        )

    add_events_agent(processor, configured_enricher(settings, countries))
    add_devices_agent(processor)
    add_forgets_agent(processor)
    return processor.app


def run(settings: Settings, bootstrap: str) -> None:
    """Run a processor worker until it is stopped (SIGINT/SIGTERM)."""
    app = build_app(settings, bootstrap)
    serve("processor", settings.processor_metrics_port, settings.metrics_host)
    # The sink's lag too: it must grow while no sink runs.
    watch_in_thread(bootstrap, ("processor", "sink"), "processor", settings)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        logging_config=dict_config(settings.log_level),
    )
    # Faust's terminal spinner lowers the root logger to DEBUG so that every log call spins it:
    # every debug call on the hot path then builds a LogRecord. No spinner, no such cost.
    worker.spinner = None
    worker.execute_from_commandline()
