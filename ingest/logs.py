"""Logs: JSON lines (time, level, logger, message) when stderr is not a terminal, so that a log
collector parses them; plain readable lines on a terminal. Every stage and the CLI use this one
configuration (uvicorn and Faust are given it too, instead of their own)."""

from __future__ import annotations

import sys
from typing import Any

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


def dict_config(level: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` configuration for the process at `level`."""
    formatter: dict[str, Any] = (
        {"format": PLAIN}
        if sys.stderr.isatty()
        else {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": JSON_FIELDS,
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        }
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["default"]},
        # uvicorn's loggers go to the root's handler rather than their own.
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }
