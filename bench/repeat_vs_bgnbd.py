"""RepeatModel vs BG/NBD on CDNOW, the classic public purchase history.

CDNOW (shipped inside the ``lifetimes`` package): 23,570 customers who first
bought in Q1 1997, every purchase until 1998-06-30. The classic split is
calibration up to 1997-09-30 and holdout 1997-10-01..1998-06-30 (39 weeks).
Both models see calibration data only; both count a customer-day with a
purchase as one order (BG/NBD's standard daily aggregation).

- BG/NBD (Fader, Hardie & Lee 2005, ``lifetimes.BetaGeoFitter``) is fitted on
  (frequency, recency, T) at the end of calibration.
- RepeatModel needs labelled examples, so inside the calibration period it
  learns from features at 1997-07-01 with the orders of 1997-07-01..09-30
  (92 days: the last quarter of calibration, when every customer has at
  least 3 months of history), then predicts from features at 1997-10-01 for
  the 273-day holdout (carrying its 92-day window over to 273 days).

Compared on the holdout: ROC-AUC of "any order", RMSE of per-customer order
counts, relative error of the total, and Brier score of P(any order). Our
figures are the worst over three seeds (the count model bags bootstrap
replicas); each seed's figures are in the JSON.

Run: ``python bench/repeat_vs_bgnbd.py`` (about a minute on 2 cores).
Writes ``bench/results/repeat_vs_bgnbd.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from lifetimes import BetaGeoFitter
from lifetimes.datasets import load_dataset

from insertrec import features
from insertrec.customers import RepeatModel, order_counts, repeat_metrics
from insertrec.data import ORDER_DTYPES, Dataset

CAL_END = pd.Timestamp("1997-10-01", tz="UTC")       # calibration = everything strictly before
HOLDOUT_DAYS = 273                                    # 1997-10-01 .. 1998-06-30
TRAIN_ANCHOR = pd.Timestamp("1997-07-01", tz="UTC")
TRAIN_WINDOW_DAYS = (CAL_END - TRAIN_ANCHOR).days      # 92
SEEDS = (0, 1, 2)
OUT = Path(__file__).parent / "results" / "repeat_vs_bgnbd.json"


def load_cdnow() -> Dataset:
    """CDNOW as a shop: one order per customer-day with a purchase (its dollars summed)."""
    raw = load_dataset("CDNOW_master.txt", sep=r"\s+", dtype={"customer_id": str, "date": str})
    raw["order_ts"] = pd.to_datetime(raw["date"], format="%Y%m%d", utc=True)
    days = (raw.groupby(["customer_id", "order_ts"], as_index=False)
               .agg(order_value=("dollar_value", "sum"), n_items=("number_of_cds", "sum")))
    days["order_id"] = days["customer_id"] + "-" + days["order_ts"].dt.strftime("%Y%m%d")
    orders = days.assign(channel="unknown", categories="", is_gift=False, returned_value=0.0,
                         region="unknown").astype(ORDER_DTYPES)
    return Dataset(orders=orders.sort_values(["order_ts", "order_id"], ignore_index=True), source="CDNOW")


def customer_frame(data: Dataset, as_of: pd.Timestamp) -> pd.DataFrame:
    """Customer state from purchases strictly before ``as_of``, by the product's own features."""
    params = features.FeatureParams.fit(data)
    return features.customer_frame(features.Snapshot.build(data, params, as_of=as_of), as_of)


def bgnbd_predictions(orders: pd.DataFrame, customers: pd.Index) -> tuple[np.ndarray, np.ndarray, dict]:
    """BG/NBD's P(any order) and expected orders over the holdout, from calibration ``orders``."""
    cal = orders.groupby("customer_id")["order_ts"]
    first, last, n = cal.min(), cal.max(), cal.size()
    last_cal_day = CAL_END - pd.Timedelta(days=1)
    summary = pd.DataFrame({"frequency": n - 1, "recency": (last - first).dt.days,
                            "T": (last_cal_day - first).dt.days}).reindex(customers)
    bg = BetaGeoFitter(penalizer_coef=0.0).fit(summary["frequency"], summary["recency"], summary["T"])
    x, tx, t = (summary[c].to_numpy(dtype=float) for c in ("frequency", "recency", "T"))
    expected = bg.conditional_expected_number_of_purchases_up_to_time(HOLDOUT_DAYS, x, tx, t)
    alive = bg.conditional_probability_alive(x, tx, t)
    r, alpha = bg.params_["r"], bg.params_["alpha"]
    # P(N(h) > 0 | history) = P(alive) * (1 - P(no purchase in h | alive, gamma posterior of the rate)).
    p_any = alive * (1.0 - ((alpha + t) / (alpha + t + HOLDOUT_DAYS)) ** (r + x))
    return np.asarray(p_any), np.asarray(expected), {k: float(v) for k, v in bg.params_.items()}


def main() -> None:
    data = load_cdnow()
    orders = data.orders
    # Both models see calibration data only.
    calibration = Dataset(orders=orders[orders["order_ts"] < CAL_END].reset_index(drop=True), source="CDNOW")
    started = time.perf_counter()
    at_cal_end = customer_frame(calibration, CAL_END)
    truth = order_counts(orders, at_cal_end["customer_id"], CAL_END, HOLDOUT_DAYS)

    train = customer_frame(calibration, TRAIN_ANCHOR)
    labels = order_counts(calibration.orders, train["customer_id"], TRAIN_ANCHOR, TRAIN_WINDOW_DAYS)
    runs = []
    for seed in SEEDS:   # the count model's bagging is random: report the spread, judge the worst
        ours = RepeatModel(horizon_days=HOLDOUT_DAYS, random_state=seed).fit(
            train, labels, window_days=TRAIN_WINDOW_DAYS)
        pred = ours.predict_frame(at_cal_end)
        runs.append(repeat_metrics(truth, pred["p_repeat"].to_numpy(), pred["expected_orders"].to_numpy()))
    ours_seconds = (time.perf_counter() - started) / len(SEEDS)
    spread = pd.DataFrame(runs)
    worst = {"repeat_auc": spread["repeat_auc"].min(), "repeat_brier": spread["repeat_brier"].max(),
             "repeat_count_rmse": spread["repeat_count_rmse"].max(),
             "repeat_total_error": spread["repeat_total_error"].iloc[spread["repeat_total_error"].abs().argmax()]}

    started = time.perf_counter()
    bg_p, bg_m, bg_params = bgnbd_predictions(calibration.orders, pd.Index(at_cal_end["customer_id"]))
    bg_seconds = time.perf_counter() - started

    results = {
        "dataset": {"customers": len(at_cal_end), "calibration_orders": len(calibration.orders),
                    "holdout_orders": int(truth.sum()), "holdout_buyers": int((truth > 0).sum()),
                    "calibration": "1997-01-01..1997-09-30", "holdout": "1997-10-01..1998-06-30",
                    "order": "customer-day with at least one purchase"},
        "ours": {**{k: float(v) for k, v in worst.items()}, "per_seed": runs, "model": ours.kind_,
                 "train_anchor": str(TRAIN_ANCHOR.date()), "train_window_days": TRAIN_WINDOW_DAYS,
                 "seconds": round(ours_seconds, 1)},
        "bgnbd": {**repeat_metrics(truth, bg_p, bg_m), "params": bg_params, "seconds": round(bg_seconds, 1)},
    }
    ours_m, bg = results["ours"], results["bgnbd"]
    results["ours_at_least_as_good"] = {
        "auc": ours_m["repeat_auc"] >= bg["repeat_auc"],
        "count_rmse": ours_m["repeat_count_rmse"] <= bg["repeat_count_rmse"],
        "total_error": abs(ours_m["repeat_total_error"]) <= abs(bg["repeat_total_error"]),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")

    print(f"CDNOW: {len(at_cal_end):,} customers, holdout {int(truth.sum()):,} orders "
          f"by {int((truth > 0).sum()):,} buyers")
    print(f"{'metric':<22}{'RepeatModel':>14}{'BG/NBD':>14}   (ours: worst of seeds {SEEDS})")
    for key, label in [("repeat_auc", "ROC-AUC (any order)"), ("repeat_count_rmse", "RMSE of counts"),
                       ("repeat_total_error", "total error"), ("repeat_brier", "Brier")]:
        print(f"{label:<22}{ours_m[key]:>14.4f}{bg[key]:>14.4f}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
