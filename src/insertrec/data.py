"""A shop's history, read from a data directory and validated at the boundary.

Every cell is read as text and converted here, column by column, so that each
refusal names the file, the line, the column and the reason, and so that all
problems of all files come back at once: a user fixing an export wants the
whole list, not one error per run.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from insertrec.catalog import Catalog
from insertrec.errors import DataError, Problem
from insertrec.schema import SLOTS, TABLES, context_problems


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


ORDER_DTYPES = {"order_id": "str", "customer_id": "str", "order_ts": "datetime64[ns, UTC]",
                "order_value": "float64", "n_items": "float64", "channel": "str",
                "categories": "str", "is_gift": "bool", "returned_value": "float64", "region": "str"}
NPS_DTYPES = {"customer_id": "str", "response_ts": "datetime64[ns, UTC]", "score": "int64"}
EXPOSURE_DTYPES = {"order_id": "str", "slot": "str", "action_id": "str",
                   "propensity": "float64", "reward": "float64"}
INCIDENT_DTYPES = {"customer_id": "str", "order_id": "str", "type": "str", "ts": "datetime64[ns, UTC]"}
REJECTED_DTYPES = {"file": "str", "row": "Int64", "column": "str", "reason": "str", "value": "str"}


@dataclass
class Dataset:
    """Normalised tables of one data directory (see docs/ARCHITECTURE.md for the columns)."""

    orders: pd.DataFrame
    nps: pd.DataFrame = field(default_factory=lambda: _empty(NPS_DTYPES))
    exposures: pd.DataFrame = field(default_factory=lambda: _empty(EXPOSURE_DTYPES))
    incidents: pd.DataFrame = field(default_factory=lambda: _empty(INCIDENT_DTYPES))
    catalog: Catalog | None = None
    rejected: pd.DataFrame = field(default_factory=lambda: _empty(REJECTED_DTYPES))
    source: str = ""

    def fingerprint(self) -> str:
        """SHA-256 of the normalised content: two runs on the same history share it."""
        h = hashlib.sha256()
        for name in ("orders", "nps", "exposures", "incidents"):
            frame = getattr(self, name)
            h.update(name.encode())
            h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
        if self.catalog is not None:
            h.update(self.catalog.sha256.encode())
        return h.hexdigest()


_T = TypeVar("_T")
_DTYPES = {"orders": ORDER_DTYPES, "nps": NPS_DTYPES, "exposures": EXPOSURE_DTYPES,
           "incidents": INCIDENT_DTYPES}
_EXTENSIONS = (".csv", ".parquet")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
_ARROW_TO_STR = {pa.string(): pd.StringDtype(na_value=np.nan)}
_TS_MIN, _TS_MAX = pd.Timestamp.min.tz_localize("UTC"), pd.Timestamp.max.tz_localize("UTC")
_BAD_TS = "not an ISO 8601 date or time in years 1677..2262 (e.g. 2024-05-31 or 2024-05-31T14:02:00+02:00)"


def load_data(path: str | os.PathLike[str], *, skip_bad_rows: bool = False) -> Dataset:
    """Read, validate and normalise a data directory.

    By default any bad cell refuses the whole directory with a ``DataError``
    listing every problem, because training quietly on a partial history would
    bias everything downstream. ``skip_bad_rows=True`` is for the user who has
    looked at that list and accepts losing those rows: they go to
    ``Dataset.rejected`` (with the exposures and incidents of rejected orders),
    so that every input row ends up either in the Dataset or in ``rejected``.
    Structural problems (a missing file or column, an unreadable file) are
    never skippable.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise DataError([Problem(str(directory), None, None, "data directory not found")])
    catalog_path = directory / "catalog.yaml"
    catalog = Catalog.load(catalog_path) if catalog_path.is_file() else None

    found, fatal = find_tables(directory, _read_located)
    tables = {name: table for name, (table, _, _) in found.items()}

    checks = {name: _Checker(table) for name, table in tables.items()}
    frames = {name: _PARSERS[name](check) for name, check in checks.items()}
    if "exposures" in checks:
        _check_exposure_actions(checks["exposures"], catalog)
    orders = checks.get("orders")
    if orders is not None:
        known = _order_index(orders)
        for name in ("exposures", "incidents"):
            if name in checks:
                _check_order_refs(checks[name], known)

    if fatal or (not skip_bad_rows and any(check.bad.any() for check in checks.values())):
        raise DataError(fatal + [p for check in checks.values() for p in check.problems()])

    assert orders is not None  # no fatal problem means the orders table was parsed
    for name in ("exposures", "incidents"):
        if name in checks:
            _cascade(checks[name], known["line"][~known["kept"]], orders.table.file)

    kept = {name: frames[name][~checks[name].bad] for name in frames}
    order_frame = kept["orders"].sort_values(["order_ts", "order_id"], kind="stable").reset_index(drop=True)
    rejected = pd.concat([_empty(REJECTED_DTYPES)] + [c.rejected() for c in checks.values() if c.bad.any()],
                         ignore_index=True).astype(REJECTED_DTYPES)
    return Dataset(
        orders=order_frame,
        **{name: kept[name].reset_index(drop=True) if name in kept else _empty(_DTYPES[name])
           for name in ("nps", "exposures", "incidents")},
        catalog=catalog,
        rejected=rejected,
        source=str(directory),
    )


def load_orders_file(path: str | os.PathLike[str]) -> pd.DataFrame:
    """One file of new orders (CSV or Parquet, the orders columns), validated like ``load_data``'s.

    For batch decisions: any bad row refuses the file with every problem
    listed, since a silently skipped order would leave a parcel undecided.
    """
    file = Path(path)
    if not file.is_file() or file.suffix not in _EXTENSIONS:
        raise DataError([Problem(str(file), None, None, "expected an existing .csv or .parquet file of orders")])
    table = _read_file(file)
    header = header_problems("orders", table.cells.columns, file.name)
    if header:
        raise DataError(header)
    check = _Checker(table)
    orders = _parse_orders(check)
    if check.bad.any():
        raise DataError(check.problems())
    return orders.sort_values(["order_ts", "order_id"], kind="stable").reset_index(drop=True)


def header_problems(name: str, columns: Iterable[str], file: str) -> list[Problem]:
    """What is wrong with table ``name``'s columns as a whole: a required one missing, or
    (orders) ``ctx_*`` names that are malformed or too many. Never skippable: no row is to blame."""
    columns = [str(c) for c in columns]
    problems = _missing_columns(file, columns, name)
    if name == "orders":
        problems += [Problem(file, None, c, reason) for c, reason in context_problems(columns)]
    return problems


def find_tables(directory: Path, read: Callable[[Path, str], tuple[_T, str, Sequence[str]] | None]
                ) -> tuple[dict[str, tuple[_T, str, Sequence[str]]], list[Problem]]:
    """Every table of a data directory, located and read by ``read(directory, name)`` (the
    table, its file name and its columns; None when absent), checked by `header_problems`.

    One rule set for every reader (the local loader, Spark): which tables are required and
    which columns each must have. Returns the tables that passed, and the problems of the
    others (an absent orders table, a missing column, a file ``read`` refused with a
    ``DataError``), so that a reader can report them with whatever else it finds.
    """
    fatal: list[Problem] = []
    tables: dict[str, tuple[_T, str, Sequence[str]]] = {}
    for name in TABLES:
        try:
            table = read(directory, name)
        except DataError as err:
            fatal.extend(err.problems)
            continue
        if table is None:
            if name == "orders":
                fatal.append(Problem(str(directory), None, None,
                                     "required table missing: expected orders.csv or orders.parquet"))
            continue
        header = header_problems(name, table[2], table[1])
        fatal.extend(header)
        if not header:
            tables[name] = table
    return tables, fatal


def parse_cells(name: str, cells: pd.DataFrame, file: str, lines: np.ndarray | None = None,
                catalog: Catalog | None = None) -> tuple[pd.DataFrame, list[Problem]]:
    """Table ``name``'s text cells (every column ``str``, ``""`` when empty) converted and checked
    by the same code as ``load_data``: the typed frame of the good rows (indexed by their
    position in ``cells``), and every problem.

    For readers that split a table into pieces (Spark's partitions): the checks that span rows
    (duplicate keys, references between tables) see only the piece, so such a reader checks those
    across pieces itself. Exposures are checked against ``catalog`` as ``load_data`` does.
    ``lines`` are what a user calls each row (None: not known, reported as such).
    """
    if name not in _PARSERS:
        raise ValueError(f"unknown table {name!r}; expected one of {', '.join(_PARSERS)}")
    known = lines is not None
    table = _Table(file, _stripped(cells.reset_index(drop=True)),
                   np.asarray(lines) if known else np.zeros(len(cells), dtype=np.int64))
    check = _Checker(table)
    frame = _PARSERS[name](check)
    if name == "exposures":
        _check_exposure_actions(check, catalog)
    problems = check.problems()
    if not known:
        problems = [Problem(p.file, None, p.column, p.reason, p.value) for p in problems]
    return frame[~check.bad], problems


def write_rejected(dataset: Dataset, path: str | os.PathLike[str]) -> int:
    """Write the rows set aside by ``skip_bad_rows`` so the user can fix them at the source.

    ``path`` is the CSV file to write, or a directory to hold ``rejected.csv``.
    The file has one line per problem; the count returned is of input rows
    rejected (a row with two bad cells is one row, two lines).
    """
    target = Path(path)
    if target.is_dir():
        target = target / "rejected.csv"
    dataset.rejected[list(REJECTED_DTYPES)].to_csv(target, index=False)
    return len(dataset.rejected.drop_duplicates(["file", "row"]))


@dataclass
class _Table:
    """One input file as text: every cell stripped, ``""`` when empty."""

    file: str
    cells: pd.DataFrame
    lines: np.ndarray  # what a user calls each row: CSV line number, or 1-based Parquet row


_SEPARATORS = {";": "semicolon", "\t": "tab", "|": "pipe"}


def _missing_columns(file: str, header: list[str], name: str) -> list[Problem]:
    """The required columns of table ``name`` that ``file`` (its ``header``) lacks, each with a
    hint when the cause can be guessed: a file written with another separator (its header reads
    as one column), or a near-miss name (``Order_ID``, ``orderid``, ``customer``)."""
    columns = [str(c) for c in header]
    missing = [c for c in TABLES[name]["required"] if c not in columns]
    if not missing:
        return []
    if len(columns) == 1:
        found = [word for sep, word in _SEPARATORS.items() if sep in columns[0]]
        if found:
            return [Problem(file, None, None, f"the file looks {found[0]}-separated (its header reads as "
                            f"the one column {columns[0]!r}); save it comma-separated")]
    known = {*TABLES[name]["required"], *TABLES[name]["optional"]}
    spare = [c for c in columns if c not in known and not c.startswith("ctx_")]
    return [Problem(file, None, c, "required column missing" + _did_you_mean(c, spare)) for c in missing]


def _did_you_mean(column: str, candidates: list[str]) -> str:
    """``"; the file has 'Order_ID': did you mean order_id?"`` for the closest candidate, if any."""
    def squeeze(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    same = [c for c in candidates if squeeze(c) == squeeze(column)]
    close = same or [c for c in candidates
                     if difflib.get_close_matches(squeeze(column), [squeeze(c)], n=1, cutoff=0.75)]
    return f"; the file has {close[0]!r}: did you mean {column}?" if close else ""


def _read_table(directory: Path, name: str) -> _Table | None:
    found = [directory / (name + ext) for ext in _EXTENSIONS if (directory / (name + ext)).is_file()]
    if len(found) > 1:
        raise DataError([Problem(found[0].name, None, None,
                                 f"both {found[0].name} and {found[1].name} exist; keep only one")])
    return _read_file(found[0]) if found else None


def _read_located(directory: Path, name: str) -> tuple[_Table, str, Sequence[str]] | None:
    table = _read_table(directory, name)
    return None if table is None else (table, table.file, list(table.cells.columns))


def _read_file(file: Path) -> _Table:
    try:
        return _read_csv(file) if file.suffix == ".csv" else _read_parquet(file)
    except UnicodeDecodeError as err:
        reason = f"not UTF-8 text ({err.reason} at byte {err.start})"
    except pd.errors.EmptyDataError:
        reason = "empty file: no header line"
    except (pd.errors.ParserError, OSError, ValueError) as err:  # pyarrow's errors derive from these
        reason = f"unreadable: {' '.join(str(err).split())}"
    raise DataError([Problem(file.name, None, None, reason)])


def _read_csv(file: Path) -> _Table:
    raw = pd.read_csv(file, dtype=str, keep_default_na=False, skip_blank_lines=False,
                      index_col=False, encoding="utf-8")
    cells = _stripped(raw)
    # Blank lines are kept while parsing so that positions map to line numbers
    # (a line with no content at all is not a record, so not one to reject);
    # quoted cells spanning lines push the following rows down. A file without
    # a quote has none: counting every cell's line breaks took 1.3 of the 17.8
    # CPU s of loading the million-order demo history (bench/results/budget.md §5).
    none = np.zeros(len(raw), dtype=np.int64)
    spans = sum((raw[c].str.count("\n").to_numpy() for c in raw.columns), none) if _has_quote(file) else none
    lines = np.arange(2, len(cells) + 2) + np.cumsum(spans) - spans
    blank = (cells == "").all(axis=1).to_numpy()
    return _Table(file.name, cells[~blank].reset_index(drop=True), lines[~blank])


def _has_quote(file: Path) -> bool:
    """Whether the file holds a double quote anywhere (pandas' only way into a multi-line cell)."""
    with open(file, "rb") as f:
        return any(b'"' in block for block in iter(lambda: f.read(1 << 24), b""))


def _read_parquet(file: Path) -> _Table:
    # Typed columns go through the same text conversion as CSV cells, so one
    # set of checks (and one set of messages) serves both formats. Arrow's
    # cast is used because pandas formats 1M timestamps ~5x slower.
    table = pq.read_table(file)
    text = {}
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_floating(column.type):  # NaN is how some writers say null
            column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
        try:
            text[name] = pc.cast(column, pa.string()).to_pandas(types_mapper=_ARROW_TO_STR.get)
        except pa.ArrowNotImplementedError:  # lists, structs: as pandas prints them
            text[name] = column.to_pandas().astype("str")
    return _Table(file.name, _stripped(pd.DataFrame(text)), np.arange(1, table.num_rows + 1))


def _stripped(raw: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({str(c).strip(): raw[c].fillna("").str.strip() for c in raw.columns},
                        index=raw.index)


class _Checker:
    """Conversions of one table's text cells that record every refused cell.

    Each conversion returns the converted column over all rows (whatever it
    could not convert is left at a placeholder) and flags the bad cells;
    ``bad`` marks the rows to refuse.
    """

    def __init__(self, table: _Table):
        self.table = table
        self.bad = np.zeros(len(table.cells), dtype=bool)
        self._found: list[pd.DataFrame] = []

    def col(self, column: str) -> pd.Series:
        """The column's text; an absent optional column reads as all empty."""
        cells = self.table.cells
        return cells[column] if column in cells else pd.Series("", index=cells.index, dtype="str")

    def flag(self, mask: np.ndarray | pd.Series, column: str, reason: str | pd.Series) -> None:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        pos = np.flatnonzero(mask)
        reasons = reason if isinstance(reason, str) else np.asarray(reason, dtype=object)[pos]
        self._found.append(pd.DataFrame({
            "file": self.table.file, "row": self.table.lines[pos], "column": column,
            "reason": reasons, "value": self.col(column).to_numpy(dtype=object)[pos], "_pos": pos}))
        self.bad |= mask

    def text(self, column: str, *, required: bool = False, default: str = "") -> pd.Series:
        s = self.col(column)
        if required:
            self.flag(s == "", column, "is empty")
            return s
        return s.where(s != "", default)

    def number(self, column: str, *, default: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Floats (``default`` for empty cells; ``None`` means the cell is required) and a mask of
        the cells that hold a finite number, for the caller's range checks."""
        s = self.col(column)
        empty = (s == "").to_numpy()
        values = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan, copy=True)
        finite = np.isfinite(values)
        if default is None:
            self.flag(empty, column, "is empty")
        else:
            values[empty] = default
        self.flag(~empty & ~finite, column, "not a finite number")
        return values, finite

    def timestamp(self, column: str) -> pd.Series:
        s = self.col(column)
        ts = pd.to_datetime(s, utc=True, format="ISO8601", errors="coerce")
        in_range = ts.between(_TS_MIN, _TS_MAX).to_numpy()  # NaT is not in range
        empty = (s == "").to_numpy()
        self.flag(empty, column, "is empty")
        self.flag(~empty & ~in_range, column, _BAD_TS)
        return ts.where(in_range).astype("datetime64[ns, UTC]")

    def boolean(self, column: str, *, default: bool) -> np.ndarray:
        s = self.col(column).str.lower()
        true = s.isin(_TRUE).to_numpy()
        known = true | s.isin(_FALSE).to_numpy() | (s == "").to_numpy()
        self.flag(~known, column, "not a boolean (true/false, 1/0 or yes/no)")
        return np.where((s == "").to_numpy(), default, true)

    def duplicates(self, keys: list[str], what: str) -> None:
        """Refuse every repeat of a key after its first row, pointing at that first row."""
        frame = pd.DataFrame({k: self.col(k) for k in keys})
        usable = (frame != "").all(axis=1)
        repeat = frame.duplicated(keep="first") & usable
        first = pd.Series(self.table.lines, index=frame.index).groupby(
            [frame[k] for k in keys], sort=False).transform("first")
        self.flag(repeat, keys[0], f"duplicate {what}; first on line " + first.astype("str"))

    def problems(self) -> list[Problem]:
        found = self._all()
        return [Problem(*r) for r in found[["file", "row", "column", "reason", "value"]]
                .astype({"row": object}).itertuples(index=False, name=None)]

    def rejected(self) -> pd.DataFrame:
        return self._all().drop(columns="_pos")

    def _all(self) -> pd.DataFrame:
        if not self._found:
            return pd.DataFrame(columns=["file", "row", "column", "reason", "value", "_pos"])
        return pd.concat(self._found, ignore_index=True).sort_values("_pos", kind="stable")


def _parse_orders(c: _Checker) -> pd.DataFrame:
    value, value_ok = c.number("order_value")
    c.flag(value_ok & (value < 0), "order_value", "negative")
    value_ok &= value >= 0
    n_items, n_ok = c.number("n_items", default=1.0)
    c.flag(n_ok & (n_items <= 0), "n_items", "must be positive")
    returned, returned_ok = c.number("returned_value", default=0.0)
    c.flag(returned_ok & (returned < 0), "returned_value", "negative")
    c.flag(returned_ok & value_ok & (returned > value), "returned_value", "greater than order_value")
    c.duplicates(["order_id"], "order_id")
    frame = pd.DataFrame({
        "order_id": c.text("order_id", required=True),
        "customer_id": c.text("customer_id", required=True),
        "order_ts": c.timestamp("order_ts"),
        "order_value": value,
        "n_items": n_items,
        "channel": c.text("channel", default="unknown"),
        # [ \t] rather than \s: pandas runs \s in Python per row, this one in Arrow
        "categories": c.col("categories").str.replace(r"[ \t]*\|[ \t]*", "|", regex=True),
        "is_gift": c.boolean("is_gift", default=False),
        "returned_value": returned,
        "region": c.text("region", default="unknown"),
    }).astype(ORDER_DTYPES)
    for name in (n for n in c.table.cells.columns if n.startswith("ctx_")):
        frame[name] = _context(c.col(name))
    return frame


def _context(s: pd.Series) -> pd.Series:
    """A ``ctx_*`` column is numeric when every value given is a number, text otherwise.

    Its distinct values are converted, not its cells: context columns are mostly a few labels
    (an age band, a device), and pandas' ``to_numeric`` failing on a million text cells took
    2.7 of the 17.8 CPU s of loading the million-order demo history (bench/results/budget.md §5).
    """
    codes, values = pd.factorize(s)
    text = pd.Series(values, dtype=s.dtype)
    numbers = pd.to_numeric(text, errors="coerce")
    if (numbers.isna() & (text != "")).any():
        return s
    return pd.Series(numbers.to_numpy(dtype="float64", na_value=np.nan)[codes], index=s.index)


def _parse_nps(c: _Checker) -> pd.DataFrame:
    score, score_ok = c.number("score")
    c.flag(score_ok & ((score != np.round(score)) | (score < 0) | (score > 10)), "score",
           "not an integer from 0 to 10")
    return pd.DataFrame({
        "customer_id": c.text("customer_id", required=True),
        "response_ts": c.timestamp("response_ts"),
        "score": np.where(score_ok, score, 0).astype("int64"),
    }).astype(NPS_DTYPES)


def _parse_exposures(c: _Checker) -> pd.DataFrame:
    propensity, finite = c.number("propensity", default=np.nan)
    c.flag(finite & ~((propensity > 0) & (propensity <= 1)), "propensity", "must be a probability in (0, 1]")
    reward, _ = c.number("reward", default=np.nan)
    c.duplicates(["order_id", "slot"], "(order_id, slot)")
    return pd.DataFrame({
        "order_id": c.text("order_id", required=True),
        "slot": c.text("slot", required=True),
        "action_id": c.text("action_id", required=True),
        "propensity": propensity,
        "reward": reward,
    }).astype(EXPOSURE_DTYPES)


def _parse_incidents(c: _Checker) -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": c.text("customer_id", required=True),
        "order_id": c.text("order_id"),
        "type": c.text("type", required=True),
        "ts": c.timestamp("ts"),
    }).astype(INCIDENT_DTYPES)


_PARSERS = {"orders": _parse_orders, "nps": _parse_nps, "exposures": _parse_exposures,
            "incidents": _parse_incidents}


def _check_exposure_actions(c: _Checker, catalog: Catalog | None) -> None:
    """Slots must be the catalog's (or the standard three without one); actions the slot's own."""
    slot, action = c.col("slot"), c.col("action_id")
    names = list(catalog.slots) if catalog is not None else list(SLOTS)
    known_slot = slot.isin(names).to_numpy()
    c.flag((slot != "").to_numpy() & ~known_slot, "slot", "unknown slot; expected one of "
           + ", ".join(names) + (" (from catalog.yaml)" if catalog is not None else ""))
    if catalog is None:
        return
    pairs = [(s, a) for s, spec in catalog.slots.items() for a in spec.action_ids]
    known_action = pd.MultiIndex.from_arrays([slot, action]).isin(pairs)
    c.flag(known_slot & (action != "").to_numpy() & ~known_action, "action_id",
           "not an action of this slot in catalog.yaml (slot " + slot + ")")


def _order_index(orders: _Checker) -> pd.DataFrame:
    """Per order_id: the line of its first row and whether any of its rows is kept."""
    ids = orders.col("order_id")
    rows = pd.DataFrame({"order_id": ids, "line": orders.table.lines, "kept": ~orders.bad})[ids != ""]
    return rows.groupby("order_id", sort=False).agg(line=("line", "first"), kept=("kept", "any"))


def _check_order_refs(c: _Checker, known: pd.DataFrame) -> None:
    order_id = c.col("order_id")
    # Index.get_indexer rather than Series.isin: pandas 3.1's isin on str
    # columns walks the value set in Python, which takes seconds at 1M orders.
    found = known.index.get_indexer(pd.Index(order_id)) >= 0   # what get_indexer does to a Series itself
    c.flag((order_id != "").to_numpy() & ~found, "order_id", "order_id not found in orders")


def _cascade(c: _Checker, gone: pd.Series, orders_file: str) -> None:
    """Rows about a rejected order go with it, so no exposure or incident points at nothing."""
    line = c.col("order_id").map(gone)
    hit = line.notna().to_numpy() & ~c.bad
    c.flag(hit, "order_id", "its order was rejected (line " + line.fillna(0).astype("int64").astype("str")
           + f" of {orders_file})")


__all__ = [
    "EXPOSURE_DTYPES",
    "INCIDENT_DTYPES",
    "NPS_DTYPES",
    "ORDER_DTYPES",
    "REJECTED_DTYPES",
    "Dataset",
    "find_tables",
    "header_problems",
    "load_data",
    "load_orders_file",
    "parse_cells",
    "write_rejected",
]
