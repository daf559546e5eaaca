"""The SparkSession a command runs on."""

from __future__ import annotations

from collections.abc import Mapping

from pyspark.sql import SparkSession

from insertrec.errors import InsertrecError

# Why each default: timestamps are read and written in UTC as everywhere in insertrec; Arrow
# carries pandas batches to and from the Python workers; the UI would listen on a port.
DEFAULTS = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "8",
}


def parse_conf(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--spark-conf``) as a dict; a malformed one is refused by name."""
    conf: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InsertrecError(f"--spark-conf {pair!r}: expected KEY=VALUE, e.g. spark.executor.memory=4g")
        conf[key.strip()] = value.strip()
    return conf


def spark_session(master: str = "local[*]", conf: Mapping[str, str] | None = None,
                  app_name: str = "insertrec") -> SparkSession:
    """A session on ``master`` with insertrec's defaults, overridden by ``conf``."""
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in (DEFAULTS | dict(conf or {})).items():
        builder = builder.config(key, value)
    try:
        return builder.getOrCreate()
    except Exception as err:  # a JVM that cannot start raises Py4J/Java errors of many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InsertrecError(f"--engine spark: could not start Spark on {master!r} ({first}); "
                             "Spark needs Java 17 or later on PATH or JAVA_HOME") from None


__all__ = ["DEFAULTS", "parse_conf", "spark_session"]
