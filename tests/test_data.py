"""Loading a data directory: what is accepted, how it is normalised, and how refusals read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from insertrec.data import load_data, load_orders_file, write_rejected
from insertrec.errors import CatalogError, DataError, Problem

CATALOG = Path(__file__).parent / "data" / "catalog_example.yaml"

ORDERS = """order_id,customer_id,order_ts,order_value,n_items,channel,categories,is_gift,returned_value,region
o1,c1,2024-01-02T10:00:00Z,40.5,2,web,apparel | shoes,yes,10,north
o2,c2,2024-01-01,12,1,app,home,false,0,south
o3,c1,2024-01-03 08:30,25,3,web,,0,,north
"""


def write(directory: Path, **tables: str) -> Path:
    directory.mkdir(exist_ok=True)
    for name, text in tables.items():
        (directory / name.replace("_", ".")).write_text(text)
    return directory


def problems(directory: Path, **kwargs) -> list[Problem]:
    with pytest.raises(DataError) as info:
        load_data(directory, **kwargs)
    return info.value.problems


def assert_problem(found: list[Problem], file: str, row: int | None, column: str | None, reason: str) -> None:
    hits = [p for p in found if (p.file, p.row, p.column) == (file, row, column) and reason in p.reason]
    assert hits, f"no {file} line {row} {column!r} '{reason}' in:\n" + "\n".join(map(str, found))


def with_orders_row(tmp_path: Path, row: str) -> Path:
    """The good orders plus one more row, which lands on line 5."""
    return write(tmp_path / "d", orders_csv=f"{ORDERS}{row}\n")


def test_good_directory_is_normalised(tmp_path):
    d = write(tmp_path / "d", orders_csv=ORDERS)
    data = load_data(d)
    o = data.orders
    assert list(o.order_id) == ["o2", "o1", "o3"]  # sorted by order_ts
    assert list(o.index) == [0, 1, 2]
    assert str(o.order_ts.dtype) == "datetime64[ns, UTC]"
    assert o.order_value.tolist() == [12.0, 40.5, 25.0]
    assert o.is_gift.tolist() == [False, True, False]
    assert o.returned_value.tolist() == [0.0, 10.0, 0.0]
    assert o.categories.tolist() == ["home", "apparel|shoes", ""]
    assert data.nps.empty and data.exposures.empty and data.incidents.empty
    assert list(data.exposures.columns) == ["order_id", "slot", "action_id", "propensity", "reward"]
    assert data.rejected.empty and data.catalog is None


def test_absent_optional_columns_get_defaults(tmp_path):
    d = write(tmp_path / "d", orders_csv="order_id,customer_id,order_ts,order_value\no1,c1,2024-01-01,5\n")
    o = load_data(d).orders
    assert o.loc[0, "n_items"] == 1.0 and o.loc[0, "channel"] == "unknown" and o.loc[0, "region"] == "unknown"
    assert o.loc[0, "categories"] == "" and not o.loc[0, "is_gift"] and o.loc[0, "returned_value"] == 0.0


def test_parquet_with_typed_columns_loads_like_csv(tmp_path):
    csv = load_data(write(tmp_path / "csv", orders_csv=ORDERS))
    typed = pd.DataFrame({
        "order_id": ["o1", "o2", "o3"], "customer_id": ["c1", "c2", "c1"],
        "order_ts": pd.to_datetime(["2024-01-02 10:00", "2024-01-01", "2024-01-03 08:30"], format="ISO8601", utc=True),
        "order_value": [40.5, 12.0, 25.0], "n_items": [2, 1, 3], "channel": ["web", "app", "web"],
        "categories": ["apparel | shoes", "home", None], "is_gift": [True, False, False],
        "returned_value": [10.0, 0.0, np.nan], "region": ["north", "south", "north"]})
    (tmp_path / "pq").mkdir()
    typed.to_parquet(tmp_path / "pq" / "orders.parquet")
    pd.testing.assert_frame_equal(load_data(tmp_path / "pq").orders, csv.orders)


def test_parquet_problems_name_the_1_based_row(tmp_path):
    (tmp_path / "pq").mkdir()
    pd.DataFrame({"order_id": ["o1", "o2"], "customer_id": ["c1", "c2"], "order_ts": ["2024-01-01", "2024-01-02"],
                  "order_value": [1.0, -3.0]}).to_parquet(tmp_path / "pq" / "orders.parquet")
    assert_problem(problems(tmp_path / "pq"), "orders.parquet", 2, "order_value", "negative")


def test_timestamps_are_normalised_to_utc(tmp_path):
    header = "order_id,customer_id,order_ts,order_value"
    rows = ["a,c,2024-03-01,1", "b,c,2024-03-01T12:00:00+02:00,1", "c,c,2024-03-01 11:00,1", "d,c,2024-03-01T09:30Z,1"]
    o = load_data(write(tmp_path / "d", orders_csv="\n".join([header, *rows]) + "\n")).orders.set_index("order_id")
    utc = pd.Timestamp
    assert o.loc["a", "order_ts"] == utc("2024-03-01 00:00", tz="UTC")  # date alone = midnight UTC
    assert o.loc["b", "order_ts"] == utc("2024-03-01 10:00", tz="UTC")  # offset converted
    assert o.loc["c", "order_ts"] == utc("2024-03-01 11:00", tz="UTC")  # naive = UTC
    assert o.loc["d", "order_ts"] == utc("2024-03-01 09:30", tz="UTC")


def test_ctx_columns_kept_and_typed_other_extras_dropped(tmp_path):
    header = "order_id,customer_id,order_ts,order_value,ctx_age,ctx_device,ctx_mixed,notes"
    rows = ["o1,c1,2024-01-01,1,34,ios,3,hello", "o2,c2,2024-01-02,1,,android,n/a,x"]
    o = load_data(write(tmp_path / "d", orders_csv="\n".join([header, *rows]) + "\n")).orders
    assert o.ctx_age.dtype == np.float64 and o.ctx_age.iloc[0] == 34.0 and np.isnan(o.ctx_age.iloc[1])
    assert o.ctx_device.tolist() == ["ios", "android"]
    assert o.ctx_mixed.tolist() == ["3", "n/a"]  # one non-number makes the column text
    assert "notes" not in o.columns


def test_ctx_values_repeated_across_orders_are_each_typed_in_place(tmp_path):
    header = "order_id,customer_id,order_ts,order_value,ctx_score,ctx_band"
    scores, bands = ["2.5", "", "7", "2.5", "7", "-1e3"], ["18-24", "25-34", "", "18-24", "25-34", "18-24"]
    rows = [f"o{i},c{i},2024-01-0{i + 1},1,{s},{b}" for i, (s, b) in enumerate(zip(scores, bands))]
    o = load_data(write(tmp_path / "d", orders_csv="\n".join([header, *rows]) + "\n")).orders
    assert o.ctx_score.dtype == np.float64
    np.testing.assert_array_equal(o.ctx_score.to_numpy(), [2.5, np.nan, 7.0, 2.5, 7.0, -1000.0])
    assert o.ctx_band.tolist() == bands   # text: a label is no number


@pytest.mark.parametrize("column,value,reason", [
    ("order_id", "", "is empty"),
    ("customer_id", "", "is empty"),
    ("order_ts", "31/12/2024", "ISO 8601"),
    ("order_ts", "", "is empty"),
    ("order_ts", "9999-01-01", "ISO 8601"),  # beyond what datetime64[ns] holds
    ("order_value", "abc", "not a finite number"),
    ("order_value", "nan", "not a finite number"),
    ("order_value", "inf", "not a finite number"),
    ("order_value", "-1", "negative"),
    ("returned_value", "x", "not a finite number"),
    ("returned_value", "-2", "negative"),
    ("returned_value", "100", "greater than order_value"),
    ("n_items", "0", "must be positive"),
    ("n_items", "two", "not a finite number"),
    ("is_gift", "maybe", "not a boolean"),
])
def test_bad_order_cell_is_reported_with_line_and_column(tmp_path, column, value, reason):
    good = {"order_id": "o9", "customer_id": "c9", "order_ts": "2024-02-01", "order_value": "50", "n_items": "1",
            "channel": "web", "categories": "", "is_gift": "no", "returned_value": "0", "region": "north"}
    good[column] = value
    d = with_orders_row(tmp_path, ",".join(good.values()))
    found = problems(d)
    assert_problem(found, "orders.csv", 5, column, reason)
    assert len(found) == 1


def test_error_message_names_file_line_column_and_value(tmp_path):
    d = with_orders_row(tmp_path, "o9,c9,2024-02-01,-5,1,web,,no,0,north")
    with pytest.raises(DataError) as info:
        load_data(d)
    assert str(info.value) == "invalid data: orders.csv line 5 column 'order_value': negative (got '-5')"


def test_duplicate_order_ids_point_at_the_first(tmp_path):
    d = write(tmp_path / "d", orders_csv=ORDERS + "o1,c1,2024-02-01,1,1,web,,no,0,north\n"
                                                  "o1,c1,2024-02-02,1,1,web,,no,0,north\n")
    found = problems(d)
    assert_problem(found, "orders.csv", 5, "order_id", "duplicate order_id; first on line 2")
    assert_problem(found, "orders.csv", 6, "order_id", "duplicate order_id; first on line 2")
    assert len(found) == 2


@pytest.mark.parametrize("score", ["11", "-1", "7.5", "x", ""])
def test_nps_score_must_be_an_integer_0_to_10(tmp_path, score):
    nps = f"customer_id,response_ts,score\nc1,2024-01-01,10\nc1,2024-01-05,{score}\n"
    found = problems(write(tmp_path / "d", orders_csv=ORDERS, nps_csv=nps))
    assert [(p.file, p.row, p.column) for p in found] == [("nps.csv", 3, "score")]


def test_nps_loads_with_int_scores(tmp_path):
    nps = "customer_id,response_ts,score\nc1,2024-01-01,10\nc2,2024-01-05,7.0\n"
    out = load_data(write(tmp_path / "d", orders_csv=ORDERS, nps_csv=nps)).nps
    assert out.score.dtype == np.int64 and out.score.tolist() == [10, 7]


EXPOSURES_HEADER = "order_id,slot,action_id,propensity,reward\n"


@pytest.mark.parametrize("row,column,reason", [
    ("o9,packaging,standard_box,0.5,", "order_id", "order_id not found in orders"),
    (",packaging,standard_box,0.5,", "order_id", "is empty"),
    ("o2,packaging,standard_box,0,", "propensity", "probability in (0, 1]"),
    ("o2,packaging,standard_box,1.5,", "propensity", "probability in (0, 1]"),
    ("o2,packaging,standard_box,high,", "propensity", "not a finite number"),
    ("o2,packaging,standard_box,0.5,lots", "reward", "not a finite number"),
    ("o1,packaging,branded_box,0.5,", "order_id", "duplicate (order_id, slot); first on line 2"),
    ("o2,wrapping,standard_box,0.5,", "slot", "unknown slot"),
])
def test_bad_exposure_is_reported(tmp_path, row, column, reason):
    exposures = EXPOSURES_HEADER + "o1,packaging,standard_box,0.5,\n" + row + "\n"
    found = problems(write(tmp_path / "d", orders_csv=ORDERS, exposures_csv=exposures))
    assert_problem(found, "exposures.csv", 3, column, reason)
    assert len(found) == 1


def test_exposure_actions_are_checked_against_the_catalog(tmp_path):
    d = write(tmp_path / "d", orders_csv=ORDERS, exposures_csv=EXPOSURES_HEADER
              + "o1,packaging,gift_wrap,0.5,\n"     # fine
              + "o1,coupon,sample,0.5,\n"           # an insert, not a coupon
              + "o2,goodies,sample,0.5,\n")         # not a slot of this catalog
    shutil.copy(CATALOG, d / "catalog.yaml")
    found = problems(d)
    assert_problem(found, "exposures.csv", 3, "action_id", "not an action of this slot")
    assert_problem(found, "exposures.csv", 4, "slot", "unknown slot")
    assert len(found) == 2


def test_exposures_load_with_missing_propensity_as_nan(tmp_path):
    d = write(tmp_path / "d", orders_csv=ORDERS, exposures_csv="order_id,slot,action_id\no1,insert,none\n")
    shutil.copy(CATALOG, d / "catalog.yaml")
    data = load_data(d)
    assert data.catalog is not None
    assert np.isnan(data.exposures.propensity.iloc[0]) and np.isnan(data.exposures.reward.iloc[0])


@pytest.mark.parametrize("row,column,reason", [
    ("c1,o9,late,2024-01-05", "order_id", "order_id not found in orders"),
    ("c1,o1,,2024-01-05", "type", "is empty"),
    (",o1,late,2024-01-05", "customer_id", "is empty"),
    ("c1,o1,late,yesterday", "ts", "ISO 8601"),
])
def test_bad_incident_is_reported(tmp_path, row, column, reason):
    incidents = "customer_id,order_id,type,ts\nc1,,complaint,2024-01-04\n" + row + "\n"
    found = problems(write(tmp_path / "d", orders_csv=ORDERS, incidents_csv=incidents))
    assert_problem(found, "incidents.csv", 3, column, reason)
    assert len(found) == 1


def test_every_problem_of_every_file_comes_at_once(tmp_path):
    d = write(tmp_path / "d", orders_csv=ORDERS + "o4,c1,2024-02-01,-1,1,web,,no,0,north\n",
              nps_csv="customer_id,response_ts,score\nc1,2024-01-01,12\n",
              exposures_csv=EXPOSURES_HEADER + "o1,packaging,standard_box,2,\n",
              incidents_csv="customer_id,order_id,type,ts\nc1,o1,,2024-01-01\n")
    found = problems(d)
    assert [(p.file, p.row, p.column) for p in found] == [
        ("orders.csv", 5, "order_value"), ("nps.csv", 2, "score"),
        ("exposures.csv", 2, "propensity"), ("incidents.csv", 2, "type")]


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_file_with_another_separator_says_so(tmp_path, separator):
    header = separator.join(["order_id", "customer_id", "order_ts", "order_value"])
    d = write(tmp_path / "d", orders_csv=f"{header}\no1{separator}c1{separator}2024-01-01{separator}12.5\n")
    word = {";": "semicolon", "\t": "tab"}[separator]
    [problem] = problems(d)
    assert problem.column is None and f"the file looks {word}-separated" in problem.reason
    assert "save it comma-separated" in problem.reason


def test_a_near_miss_column_name_gets_a_hint(tmp_path):
    d = write(tmp_path / "d", orders_csv="orderid,customer,Order_TS,order_value,channel\no1,c1,2024-01-01,12.5,web\n")
    found = problems(d)
    assert_problem(found, "orders.csv", None, "order_id", "the file has 'orderid': did you mean order_id?")
    assert_problem(found, "orders.csv", None, "customer_id", "the file has 'customer': did you mean customer_id?")
    assert_problem(found, "orders.csv", None, "order_ts", "the file has 'Order_TS': did you mean order_ts?")
    assert len(found) == 3
    orders_file = tmp_path / "new.csv"
    orders_file.write_text("Order_ID,customer_id,order_ts,order_value\no1,c1,2024-01-01,12.5\n")
    with pytest.raises(DataError, match="did you mean order_id"):
        load_orders_file(orders_file)


def test_missing_required_column_is_reported_and_never_skipped(tmp_path):
    d = write(tmp_path / "d", orders_csv="order_id,customer_id,order_ts\no1,c1,2024-01-01\n",
              nps_csv="customer_id,score\nc1,5\n")
    found = problems(d, skip_bad_rows=True)
    assert_problem(found, "orders.csv", None, "order_value", "required column missing")
    assert_problem(found, "nps.csv", None, "response_ts", "required column missing")


def test_missing_orders_names_directory_and_expected_files(tmp_path):
    d = write(tmp_path / "d", nps_csv="customer_id,response_ts,score\n")
    with pytest.raises(DataError) as info:
        load_data(d, skip_bad_rows=True)
    assert str(d) in str(info.value) and "orders.csv" in str(info.value) and "orders.parquet" in str(info.value)


def test_csv_and_parquet_of_one_table_is_refused(tmp_path):
    d = write(tmp_path / "d", orders_csv=ORDERS)
    pd.read_csv(d / "orders.csv").to_parquet(d / "orders.parquet")
    with pytest.raises(DataError, match=r"both orders\.csv and orders\.parquet"):
        load_data(d)


def test_unreadable_csv_is_a_data_error(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "orders.csv").write_bytes(b"order_id,customer_id,order_ts,order_value\no1,c\xff,2024-01-01,1\n")
    with pytest.raises(DataError, match="orders.csv: not UTF-8"):
        load_data(d)


def test_bad_catalog_propagates_catalog_error(tmp_path):
    d = write(tmp_path / "d", orders_csv=ORDERS, catalog_yaml="slots: [\n")
    with pytest.raises(CatalogError):
        load_data(d)


def test_line_numbers_count_blank_lines_and_multiline_cells(tmp_path):
    text = ('order_id,customer_id,order_ts,order_value,categories\n'
            'o1,c1,2024-01-01,1,"a\nb"\n'
            '\n'
            'o2,c1,2024-01-02,-1,\n')
    found = problems(write(tmp_path / "d", orders_csv=text))
    assert [(p.row, p.column) for p in found] == [(5, "order_value")]


def test_skip_bad_rows_rejects_with_reasons_and_cascades(tmp_path):
    d = write(tmp_path / "d",
              orders_csv=(ORDERS + "o4,c3,2024-02-01,-1,1,web,,no,0,north\n"  # line 5: rejected
                                 + "o1,c9,2024-02-02,9,1,web,,no,0,north\n"),  # line 6: duplicate
              exposures_csv=(EXPOSURES_HEADER + "o1,packaging,standard_box,0.5,\n"
                             + "o4,packaging,standard_box,0.5,\n"  # its order is rejected
                             + "o4,insert,none,7,\n"),  # bad in itself too
              incidents_csv="customer_id,order_id,type,ts\nc3,o4,late,2024-02-03\nc1,,complaint,2024-02-03\n",
              nps_csv="customer_id,response_ts,score\nc1,2024-01-01,99\nc2,2024-01-01,3\n")
    data = load_data(d, skip_bad_rows=True)
    assert sorted(data.orders.order_id) == ["o1", "o2", "o3"]
    assert data.orders.set_index("order_id").loc["o1", "customer_id"] == "c1"  # the first o1 is kept
    assert data.exposures.order_id.tolist() == ["o1"]
    assert data.incidents.order_id.tolist() == [""]
    assert data.nps.score.tolist() == [3]
    rejected = set(data.rejected[["file", "row", "column", "reason"]].itertuples(index=False, name=None))
    cascade = "its order was rejected (line 5 of orders.csv)"
    assert {("orders.csv", 5, "order_value", "negative"),
            ("orders.csv", 6, "order_id", "duplicate order_id; first on line 2"),
            ("exposures.csv", 3, "order_id", cascade),
            ("exposures.csv", 4, "propensity", "must be a probability in (0, 1]"),
            ("incidents.csv", 2, "order_id", cascade),
            ("nps.csv", 2, "score", "not an integer from 0 to 10")} == rejected
    # nothing is dropped silently: every input row is kept or rejected
    for name in ("orders", "nps", "exposures", "incidents"):
        n_input = len(pd.read_csv(d / f"{name}.csv"))
        n_rejected = data.rejected.loc[data.rejected.file == f"{name}.csv", "row"].nunique()
        assert len(getattr(data, name)) + n_rejected == n_input, name


def test_write_rejected_lists_every_problem_and_counts_rows(tmp_path):
    d = with_orders_row(tmp_path, "o9,,2024-02-01,-5,1,web,,no,0,north")
    data = load_data(d, skip_bad_rows=True)
    n = write_rejected(data, tmp_path)
    out = pd.read_csv(tmp_path / "rejected.csv", dtype=str, keep_default_na=False)
    assert n == 1  # one row, with two problems
    assert list(out.columns) == ["file", "row", "column", "reason", "value"]
    assert sorted(out[["row", "column", "value"]].values.tolist()) == [["5", "customer_id", ""],
                                                                       ["5", "order_value", "-5"]]


def test_fingerprint_follows_content(tmp_path):
    a = load_data(write(tmp_path / "a", orders_csv=ORDERS))
    b = load_data(write(tmp_path / "b", orders_csv=ORDERS))
    c = load_data(with_orders_row(tmp_path, "o9,c9,2024-02-01,5,1,web,,no,0,north"))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("columns, column, reason", [
    (["ctx_" + "x" * 61], "ctx_" + "x" * 57 + "...", "must be ctx_ followed by 1 to 60 letters"),
    (["ctx_device type"], "ctx_device type", "must be ctx_ followed by 1 to 60"),
    (["ctx_"], "ctx_", "must be ctx_ followed by 1 to 60"),
    ([f"ctx_f{i}" for i in range(33)], "ctx_f32", "too many context fields: at most 32"),
])
def test_ctx_names_are_bounded_and_never_skipped(tmp_path, columns, column, reason):
    header = ",".join(["order_id", "customer_id", "order_ts", "order_value", *columns])
    data = write(tmp_path / "d", orders_csv=f"{header}\no1,c1,2024-01-01,1{',1' * len(columns)}\n")
    for load in (lambda: load_data(data, skip_bad_rows=True), lambda: load_orders_file(data / "orders.csv")):
        with pytest.raises(DataError) as err:
            load()
        problem = err.value.problems[0]
        assert (problem.file, problem.column) == ("orders.csv", column) and reason in problem.reason


def test_ctx_names_at_the_limits_load(tmp_path):
    columns = ["ctx_" + "x" * 60] + [f"ctx_f{i}" for i in range(31)]
    header = ",".join(["order_id", "customer_id", "order_ts", "order_value", *columns])
    data = write(tmp_path / "d", orders_csv=f"{header}\no1,c1,2024-01-01,1{',1' * len(columns)}\n")
    assert [c for c in load_data(data).orders.columns if c.startswith("ctx_")] == columns
