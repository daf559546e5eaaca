"""Point-in-time features: nothing an order's features say may come from after the order.

The heart of this file is three properties checked on random histories:
adding later events never changes earlier orders' features; the online
`CustomerState` agrees with the offline frame for every order; the batch path
agrees with the offline frame for new orders. The rest pins the definitions
at their boundaries (the exact instant, the exact window length, ties).
"""

from __future__ import annotations

import copy
import math
import pickle
import textwrap
from types import SimpleNamespace
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insertrec.catalog import Catalog
from insertrec.data import Dataset
from insertrec.errors import DataError, InsertrecError
from insertrec.features import (
    CustomerState,
    FeatureParams,
    Snapshot,
    customer_frame,
    features_for_orders,
    order_features,
    order_rewards,
)
from insertrec.schema import FEATURES

T0 = pd.Timestamp("2024-01-01", tz="UTC")
DAY = pd.Timedelta(days=1)
PARAMS = FeatureParams(categories=("x", "y", "z"), channels=("web", "app"), action_ids=("box", "c10", "card"),
                       cap_windows={"c10": (30, 90), "card": (7,)}, ctx_columns=("ctx_age",))


def at(days: float, seconds: int = 0) -> pd.Timestamp:
    return T0 + days * DAY + pd.Timedelta(seconds=seconds)


def dataset(orders: list[dict], nps: list[tuple] = (), incidents: list[tuple] = (),
            exposures: list[tuple] = ()) -> Dataset:
    """orders: dicts with at least order_id, customer_id, order_ts; nps: (customer, ts, score);
    incidents: (customer, ts, type); exposures: (order_id, slot, action_id[, reward])."""
    rows = [{"order_value": 10.0, "n_items": 1.0, "channel": "web", "categories": "", "is_gift": False,
             "returned_value": 0.0, "region": "eu", "ctx_age": 30.0} | o for o in orders]
    frame = pd.DataFrame(rows, columns=["order_id", "customer_id", "order_ts", "order_value", "n_items", "channel",
                                        "categories", "is_gift", "returned_value", "region", "ctx_age"])
    frame["order_ts"] = pd.to_datetime(frame["order_ts"], utc=True)
    frame = frame.sort_values(["order_ts", "order_id"], kind="stable").reset_index(drop=True)
    return Dataset(
        orders=frame,
        nps=pd.DataFrame({"customer_id": [n[0] for n in nps],
                          "response_ts": pd.to_datetime([n[1] for n in nps], utc=True),
                          "score": np.array([n[2] for n in nps], dtype=np.int64)}),
        incidents=pd.DataFrame({"customer_id": [i[0] for i in incidents], "order_id": [""] * len(incidents),
                                "type": [i[2] for i in incidents],
                                "ts": pd.to_datetime([i[1] for i in incidents], utc=True)}),
        exposures=pd.DataFrame({"order_id": [e[0] for e in exposures], "slot": [e[1] for e in exposures],
                                "action_id": [e[2] for e in exposures],
                                "propensity": np.full(len(exposures), np.nan),
                                "reward": [e[3] if len(e) > 3 else np.nan for e in exposures]}))


def row(frame: pd.DataFrame, order_id: str) -> pd.Series:
    return frame.set_index("order_id").loc[order_id]


def assert_same(a: dict | pd.Series, b: dict | pd.Series, where: str = "") -> None:
    a, b = dict(a), dict(b)
    assert list(a) == list(b), where
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, (float, np.floating)) or isinstance(y, (float, np.floating)):
            if isinstance(x, (bool, np.bool_)) or isinstance(y, (bool, np.bool_)):
                assert bool(x) == bool(y), (where, key, x, y)
            elif math.isnan(x) or math.isnan(y):
                assert math.isnan(x) and math.isnan(y), (where, key, x, y)
            else:
                assert x == pytest.approx(y, rel=1e-9, abs=1e-9), (where, key, x, y)
        else:
            assert x == y, (where, key, x, y)


def _up_to(data: Dataset, order: pd.Series) -> Dataset:
    """The history up to an order's instant: its prior orders (ties by id), and the answers and
    incidents up to and including that instant, which the state must know to leave out."""
    o = data.orders
    prior = (o["order_ts"] < order["order_ts"]) | ((o["order_ts"] == order["order_ts"])
                                                   & (o["order_id"] < order["order_id"]))
    return Dataset(orders=o[prior].reset_index(drop=True),
                   nps=data.nps[data.nps["response_ts"] <= order["order_ts"]],
                   incidents=data.incidents[data.incidents["ts"] <= order["order_ts"]],
                   exposures=data.exposures[data.exposures["order_id"].isin(set(o.loc[prior, "order_id"]))])


def features(data: Dataset, params: FeatureParams = PARAMS) -> pd.DataFrame:
    """The offline frame, after checking that the online state gives every row the same values."""
    offline = order_features(data, params)
    for i, order in data.orders.iterrows():
        online = Snapshot.build(_up_to(data, order), params).state(order["customer_id"]).features(order.to_dict())
        assert_same(online, offline.loc[i], where=order["order_id"])
    return offline


# ---------------------------------------------------------------------------
# Definitions at their boundaries
# ---------------------------------------------------------------------------


def test_columns_follow_the_params_and_the_orders() -> None:
    data = dataset([{"order_id": "o1", "customer_id": "a", "order_ts": at(0)}])
    feats = order_features(data, PARAMS)
    assert list(feats.columns[:3]) == ["order_id", "customer_id", "order_ts"]
    for name in ("nps_tier", "journey_stage", "return_rate", "ctx_age", "cat_share_x", "channel_share_app",
                 "received_box", "days_since_box", "received_c10_30d", "received_c10_90d", "received_card_7d"):
        assert name in feats.columns
    assert "received_box_30d" not in feats.columns
    assert str(feats["order_ts"].dtype) == "datetime64[ns, UTC]"
    bare = FeatureParams()   # no catalog, no vocabularies: the schema's features only
    assert list(order_features(data, bare).columns) == ["order_id", "customer_id", "order_ts", *FEATURES]
    assert len(customer_frame(Snapshot.build(data, bare), at(1))) == 1


def test_index_and_row_order_follow_the_orders_frame() -> None:
    data = dataset([{"order_id": f"o{i}", "customer_id": "a", "order_ts": at(i)} for i in range(4)])
    data.orders = data.orders.iloc[[2, 0, 3, 1]].set_axis([10, 11, 12, 13])
    feats = order_features(data, PARAMS)
    assert list(feats.index) == [10, 11, 12, 13]
    assert list(feats["order_id"]) == ["o2", "o0", "o3", "o1"]
    assert list(feats["prior_orders"]) == [2.0, 0.0, 3.0, 1.0]


@pytest.mark.parametrize(("score", "tier"), [(0, "detractor"), (6, "detractor"), (7, "passive"), (8, "passive"),
                                             (9, "promoter"), (10, "promoter")])
def test_nps_tier_boundaries(score: int, tier: str) -> None:
    data = dataset([{"order_id": "o1", "customer_id": "a", "order_ts": at(10)}], nps=[("a", at(5), score)])
    got = row(features(data), "o1")
    assert got["nps_tier"] == tier and got["nps_score"] == score


def test_nps_answer_at_the_order_instant_or_past_the_ttl_is_not_known() -> None:
    data = dataset([{"order_id": "same", "customer_id": "a", "order_ts": at(400)},
                    {"order_id": "ttl", "customer_id": "b", "order_ts": at(365)},
                    {"order_id": "stale", "customer_id": "c", "order_ts": at(365, seconds=1)}],
                   nps=[("a", at(100), 9), ("a", at(400), 2), ("b", at(0), 3), ("c", at(0), 3)])
    feats = features(data)
    assert row(feats, "same")["nps_score"] == 9          # the answer given at the order instant is not known
    assert row(feats, "ttl")["nps_tier"] == "detractor"  # exactly nps_ttl_days old: still known
    assert row(feats, "stale")["nps_tier"] == "unknown"  # one second older: expired
    assert math.isnan(row(feats, "stale")["nps_score"])


def test_journey_stages_including_lapsed() -> None:
    days = [0, 10, 20, 30, 210, 391]  # gaps: 10, 10, 10, 180 (not lapsed), 181 (lapsed)
    data = dataset([{"order_id": f"o{i}", "customer_id": "a", "order_ts": at(d)} for i, d in enumerate(days)])
    feats = features(data)
    assert list(feats["journey_stage"]) == ["new", "developing", "developing", "loyal", "loyal", "lapsed"]
    assert list(feats["prior_orders"]) == [0, 1, 2, 3, 4, 5]
    assert feats["recency_days"].tolist()[1:] == [10, 10, 10, 180, 181]
    assert math.isnan(feats["recency_days"][0])
    assert feats["tenure_days"].tolist() == [0, 10, 20, 30, 210, 391]


def test_money_shares_and_the_return_window() -> None:
    data = dataset([
        {"order_id": "o1", "customer_id": "a", "order_ts": at(0), "order_value": 100.0, "returned_value": 40.0,
         "categories": "x|y", "channel": "app", "is_gift": True},
        {"order_id": "o2", "customer_id": "a", "order_ts": at(20), "order_value": 50.0, "returned_value": 50.0,
         "categories": "y"},
        {"order_id": "o3", "customer_id": "a", "order_ts": at(29, seconds=86399), "order_value": 1.0},
        {"order_id": "o4", "customer_id": "a", "order_ts": at(30), "order_value": 1.0},
        {"order_id": "o5", "customer_id": "a", "order_ts": at(50), "order_value": 1.0},
    ])
    feats = features(data).set_index("order_id")
    assert math.isnan(feats.loc["o2", "return_rate"])          # o1 is 20 days old: its return is not known yet
    assert math.isnan(feats.loc["o3", "return_rate"])          # one second short of the window
    assert feats.loc["o4", "return_rate"] == pytest.approx(0.4)  # exactly 30 days: known
    online = Snapshot.build(Dataset(orders=data.orders.iloc[:3]), PARAMS).state("a")
    assert online.features(data.orders.iloc[3].to_dict())["return_rate"] == pytest.approx(0.4)
    assert feats.loc["o5", "return_rate"] == pytest.approx(90 / 150)
    assert feats.loc["o4", "monetary"] == pytest.approx(151 / 3) and feats.loc["o4", "total_spend"] == 151
    assert feats.loc["o3", "cat_share_y"] == 1.0 and feats.loc["o3", "cat_share_x"] == 0.5
    assert feats.loc["o3", "channel_share_app"] == 0.5 and feats.loc["o3", "gift_share"] == 0.5
    assert math.isnan(feats.loc["o1", "cat_share_x"]) and feats.loc["o1", "total_spend"] == 0
    assert feats.loc["o1", "main_category"] == "x" and feats.loc["o3", "main_category"] == "none"


def test_incident_window_and_strictness() -> None:
    data = dataset([{"order_id": "o1", "customer_id": "a", "order_ts": at(100)},
                    {"order_id": "o2", "customer_id": "a", "order_ts": at(190)},
                    {"order_id": "o3", "customer_id": "a", "order_ts": at(190, seconds=1)}],
                   incidents=[("a", at(100), "late"), ("a", at(50), "damaged")])
    feats = features(data).set_index("order_id")
    assert feats.loc["o1", "incidents_90d"] == 1 and feats.loc["o1", "last_incident_type"] == "damaged"
    assert feats.loc["o1", "days_since_incident"] == 50       # the one at the order instant is not known
    assert feats.loc["o2", "incidents_90d"] == 1 and feats.loc["o2", "last_incident_type"] == "late"
    assert feats.loc["o3", "incidents_90d"] == 0              # 90 days and a second: out of the window
    assert feats.loc["o3", "days_since_incident"] == pytest.approx(90 + 1 / 86400)


def test_ties_at_one_instant_are_ordered_by_order_id() -> None:
    data = dataset([{"order_id": "b-2", "customer_id": "a", "order_ts": at(5), "order_value": 7.0},
                    {"order_id": "a-1", "customer_id": "a", "order_ts": at(5), "order_value": 3.0}],
                   exposures=[("a-1", "coupon", "c10")])
    data.orders = data.orders.iloc[::-1]   # the id decides, not the row order
    feats = features(data).set_index("order_id")
    assert feats.loc["a-1", "prior_orders"] == 0
    assert feats.loc["b-2", "prior_orders"] == 1 and feats.loc["b-2", "total_spend"] == 3.0
    assert feats.loc["b-2", "recency_days"] == 0 and feats.loc["b-2", "received_c10_30d"] == 1


def test_what_the_customer_received_and_when() -> None:
    orders = [{"order_id": f"o{i}", "customer_id": "a", "order_ts": at(d)} for i, d in enumerate([0, 60, 90, 97])]
    data = dataset(orders, exposures=[("o0", "coupon", "c10"), ("o0", "insert", "card"), ("o1", "coupon", "c10"),
                                      ("o2", "insert", "card"), ("o9", "coupon", "c10"), ("o1", "coupon", "retired")])
    feats = features(data).set_index("order_id")
    assert feats["received_c10"].tolist() == [0, 1, 2, 2]
    assert feats.loc["o2", "received_c10_30d"] == 1 and feats.loc["o2", "received_c10_90d"] == 2  # 90 days: in
    assert feats.loc["o3", "received_c10_90d"] == 1
    assert feats.loc["o3", "received_card_7d"] == 1 and feats.loc["o3", "days_since_card"] == 7
    assert feats.loc["o2", "received_card_7d"] == 0 and feats.loc["o2", "days_since_card"] == 90
    assert feats["received_box"].sum() == 0 and feats["days_since_box"].isna().all()


def test_bad_input_is_refused_with_a_reason() -> None:
    data = dataset([{"order_id": "o1", "customer_id": "a", "order_ts": at(0)}])
    with pytest.raises(DataError, match="order_value"):
        order_features(Dataset(orders=data.orders.drop(columns="order_value")), PARAMS)
    twice = dataset([{"order_id": "o1", "customer_id": "a", "order_ts": at(0)},
                     {"order_id": "o1", "customer_id": "b", "order_ts": at(1)}])
    with pytest.raises(DataError, match="line 3 column 'order_id': duplicate"):
        order_features(twice, PARAMS)
    with pytest.raises(InsertrecError, match="lapse_days"):
        FeatureParams(lapse_days=0)
    with pytest.raises(InsertrecError, match="cap_windows"):
        FeatureParams(cap_windows={"c10": (30, -1)})
    with pytest.raises(InsertrecError, match="order_ts"):
        CustomerState.empty(PARAMS).features({"order_id": "n", "customer_id": "a", "order_ts": "yesterday",
                                              "order_value": 1})
    with pytest.raises(InsertrecError, match="order_value"):
        CustomerState.empty(PARAMS).features({"order_id": "n", "customer_id": "a", "order_ts": "2024-01-01"})


def test_fit_learns_vocabularies_and_takes_actions_from_the_catalog() -> None:
    catalog = Catalog.from_yaml(textwrap.dedent("""\
        slots:
          packaging:
            actions:
              - {id: plain, name: Plain, cost: 0.1, default: true}
              - {id: gift_box, name: Gift box, cost: 1.0, max_per_customer: {count: 1, days: 60}}
          coupon:
            actions:
              - {id: none, name: No coupon, cost: 0, default: true}
              - {id: c10, name: Ten off, cost: 2, when: {received_c10_30d: {max: 0}}}
        """))
    data = dataset([{"order_id": f"o{i}", "customer_id": "a", "order_ts": at(i), "channel": ch, "categories": cats}
                    for i, (ch, cats) in enumerate([("web", "y|x"), ("app", "y"), ("app", "z|y"), ("web", "y|y")])])
    params = FeatureParams.fit(data, catalog, top_categories=2, lapse_days=90)
    assert params.categories == ("y", "x")          # an order counts once per category; ties by name
    assert params.channels == ("app", "web") and params.ctx_columns == ("ctx_age",)
    assert params.action_ids == ("plain", "gift_box", "none", "c10") and params.lapse_days == 90
    assert params.cap_windows == {"gift_box": (60,), "c10": (30,)}
    assert {"received_gift_box_60d", "received_c10_30d"} <= set(order_features(data, params).columns)


# ---------------------------------------------------------------------------
# Random histories
# ---------------------------------------------------------------------------

CUSTOMERS = ("a", "b", "c")
ACTIONS = {"packaging": ("box", "bag"), "insert": ("card", "none"), "coupon": ("c10", "c5")}


@st.composite
def histories(draw: st.DrawFn, max_orders: int = 10) -> dict:
    """Small histories on a coarse clock (whole days, sometimes +1 s) so that ties and exact
    window lengths (7, 30, 90, 180, 365 days) happen often."""
    n = draw(st.integers(1, max_orders))
    clock = st.tuples(st.integers(0, 420), st.sampled_from([0, 0, 0, 1]))
    ids = draw(st.permutations([f"o{i:02d}" for i in range(n)]))
    orders = []
    for oid in ids:
        day, sec = draw(clock)
        value = draw(st.integers(1, 100))
        orders.append({"order_id": oid, "customer_id": draw(st.sampled_from(CUSTOMERS)), "order_ts": at(day, sec),
                       "order_value": float(value), "returned_value": float(draw(st.integers(0, value))),
                       "categories": "|".join(draw(st.lists(st.sampled_from("xyzw"), max_size=3))),
                       "channel": draw(st.sampled_from(["web", "app", "store"])), "is_gift": draw(st.booleans()),
                       "ctx_age": float(draw(st.integers(18, 80)))})
    nps = [(draw(st.sampled_from(CUSTOMERS)), at(*draw(clock)), draw(st.integers(0, 10)))
           for _ in range(draw(st.integers(0, 4)))]
    incidents = [(draw(st.sampled_from(CUSTOMERS)), at(*draw(clock)), draw(st.sampled_from(["late", "damaged"])))
                 for _ in range(draw(st.integers(0, 4)))]
    exposures = [(o["order_id"], slot, draw(st.sampled_from(choices)))
                 for o in orders for slot, choices in ACTIONS.items() if draw(st.booleans())]
    return {"orders": orders, "nps": nps, "incidents": incidents, "exposures": exposures}


RANDOM_PARAMS = FeatureParams(categories=("x", "y", "z"), channels=("web", "app"),
                              action_ids=("box", "bag", "card", "none", "c10", "c5"),
                              cap_windows={"c10": (7, 30), "card": (90,)}, ctx_columns=("ctx_age",))
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(histories(), histories(max_orders=4), st.integers(0, 420))
def test_later_events_never_change_earlier_features(history: dict, later: dict, cut_day: int) -> None:
    cut = at(cut_day)
    before = dataset(**history)
    # the later history: events at or after the cut, and orders whose ids sort after every earlier one
    # so that even an order at exactly the cut instant comes after the earlier orders at that instant
    late_orders = [o | {"order_id": f"z{o['order_id']}", "order_ts": max(o["order_ts"], cut)}
                   for o in later["orders"]]
    after = dataset(
        orders=history["orders"] + late_orders,
        nps=history["nps"] + [(c, max(ts, cut), s) for c, ts, s in later["nps"]],
        incidents=history["incidents"] + [(c, max(ts, cut), k) for c, ts, k in later["incidents"]],
        exposures=history["exposures"] + [(f"z{o}", s, a) for o, s, a in later["exposures"]])
    old = order_features(before, RANDOM_PARAMS).set_index("order_id")
    new = order_features(after, RANDOM_PARAMS).set_index("order_id")
    earlier = old.index[old["order_ts"] <= cut]
    pd.testing.assert_frame_equal(new.loc[earlier], old.loc[earlier])


@SETTINGS
@given(histories(max_orders=8))
def test_online_state_equals_offline_row_for_every_order(history: dict) -> None:
    features(dataset(**history), RANDOM_PARAMS)


@SETTINGS
@given(histories(max_orders=8))
def test_folding_events_into_a_state_equals_the_offline_rows(history: dict) -> None:
    """What the service does between snapshots: add_order / add_nps / add_incident / add_return."""
    data = dataset(**{**history, "orders": [o | {"customer_id": "a"} for o in history["orders"]],
                      "nps": [("a", ts, s) for _, ts, s in history["nps"]],
                      "incidents": [("a", ts, k) for _, ts, k in history["incidents"]]})
    offline = order_features(data, RANDOM_PARAMS)
    state = CustomerState.empty(RANDOM_PARAMS)
    nps = sorted(zip(data.nps["response_ts"], data.nps["score"]), key=lambda x: x[0])
    incidents = list(zip(data.incidents["ts"], data.incidents["type"]))
    exposures = data.exposures.groupby("order_id")
    for i, order in data.orders.iterrows():
        t = order["order_ts"]
        for ts, score in [x for x in nps if x[0] <= t]:   # told at the order instant: must be left out
            state.add_nps(int(score), ts)
        nps = [x for x in nps if x[0] > t]
        for ts, kind in [x for x in incidents if x[0] <= t]:
            state.add_incident(kind, ts.isoformat())
        incidents = [x for x in incidents if x[0] > t]
        assert_same(state.features(order.to_dict()), offline.loc[i], where=order["order_id"])
        received = (exposures.get_group(order["order_id"]) if order["order_id"] in exposures.groups
                    else data.exposures.iloc[:0])
        state.add_order(order.to_dict() | {"returned_value": 0.0}, dict(zip(received["slot"], received["action_id"])))
        state.add_return(order["order_id"], order["returned_value"])


@SETTINGS
@given(histories(max_orders=8), st.randoms(use_true_random=False), st.integers(0, 200))
def test_orders_folded_in_any_order_give_the_offline_row(history: dict, rng: Any, gap: int) -> None:
    """The service folds orders as their commits arrive, not by order_ts (another worker's, a
    late import): the state kept as they fold in (sorted receipt instants for the contact-cap
    windows) must give a later order the offline row whatever the folding order."""
    orders = [o | {"customer_id": "a"} for o in history["orders"]]
    data = dataset(orders, exposures=history["exposures"])
    probe = {"order_id": "zz", "customer_id": "a", "order_ts": data.orders["order_ts"].max() + gap * DAY}
    offline = order_features(dataset([*orders, probe], exposures=history["exposures"]), RANDOM_PARAMS)
    state = CustomerState.empty(RANDOM_PARAMS)
    exposures = data.exposures.groupby("order_id")
    shuffled = list(data.orders.to_dict("records"))
    rng.shuffle(shuffled)
    for order in shuffled:
        received = exposures.get_group(order["order_id"]) if order["order_id"] in exposures.groups \
            else data.exposures.iloc[:0]
        state.add_order(order, dict(zip(received["slot"], received["action_id"])))
    assert_same(state.features(dataset([probe]).orders.iloc[0].to_dict()), offline.iloc[-1], where="zz")


@SETTINGS
@given(histories(), histories(max_orders=5), st.integers(0, 30))
def test_batch_features_equal_offline_for_new_orders(history: dict, batch: dict, gap: int) -> None:
    data = dataset(**history)
    last = max([data.orders["order_ts"].max(), *data.nps["response_ts"], *data.incidents["ts"]])
    new = dataset([o | {"order_id": f"z{o['order_id']}", "order_ts": last + (o["order_ts"] - T0) + gap * DAY,
                        "customer_id": o["customer_id"] if o["order_value"] > 30 else "new-" + o["customer_id"]}
                   for o in batch["orders"]]).orders
    together = Dataset(orders=pd.concat([data.orders, new], ignore_index=True), nps=data.nps,
                       incidents=data.incidents, exposures=data.exposures)
    offline = order_features(together, RANDOM_PARAMS).iloc[len(data.orders):].set_axis(new.index)
    batch_frame = features_for_orders(Snapshot.build(data, RANDOM_PARAMS), new)
    pd.testing.assert_frame_equal(batch_frame, offline, check_exact=False, rtol=1e-9)


@SETTINGS
@given(histories(), st.integers(0, 500))
def test_customer_frame_is_what_an_order_at_as_of_would_see(history: dict, days_after: int) -> None:
    data = dataset(**history)
    as_of = data.orders["order_ts"].max() + days_after * DAY
    snapshot = Snapshot.build(data, RANDOM_PARAMS, as_of=as_of)
    frame = customer_frame(snapshot, as_of).set_index("customer_id")
    customers = sorted(data.orders.loc[data.orders["order_ts"] < as_of, "customer_id"].unique())
    assert list(frame.index) == customers
    probes = dataset([{"order_id": f"~{c}", "customer_id": c, "order_ts": as_of} for c in customers]).orders
    seen = features_for_orders(snapshot, probes).set_index("customer_id")
    for c in customers:
        for column in frame.columns.drop(["first_order_ts", "last_order_ts", "ctx_age"]):
            assert_same({column: frame.loc[c, column]}, {column: seen.loc[c, column]}, where=c)
        mine = data.orders[(data.orders["customer_id"] == c) & (data.orders["order_ts"] < as_of)]
        assert frame.loc[c, "first_order_ts"] == mine["order_ts"].iloc[0]
        assert frame.loc[c, "last_order_ts"] == mine["order_ts"].iloc[-1]
        assert frame.loc[c, "ctx_age"] == mine["ctx_age"].iloc[-1]


@SETTINGS
@given(histories(), st.lists(st.integers(-200, 60), min_size=1, max_size=3))
def test_one_builder_gives_at_every_instant_the_snapshot_build_gives(history: dict, days: list[int]) -> None:
    """`Snapshot.builder` (training reads the orders once for its three snapshots): at any
    instants, in any order, the customer frame and the features of new orders of `Snapshot.build`."""
    data = dataset(**history)
    at = Snapshot.builder(data, RANDOM_PARAMS)
    for d in days:
        as_of = data.orders["order_ts"].max() + d * DAY
        mine, built = at(as_of), Snapshot.build(data, RANDOM_PARAMS, as_of=as_of)
        assert mine.as_of == built.as_of and list(mine.customer_ids) == list(built.customer_ids)
        pd.testing.assert_frame_equal(customer_frame(mine, as_of), customer_frame(built, as_of))
        probes = dataset([{"order_id": f"~{c}", "customer_id": c, "order_ts": as_of}
                          for c in [*built.customer_ids, "new"]]).orders
        pd.testing.assert_frame_equal(features_for_orders(mine, probes), features_for_orders(built, probes))


@SETTINGS
@given(histories(), histories(max_orders=5), st.integers(0, 60), st.integers(1, 3))
def test_snapshots_of_customer_groups_concatenated_equal_the_whole(history: dict, batch: dict, days_after: int,
                                                                   groups: int) -> None:
    """What Spark does per bucket of whole customers: the joined snapshot scores new orders, gives
    the customer frame and every customer's online state as the snapshot of the whole history."""
    data = dataset(**history)
    last = max([data.orders["order_ts"].max(), *data.nps["response_ts"], *data.incidents["ts"]])
    as_of = last + days_after * DAY
    whole = Snapshot.build(data, RANDOM_PARAMS, as_of=as_of)

    def group(ids: pd.Series) -> np.ndarray:   # customers spread over the groups, not in id order
        return np.array([sum(map(ord, c)) * 7 % groups for c in ids.astype(str)], dtype=int)

    parts = []
    for k in range(groups):
        mine = data.orders[group(data.orders["customer_id"]) == k]
        parts.append(Snapshot.build(Dataset(
            orders=mine.reset_index(drop=True), nps=data.nps[group(data.nps["customer_id"]) == k],
            incidents=data.incidents[group(data.incidents["customer_id"]) == k],
            exposures=data.exposures[data.exposures["order_id"].isin(set(mine["order_id"]))]),
            RANDOM_PARAMS, as_of=as_of))
    joined = Snapshot.concat(parts)
    assert list(joined.customer_ids) == list(whole.customer_ids)
    pd.testing.assert_frame_equal(customer_frame(joined, as_of), customer_frame(whole, as_of))
    new = dataset([o | {"order_id": f"z{o['order_id']}", "order_ts": as_of + (o["order_ts"] - T0),
                        "customer_id": o["customer_id"] if o["order_value"] > 30 else "new-" + o["customer_id"]}
                   for o in batch["orders"]]).orders
    pd.testing.assert_frame_equal(features_for_orders(joined, new), features_for_orders(whole, new))
    for order in new.to_dict("records"):
        assert_same(joined.state(order["customer_id"]).features(order),
                    whole.state(order["customer_id"]).features(order), where=order["customer_id"])


def test_snapshot_concat_refuses_parts_that_cannot_be_joined() -> None:
    data = dataset([{"order_id": "o1", "customer_id": "a", "order_ts": at(1)}])
    one = Snapshot.build(data, PARAMS, as_of=at(2))
    with pytest.raises(InsertrecError, match="more than one snapshot"):
        Snapshot.concat([one, one])
    with pytest.raises(InsertrecError, match="differ in feature params or as_of"):
        Snapshot.concat([one, Snapshot.build(Dataset(orders=data.orders.iloc[:0]), PARAMS, as_of=at(3))])


def test_snapshot_as_of_ignores_later_history_and_refuses_earlier_orders() -> None:
    data = dataset([{"order_id": "o1", "customer_id": "a", "order_ts": at(0)},
                    {"order_id": "o2", "customer_id": "a", "order_ts": at(400)}],
                   nps=[("a", at(5), 9), ("a", at(300), 1)])
    snapshot = Snapshot.build(data, PARAMS, as_of=at(200))
    frame = customer_frame(snapshot, at(200)).set_index("customer_id")
    assert frame.loc["a", "prior_orders"] == 1 and frame.loc["a", "journey_stage"] == "lapsed"
    assert frame.loc["a", "nps_tier"] == "promoter"
    with pytest.raises(InsertrecError, match="before the snapshot"):
        customer_frame(snapshot, at(100))
    late = dataset([{"order_id": "n1", "customer_id": "a", "order_ts": at(150)}]).orders
    with pytest.raises(DataError, match="before the snapshot"):
        features_for_orders(snapshot, late)


def test_snapshot_survives_joblib_and_serves_unknown_customers(tmp_path) -> None:
    data = dataset([{"order_id": "o1", "customer_id": "a", "order_ts": at(0), "categories": "x"}],
                   nps=[("a", at(1), 8)], exposures=[("o1", "coupon", "c10")])
    joblib.dump(Snapshot.build(data, PARAMS), tmp_path / "snap.joblib")
    snapshot = joblib.load(tmp_path / "snap.joblib")
    order = {"order_id": "n1", "customer_id": "a", "order_ts": "2024-01-11T00:00:00Z", "order_value": 3,
             "categories": ["y", "x"], "channel": "app", "ctx_age": 41.0}
    got = snapshot.state("a").features(order)
    assert got["nps_tier"] == "passive" and got["received_c10_30d"] == 1 and got["days_since_c10"] == 10
    assert got["categories"] == "y|x" and got["main_category"] == "y" and got["ctx_age"] == 41.0
    stranger = snapshot.state("nobody").features(order | {"customer_id": "nobody"})
    assert stranger["journey_stage"] == "new" and stranger["nps_tier"] == "unknown"
    empty = Snapshot.build_empty(PARAMS)
    assert features_for_orders(empty, dataset([order | {"order_ts": at(10)}]).orders)["prior_orders"].iloc[0] == 0


# ---------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------


def test_reward_horizon_boundaries_censoring_override_and_costs() -> None:
    data = dataset([
        {"order_id": "o1", "customer_id": "a", "order_ts": at(0), "order_value": 10.0},
        {"order_id": "o0", "customer_id": "a", "order_ts": at(0), "order_value": 1000.0},  # same instant: not after
        {"order_id": "o2", "customer_id": "a", "order_ts": at(60), "order_value": 50.0, "returned_value": 20.0},
        {"order_id": "o3", "customer_id": "a", "order_ts": at(60, seconds=1), "order_value": 400.0},
        {"order_id": "o4", "customer_id": "b", "order_ts": at(70), "order_value": 5.0},
        {"order_id": "o5", "customer_id": "b", "order_ts": at(100), "order_value": 5.0},
    ], exposures=[("o1", "coupon", "c10"), ("o1", "packaging", "box"), ("o1", "insert", "unpriced"),
                  ("o4", "packaging", "box", np.nan), ("o4", "coupon", "c10", 12.5), ("o4", "insert", "card", 99.0)])
    rewards = order_rewards(data, horizon_days=60, costs={"c10": 2.0, "box": 0.5}).set_index("order_id")
    assert rewards.loc["o1", "revenue"] == 30.0            # o2 at exactly t + 60 days counts, o3 a second later not
    assert rewards.loc["o1", "action_cost"] == 2.5
    assert rewards.loc["o1", "reward"] == 27.5 and rewards.loc["o1", "reward_complete"]
    assert rewards.loc["o4", "reward"] == 12.5             # the first reward the exposures give
    assert rewards.loc["o4", "reward_complete"]            # given: complete although censored
    assert not rewards.loc["o5", "reward_complete"]        # t + 60 days is after the last order
    assert rewards.loc["o3", "revenue"] == 0 and not rewards.loc["o3", "reward_complete"]
    assert list(rewards.index) == list(data.orders["order_id"])
    plain = order_rewards(data, horizon_days=30).set_index("order_id")
    assert plain.loc["o1", "reward"] == 0.0 and plain.loc["o4", "revenue"] == 5.0  # o5 exactly 30 days later


def test_params_saved_with_an_older_column_layout_get_the_current_one() -> None:
    """Model directories pickled the params with their derived layout; one saved by an older
    version must not hand the online path a layout without what it now reads."""
    stale = dict(PARAMS.__dict__, _layout=SimpleNamespace())   # a layout of an older version

    class SavedByAnOlderVersion:
        def __reduce__(self) -> tuple:
            return object.__new__, (FeatureParams,), stale

    loaded = pickle.loads(pickle.dumps(SavedByAnOlderVersion()))
    assert loaded == PARAMS and "_layout" not in pickle.loads(pickle.dumps(PARAMS)).__dict__
    order = {"order_id": "n", "customer_id": "a", "order_ts": at(1), "order_value": 5.0}
    assert_same(CustomerState.empty(loaded).features(order), CustomerState.empty(PARAMS).features(order))


def test_a_copied_state_takes_events_without_changing_the_original() -> None:
    """The service tries a caller's fresher NPS answer on a copy, for one request only."""
    data = dataset([{"order_id": "o1", "customer_id": "a", "order_ts": at(0), "categories": "x"}],
                   nps=[("a", at(1), 9)], exposures=[("o1", "coupon", "c10")])
    state = Snapshot.build(data, PARAMS).state("a")
    order = {"order_id": "o2", "customer_id": "a", "order_ts": at(5), "order_value": 20.0}
    before = state.features(order)
    trial = copy.copy(state)
    trial.add_nps(2, at(4))
    trial.add_incident("late", at(4))
    trial.add_order({"order_id": "o1b", "customer_id": "a", "order_ts": at(3), "order_value": 5.0,
                     "categories": ["x"]}, {"coupon": "c10"})
    trial.add_return("o1", 10.0)
    changed = trial.features(order)
    assert changed["nps_tier"] == "detractor" and changed["prior_orders"] == 2 and changed["incidents_90d"] == 1
    assert_same(state.features(order), before)
