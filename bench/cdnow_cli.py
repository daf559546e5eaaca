"""CDNOW through the command line, as a shop with only an orders file would run it.

`repeat_vs_bgnbd.py` compares the repurchase model with BG/NBD in process,
with its settings chosen on an inner split. This bench checks the product
path instead: an orders-only data directory (no catalog, so `train` skips
the policy and says so), `insertrec train --cutoff 1997-10-01
--horizon-days 273`, then `insertrec segments`, whose `segments.csv`
(`p_repeat`, `expected_orders` per customer) is scored against the 39-week
holdout beside BG/NBD fitted on the same calibration orders, in one run.

The data directory holds the calibration orders only (before the cutoff),
so nothing in it can leak the holdout; the holdout is read from CDNOW after
the commands have run.

Run: ``python bench/cdnow_cli.py`` (about a minute). Writes
``bench/results/cdnow_cli.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from repeat_vs_bgnbd import CAL_END, HOLDOUT_DAYS, bgnbd_predictions, bgnbd_scored, load_cdnow, print_metrics

from insertrec.customers import order_counts, repeat_metrics

OUT = Path(__file__).parent / "results" / "cdnow_cli.json"
COLUMNS = ["order_id", "customer_id", "order_ts", "order_value", "n_items"]


def run(cwd: str, *args: str) -> tuple[float, str]:
    """One `insertrec` command in ``cwd`` (where MLflow's store lands), its wall seconds and its
    standard error (progress and notes)."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "insertrec.cli", *args], capture_output=True, text=True,
                          timeout=1800, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"insertrec {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - began, done.stderr


def main() -> None:
    orders = load_cdnow().orders
    calibration = orders[orders["order_ts"] < CAL_END]
    with tempfile.TemporaryDirectory() as tmp:
        data, model, report = Path(tmp, "cdnow"), Path(tmp, "model"), Path(tmp, "report")
        data.mkdir()
        calibration[COLUMNS].to_csv(data / "orders.csv", index=False)
        train_s, train_err = run(tmp, "train", "--data", str(data), "--out", str(model), "--cutoff",
                                 CAL_END.date().isoformat(), "--horizon-days", str(HOLDOUT_DAYS),
                                 "--experiment", "cdnow-bench")
        segments_s, _ = run(tmp, "segments", "--model", str(model), "--out", str(report))
        scored = pd.read_csv(report / "segments.csv", dtype={"customer_id": str})
    truth = order_counts(orders, scored["customer_id"], CAL_END, HOLDOUT_DAYS)
    cli = repeat_metrics(truth, scored["p_repeat"].to_numpy(), scored["expected_orders"].to_numpy())
    bg_p, bg_m, _ = bgnbd_predictions(calibration, pd.Index(scored["customer_id"]))
    bg = bgnbd_scored(truth, bg_p, bg_m)
    better = {"auc": cli["repeat_auc"] > bg["repeat_auc"],
              "count_rmse": cli["repeat_count_rmse"] < bg["repeat_count_rmse"],
              "total_error": abs(cli["repeat_total_error"]) < abs(bg["repeat_total_error"]),
              "brier": cli["repeat_brier"] < bg["repeat_brier"]}
    results = {"customers": len(scored), "calibration_orders": len(calibration), "holdout_orders": int(truth.sum()),
               "cli": cli, "bgnbd": bg, "cli_better": better,
               "seconds": {"train": round(train_s, 1), "segments": round(segments_s, 1)},
               "train_notes": [line for line in train_err.splitlines() if "catalog" in line]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"CDNOW through the CLI: {len(scored):,} customers, train {train_s:.0f} s, segments {segments_s:.0f} s")
    print_metrics({"insertrec CLI": cli, "BG/NBD": bg})
    print(f"CLI better on: {', '.join(k for k, v in better.items() if v) or 'nothing'}"
          f"{'' if all(better.values()) else '; NOT on ' + ', '.join(k for k, v in better.items() if not v)}")
    assert np.isfinite(cli["repeat_auc"])
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
