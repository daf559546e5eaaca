"""A data directory read into Spark and checked by the local loader's own parsers.

Each table is ``<name>.csv`` or ``<name>.parquet``, or a directory ``<name>/`` (also
``<name>.csv/``, ``<name>.parquet/``) of part files, as Spark and most warehouses write them.
Cells are read as text and converted partition by partition with `insertrec.data.parse_cells`,
the same conversions and messages as ``load_data``; the checks that span rows (duplicate keys,
references to orders) run as Spark aggregations over the whole table. What differs from the
local loader, and why: a problem names the part file but not its line (Spark does not keep
line numbers), at most ``MAX_PROBLEMS`` problems are listed, and ``--skip-bad-rows`` is not
offered (a partition cannot cascade a rejected order to the exposures in another one).

Timestamps leave the parsers as int64 UTC nanoseconds (``*_ns`` semantics in a ``long``
column), so that no time zone or precision is changed on the way to the Python workers.
"""

from __future__ import annotations

import functools
import hashlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from insertrec.catalog import Catalog
from insertrec.data import EXPOSURE_DTYPES, INCIDENT_DTYPES, NPS_DTYPES, ORDER_DTYPES, Dataset, find_tables, parse_cells
from insertrec.errors import DataError, Problem
from insertrec.schema import TABLES

MAX_PROBLEMS = 200
POSITION = "_pos"   # a row's place in its table, files in the order read: the local loader keeps that order
TIMESTAMPS = {"orders": ("order_ts",), "nps": ("response_ts",), "incidents": ("ts",), "exposures": ()}
_DTYPES = {"orders": ORDER_DTYPES, "nps": NPS_DTYPES, "exposures": EXPOSURE_DTYPES, "incidents": INCIDENT_DTYPES}
_SPARK_TYPES = {"str": T.StringType(), "float64": T.DoubleType(), "int64": T.LongType(), "bool": T.BooleanType(),
                "datetime64[ns, UTC]": T.LongType()}
_PROBLEM = (("_pfile", T.StringType()), ("_prow", T.LongType()), ("_pcolumn", T.StringType()),
            ("_preason", T.StringType()), ("_pvalue", T.StringType()))


@dataclass
class SparkTables:
    """The checked tables of one data directory as Spark DataFrames (absent optional tables are
    None). ``ctx_numeric``: per ``ctx_*`` column of the orders, whether every value given is a
    number (the local loader's rule, applied to the whole column rather than to a partition)."""

    orders: DataFrame
    nps: DataFrame | None
    exposures: DataFrame | None
    incidents: DataFrame | None
    catalog: Catalog | None
    source: str
    ctx_numeric: dict[str, bool]

    def table(self, name: str) -> DataFrame | None:
        return getattr(self, name)


def _locate(directory: Path, name: str) -> tuple[Path, str] | None:
    """The file or part-file directory of table ``name`` and its format."""
    found: list[tuple[Path, str]] = []
    for candidate in (directory / f"{name}.csv", directory / f"{name}.parquet", directory / name):
        if candidate.is_file():
            found.append((candidate, candidate.suffix[1:]))
        elif candidate.is_dir():
            formats = {p.suffix[1:] for p in candidate.iterdir() if p.is_file() and p.suffix in (".csv", ".parquet")}
            if len(formats) != 1:
                reason = ("both .csv and .parquet part files; keep only one format" if formats
                          else "directory without .csv or .parquet part files")
                raise DataError([Problem(candidate.name, None, None, reason)])
            found.append((candidate, formats.pop()))
    if len(found) > 1:
        raise DataError([Problem(found[0][0].name, None, None,
                                 f"both {found[0][0].name} and {found[1][0].name} exist; keep only one")])
    return found[0] if found else None


def _read_located(spark: SparkSession, directory: Path, name: str) -> tuple[DataFrame, str, list[str]] | None:
    located = _locate(directory, name)
    if located is None:
        return None
    frame = _read_text(spark, *located)
    return frame, located[0].name, frame.columns


def _read_text(spark: SparkSession, path: Path, fmt: str) -> DataFrame:
    """Every column as stripped text, ``""`` when empty, and the part file each row came from.
    The path is made absolute here: the JVM resolves a relative one against its own working
    directory, which is not this process's once it has changed."""
    path = path.resolve()
    if fmt == "csv":
        frame = (spark.read.option("header", True).option("inferSchema", False).option("escape", '"')
                 .option("multiLine", _quoted(path)).option("encoding", "UTF-8").csv(str(path)))
    else:
        frame = spark.read.parquet(str(path))
    frame = frame.withColumn(POSITION, F.monotonically_increasing_id())
    # a CSV read with multiLine is one task per file: spread the rows so that the parsers, the
    # costly part, run on every core (their order is kept in POSITION)
    cores = spark.sparkContext.defaultParallelism
    if frame.rdd.getNumPartitions() < cores:
        frame = frame.repartition(2 * cores)
    columns: list[Column] = []
    for field in frame.schema.fields:
        if field.name == POSITION:
            continue
        col = F.col(f"`{field.name}`")
        if isinstance(field.dataType, (T.FloatType, T.DoubleType)):  # NaN is how some writers say null
            col = F.when(F.isnan(col), F.lit(None)).otherwise(col)
        columns.append(F.coalesce(F.trim(col.cast("string")), F.lit("")).alias(field.name.strip()))
    return frame.select(*columns, F.input_file_name().alias("_source"), POSITION)


def _quoted(path: Path) -> bool:
    """Whether a CSV file (or any part file of a directory) has a double quote, the only way a
    cell can span lines. Without one, Spark reads it line by line, in splits read in parallel
    (a 104 MB orders file in two tasks on two cores) rather than as one stream in one task
    (`multiLine`), and without the shuffle that then spreads its rows over the cores; a scan for
    the byte costs a fraction of a second per 100 MB."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".csv")
    for file in files:
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                if b'"' in chunk:
                    return True
    return False


def _typed_schema(name: str, ctx: list[str]) -> T.StructType:
    fields = [T.StructField(c, _SPARK_TYPES[t]) for c, t in _DTYPES[name].items()]
    fields += [T.StructField(c, T.StringType()) for c in ctx] + [T.StructField(POSITION, T.LongType())]
    return T.StructType(fields + [T.StructField(c, t) for c, t in _PROBLEM])


def _parser(name: str, catalog: Catalog | None, ctx: list[str]):
    """mapInPandas function: text batches -> typed good rows, then one row per problem."""
    dtypes = _DTYPES[name]
    names = [*dtypes, *ctx, POSITION, *(c for c, _ in _PROBLEM)]

    def parse(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for source, cells in batch.groupby("_source", sort=False):
                file = Path(str(source)).name or name
                frame, problems = parse_cells(name, cells.drop(columns=["_source", POSITION]), file, None, catalog)
                out = pd.DataFrame({c: frame[c] for c in dtypes}).reset_index(drop=True)
                for c in TIMESTAMPS[name]:
                    out[c] = out[c].dt.as_unit("ns").astype("int64")
                kept = frame.index.to_numpy()
                for c in ctx:   # the text as given: numeric or not is decided on the whole column
                    out[c] = cells[c].to_numpy(dtype=object)[kept]
                out[POSITION] = cells[POSITION].to_numpy(dtype=np.int64)[kept]
                for c, _ in _PROBLEM:
                    out[c] = None
                yield out
                rows = [p for p in problems if not p.reason.startswith("duplicate")]  # checked across partitions
                if rows:
                    yield pd.DataFrame({"_pfile": [p.file for p in rows], "_prow": [p.row for p in rows],
                                        "_pcolumn": [p.column for p in rows], "_preason": [p.reason for p in rows],
                                        "_pvalue": [p.value for p in rows]}).reindex(columns=names).astype(object)
    return parse


def read_tables(spark: SparkSession, path: str | Path) -> SparkTables:
    """Read and check a data directory (see the module docstring); raises ``DataError`` listing
    the problems found."""
    directory = Path(path)
    if not directory.is_dir():
        raise DataError([Problem(str(directory), None, None, "data directory not found")])
    catalog_path = directory / "catalog.yaml"
    catalog = Catalog.load(catalog_path) if catalog_path.is_file() else None
    found, fatal = find_tables(directory, functools.partial(_read_located, spark))
    text = {name: (frame, file) for name, (frame, file, _) in found.items()}
    if fatal:
        raise DataError(fatal)

    good, ctx_numeric = _checked(text, catalog)
    return SparkTables(good["orders"], good.get("nps"), good.get("exposures"), good.get("incidents"),
                       catalog, str(directory), ctx_numeric)


def read_orders(spark: SparkSession, path: str | Path) -> tuple[DataFrame, dict[str, bool]]:
    """A file of new orders (CSV or Parquet, or a directory of part files) for batch decisions,
    checked like `read_tables`' orders: the typed orders and `SparkTables.ctx_numeric`."""
    file = Path(path)
    located = _locate(file.parent, file.name) if file.exists() else None
    if located is None or located[1] not in ("csv", "parquet"):
        raise DataError([Problem(str(file), None, None, "expected an existing .csv or .parquet file of orders, "
                                                        "or a directory of such part files")])
    frame = _read_text(spark, *located)
    missing = [c for c in TABLES["orders"]["required"] if c not in frame.columns]
    if missing:
        raise DataError([Problem(file.name, None, c, "required column missing") for c in missing])
    good, ctx_numeric = _checked({"orders": (frame, file.name)}, None)
    return good["orders"], ctx_numeric


def _checked(text: dict[str, tuple[DataFrame, str]], catalog: Catalog | None
             ) -> tuple[dict[str, DataFrame], dict[str, bool]]:
    """The tables' good rows typed by the local parsers, and whether each ``ctx_*`` column of
    the orders is numeric; raises ``DataError`` with the problems found."""
    parsed: dict[str, DataFrame] = {}
    ctx = [c for c in text["orders"][0].columns if c.startswith("ctx_")]
    for name, (frame, _) in text.items():
        own_ctx = ctx if name == "orders" else []
        parsed[name] = frame.mapInPandas(_parser(name, catalog, own_ctx), _typed_schema(name, own_ctx)).cache()
    # counted first: a count parses (and caches) every partition in one job on every core, where
    # `limit().collect()` alone parses one partition, then the next, in jobs one after the other
    bad = {name: frame.where(F.col("_preason").isNotNull()) for name, frame in parsed.items()}
    problems = [Problem(r["_pfile"], r["_prow"], r["_pcolumn"], r["_preason"], r["_pvalue"])
                for frame in bad.values() if frame.count()
                for r in frame.limit(MAX_PROBLEMS).collect()]
    good = {name: frame.where(F.col("_preason").isNull()).drop(*(c for c, _ in _PROBLEM))
            for name, frame in parsed.items()}
    # without a bad cell every row is good, and the checks across rows run on the parsed tables
    # (cached) instead of reading the files again; with one, on the text, so that all are listed
    problems += _across_rows(text if problems else {name: (good[name], file) for name, (_, file) in text.items()})
    if problems:
        raise DataError(problems[:MAX_PROBLEMS])
    orders = good["orders"]
    given = [F.col(c) != "" for c in ctx]
    found = orders.agg(*(F.count(F.when(g & F.col(c).try_cast("double").isNull(), 1)).alias(c)
                         for c, g in zip(ctx, given, strict=True))).first() if ctx else None
    ctx_numeric = {c: found is not None and found[c] == 0 for c in ctx}
    return good, ctx_numeric


def _across_rows(text: dict[str, tuple[DataFrame, str]]) -> list[Problem]:
    """Duplicate keys and references to orders, over the whole table."""
    problems: list[Problem] = []
    keys = {"orders": (["order_id"], "duplicate order_id"), "exposures": (["order_id", "slot"], "duplicate (order_id, slot)")}
    for name, (cols, reason) in keys.items():
        if name not in text:
            continue
        frame, file = text[name]
        usable = [F.col(c) != "" for c in cols]
        dup = (frame.where(functools.reduce(operator.and_, usable))
               .groupBy(*cols).count().where(F.col("count") > 1).limit(MAX_PROBLEMS).collect())
        problems += [Problem(file, None, cols[0], f"{reason} ({r['count']} rows)", "|".join(r[c] for c in cols))
                     for r in dup]
    order_ids = text["orders"][0].select("order_id").distinct()
    for name in ("exposures", "incidents"):
        if name not in text:
            continue
        frame, file = text[name]
        unknown = (frame.where(F.col("order_id") != "").join(order_ids, "order_id", "left_anti")
                   .select("order_id").limit(MAX_PROBLEMS).collect())
        problems += [Problem(file, None, "order_id", "order_id not found in orders", r["order_id"]) for r in unknown]
    return problems


def fingerprint(tables: SparkTables) -> str:
    """`Dataset.fingerprint` of the tables as the local loader holds them (the orders by time then
    id, the other tables in file order), computed by the local hash on Spark partitions; the driver
    feeds the per-row hashes to SHA-256 one partition at a time, in that order."""
    h = hashlib.sha256()
    for name in ("orders", "nps", "exposures", "incidents"):
        h.update(name.encode())
        frame = tables.table(name)
        if frame is None:
            continue
        order = ["order_ts", "order_id"] if name == "orders" else [POSITION]
        hashed = frame.orderBy(*order).mapInPandas(_row_hashes(name, tables.ctx_numeric), _HASHES)
        for row in hashed.toLocalIterator():
            h.update(row["hashes"])
    if tables.catalog is not None:
        h.update(tables.catalog.sha256.encode())
    return h.hexdigest()


_HASHES = T.StructType([T.StructField("hashes", T.BinaryType())])


def _row_hashes(name: str, ctx_numeric: dict[str, bool]):
    """mapInPandas function: each batch's rows as the local table, hashed row by row (8 bytes a row)."""
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            frame = getattr(to_dataset({name: batch}, None, ctx_numeric), name)
            yield pd.DataFrame({"hashes": [pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()]})
    return run


def to_dataset(frames: dict[str, pd.DataFrame], catalog: Catalog | None, ctx_numeric: dict[str, bool],
               source: str = "") -> Dataset:
    """Typed pandas pieces of the tables (as `read_tables` leaves them) as a local ``Dataset``."""
    tables: dict[str, pd.DataFrame] = {}
    for name, dtypes in _DTYPES.items():
        frame = frames.get(name)
        if frame is None:
            frame = pd.DataFrame({c: pd.Series(dtype="int64" if c in TIMESTAMPS[name] else t)
                                  for c, t in dtypes.items()}
                                 | {c: pd.Series(dtype="str") for c in ctx_numeric if name == "orders"})
        out = pd.DataFrame({c: (pd.to_datetime(frame[c].to_numpy(dtype=np.int64), utc=True, unit="ns")
                                if c in TIMESTAMPS[name] else frame[c]) for c in dtypes}).astype(dtypes)
        if name == "orders":
            for c, numeric in ctx_numeric.items():
                values = frame[c].fillna("")
                out[c] = (pd.to_numeric(values.where(values != ""), errors="coerce").astype("float64") if numeric
                          else values.astype("str"))
            out = out.sort_values(["order_ts", "order_id"], kind="stable").reset_index(drop=True)
        tables[name] = out.reset_index(drop=True)
    return Dataset(catalog=catalog, source=source, **tables)


__all__ = ["MAX_PROBLEMS", "POSITION", "TIMESTAMPS", "SparkTables", "fingerprint", "read_orders", "read_tables",
           "to_dataset"]
