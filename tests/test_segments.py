"""Segments: k in range, names a marketer can trust, and SPEC's segments.csv."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from insertrec.errors import DataError
from insertrec.segments import LIKELY, SEGMENTS_CSV_COLUMNS, UNLIKELY, SegmentModel, _return_word, customer_stage


def planted(n_each: int = 300, seed: int = 0) -> pd.DataFrame:
    """Four unmistakable groups of customers, in the customer-frame columns."""
    rng = np.random.default_rng(seed)
    u = lambda lo, hi: rng.uniform(lo, hi, n_each)
    groups = {
        "lapsed_detractors": dict(prior_orders=rng.integers(3, 6, n_each), recency_days=u(300, 500),
                                  tenure_days=u(600, 900), total_spend=u(800, 1500), return_rate=u(0, 0.1),
                                  nps_tier="detractor", journey_stage="lapsed", p_repeat=u(0.02, 0.08)),
        "new_buyers": dict(prior_orders=np.ones(n_each), recency_days=u(1, 40), tenure_days=u(1, 40),
                           total_spend=u(20, 60), return_rate=np.full(n_each, np.nan), nps_tier="unknown",
                           journey_stage="new", p_repeat=u(0.15, 0.3)),
        "loyal_promoters": dict(prior_orders=rng.integers(8, 16, n_each), recency_days=u(3, 30),
                                tenure_days=u(400, 800), total_spend=u(600, 1200), return_rate=u(0, 0.05),
                                nps_tier="promoter", journey_stage="loyal", p_repeat=u(0.7, 0.9)),
        "returners": dict(prior_orders=rng.integers(2, 4, n_each), recency_days=u(20, 90),
                          tenure_days=u(100, 300), total_spend=u(100, 250), return_rate=u(0.4, 0.6),
                          nps_tier="passive", journey_stage="developing", p_repeat=u(0.3, 0.5)),
    }
    frames = [pd.DataFrame(cols).assign(truth=name) for name, cols in groups.items()]
    out = pd.concat(frames, ignore_index=True)
    out["customer_id"] = [f"c{i}" for i in range(len(out))]
    out["expected_orders"] = out["p_repeat"] * 1.3
    out["monetary"] = out["total_spend"] / out["prior_orders"]
    return out


@pytest.fixture(scope="module")
def fitted() -> tuple[SegmentModel, pd.DataFrame]:
    frame = planted()
    return SegmentModel(random_state=0).fit(frame), frame


def test_finds_the_planted_groups_and_names_them(fitted: tuple[SegmentModel, pd.DataFrame]) -> None:
    model, frame = fitted
    assert 3 <= model.k_ <= 8 and model.silhouette_ > 0.3
    seg = model.predict(frame)
    # Each planted group lands (almost entirely) in one segment.
    purity = pd.crosstab(frame["truth"], seg, normalize="index").max(axis=1)
    assert (purity > 0.9).all()
    names = np.asarray(model.names_)[seg]
    lapsed = pd.Series(names[frame["truth"] == "lapsed_detractors"]).mode()[0]
    assert "Lapsed" in lapsed and "detractor" in lapsed and "high-value" in lapsed
    loyal = pd.Series(names[frame["truth"] == "loyal_promoters"]).mode()[0]
    assert loyal.startswith("Loyal") and "promoters" in loyal
    new = pd.Series(names[frame["truth"] == "new_buyers"]).mode()[0]
    assert new.startswith("New") and "first-time" in new
    returners = pd.Series(names[frame["truth"] == "returners"]).mode()[0]
    assert "high returns" in returners
    assert len(set(model.names_)) == model.k_


def test_profiles_describe_each_segment(fitted: tuple[SegmentModel, pd.DataFrame]) -> None:
    model, frame = fitted
    prof = model.profiles()
    assert list(prof["segment_id"]) == list(range(model.k_))
    assert prof["customers"].sum() == len(frame)
    assert prof["share"].sum() == pytest.approx(1.0)
    mixes = prof[[c for c in prof if c.startswith("nps_")]].sum(axis=1)
    assert np.allclose(mixes, 1.0)
    assert np.allclose(prof[[c for c in prof if c.startswith("stage_")]].sum(axis=1), 1.0)
    lapsed = prof[prof["segment_name"].str.startswith("Lapsed")].iloc[0]
    assert lapsed["nps_detractor"] > 0.9 and lapsed["p_repeat"] < 0.1
    assert prof["description"].str.len().gt(20).all()


def test_segments_csv_has_spec_columns(fitted: tuple[SegmentModel, pd.DataFrame]) -> None:
    model, frame = fitted
    shuffled = frame.sample(frac=1.0, random_state=1).set_index(np.arange(len(frame)) * 7)
    csv = model.segments_csv(shuffled)
    assert tuple(csv.columns) == SEGMENTS_CSV_COLUMNS
    assert len(csv) == len(frame) and csv["customer_id"].tolist() == shuffled["customer_id"].tolist()
    names = dict(enumerate(model.names_))
    assert (csv["segment_name"] == csv["segment_id"].map(names)).all()


def test_tiny_or_uniform_base_still_segments() -> None:
    frame = planted(n_each=1).iloc[:2]
    model = SegmentModel().fit(frame)
    assert model.k_ == 1 and np.isnan(model.silhouette_)
    assert len(model.names_) == 1 and (model.predict(frame) == 0).all()


def test_missing_column_is_named() -> None:
    with pytest.raises(DataError, match="p_repeat"):
        SegmentModel().fit(planted(n_each=5).drop(columns="p_repeat"))


def test_return_words_match_the_figures_whatever_the_base() -> None:
    """"likely to return" only where at least LIKELY come back; a low-return shop's best group at 10%
    is "more likely than most", never "likely"."""
    frame = planted(n_each=200)
    frame["p_repeat"] = np.select([frame["truth"] == "loyal_promoters", frame["truth"] == "returners"],
                                  [0.10, 0.03], 0.02)
    model = SegmentModel(random_state=0).fit(frame)
    prof = model.profiles()
    for name, p in zip(prof["segment_name"], prof["p_repeat"]):
        if "likely to return" in name and "than most" not in name and "unlikely" not in name:
            assert p >= LIKELY, (name, p)
        if "unlikely to return" in name:
            assert p < UNLIKELY, (name, p)
        assert f"{p:.0%} likely to order again" in prof.set_index("segment_name").loc[name, "description"]
    # The rule itself: absolute words where the figure earns them, relative ones otherwise.
    assert _return_word(0.10, 0.04)[1] == "more likely than most to return"
    assert _return_word(0.60, 0.20)[1] == "likely to return"
    assert _return_word(0.55, 0.60)[1] == "likely to return"
    assert _return_word(0.10, 0.30)[1] == "unlikely to return"
    assert _return_word(0.25, 0.40)[1] == "less likely than most to return"
    assert _return_word(0.15, 0.05)[1] == "more likely than most to return"
    assert _return_word(0.30, 0.31) is None


def test_one_order_customers_are_new() -> None:
    frame = pd.DataFrame({"prior_orders": [1, 2, 3, 4, 9, 1], "journey_stage":
                          ["developing", "developing", "loyal", "loyal", "lapsed", "lapsed"]})
    assert customer_stage(frame).tolist() == ["new", "developing", "developing", "loyal", "lapsed", "lapsed"]
    model = SegmentModel(random_state=0).fit(planted(n_each=50).assign(journey_stage="developing"))
    csv = model.segments_csv(planted(n_each=50).assign(journey_stage="developing"))
    ones = planted(n_each=50)["prior_orders"].to_numpy() == 1
    assert (csv.loc[ones, "journey_stage"] == "new").all()
    assert np.allclose(model.profiles()[["stage_new", "stage_developing", "stage_loyal"]].sum(axis=1), 1.0)
