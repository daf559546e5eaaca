"""Structured logs: one JSON object a line, ids only.

Only whitelisted ``extra`` fields are written, and none of them carries
order values, names, addresses or IP addresses: a log line can say which
order and customer a decision was for, never what they bought or who they
are. Uvicorn's access log is off for the same reason (it records client
addresses); request counts and latencies are in ``/metrics``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["FIELDS", "JsonFormatter", "uvicorn_log_config"]

FIELDS: tuple[str, ...] = ("event", "order_id", "customer_id", "decision_id", "policy", "model_version",
                           "reason", "route", "status", "generation", "worker", "error_type")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", <whitelisted extras>}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        return json.dumps(out, separators=(",", ":"), default=str)


def uvicorn_log_config(level: str) -> dict[str, Any]:
    """`logging.config.dictConfig` for uvicorn and insertrec: JSON lines on stderr, no access log."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"stderr": handler},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "insertrec": {"handlers": ["stderr"], "level": level, "propagate": False},
        },
    }
