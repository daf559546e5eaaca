"""Speed of deciding orders in-process: one order at a time (the service's path) and a batch (`recommend`).

Builds a real model (the default simulated world's demo data, trained as
`insertrec train` does) unless --model/--data name one, then measures in one
run, side by side on the same orders:
  - `Engine.decide` per order, customer state and features included: p50/p99;
  - its stages, each timed alone on the same orders: features (snapshot state +
    `CustomerState.features`), eligibility + playbook (`Catalog.assess_one`),
    encoding (`FeatureEncoder.transform_one`), scoring (the policy's decision
    core on one row: every box of every slot scored, exploration), explanation
    (notes, reasons, ranked alternatives);
  - `Decider.decide_many` (the service's micro-batches) at batch sizes 1, 7 and 32: CPU
    microseconds per order, customer state and features included, and `Policy.decide_many`
    alone on the same feature rows;
  - `Engine.decide_batch` in orders per second, and its parts.
Writes bench/results/decide.json. Wall times on a shared machine vary: read
the figures side by side, and never gate CI on them.

Usage: python bench/decide.py [--model DIR --data DIR] [--orders 5000] [--batch 100000] [--sizes 1,7,32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from insertrec.data import load_data
from insertrec.decide import Decider
from insertrec.engine import Engine
from insertrec.features import features_for_orders
from insertrec.training import TrainConfig, train
from insertrec.world import World

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"decide_p99_us": 1000.0, "decision_p50_us": 100.0, "batch_orders_per_s": 100_000.0}


def build(customers: int) -> tuple[Path, Path]:
    """Demo data and a model trained on it, in a temporary directory."""
    tmp = Path(tempfile.mkdtemp(prefix="insertrec-bench-decide-"))
    World.default().write_demo_data(tmp / "data", customers=customers, seed=0)
    train(load_data(tmp / "data"), tmp / "model", TrainConfig())
    return tmp / "data", tmp / "model"


def new_orders(engine: Engine, data_dir: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` orders placed after the model's snapshot, shaped like the shop's own: known customers'
    baskets resampled, one order in five from a customer never seen."""
    orders = load_data(data_dir).orders
    rng = np.random.default_rng(seed)
    out = orders.iloc[rng.integers(0, len(orders), n)].drop(columns=["returned_value"]).reset_index(drop=True)
    out["order_id"] = [f"bench-{i}" for i in range(n)]
    fresh = rng.random(n) < 0.2
    out.loc[fresh, "customer_id"] = [f"new-{i}" for i in np.flatnonzero(fresh)]
    out["order_ts"] = engine.snapshot.as_of + pd.to_timedelta(np.arange(n) + 1, unit="s")
    return out


def records(orders: pd.DataFrame) -> list[dict]:
    """Orders as the service hands them over: plain dicts, ISO timestamps, categories as a list."""
    out = orders.assign(order_ts=orders["order_ts"].map(pd.Timestamp.isoformat)).to_dict("records")
    for r in out:
        r["categories"] = [c for c in r["categories"].split("|") if c]
    return out


def timed(fn, items: list) -> np.ndarray:
    """Microseconds of ``fn(item)`` for each item."""
    out = np.empty(len(items))
    clock = time.perf_counter
    for i, item in enumerate(items):
        t0 = clock()
        fn(item)
        out[i] = clock() - t0
    return out * 1e6


def summary(us: np.ndarray) -> dict[str, float]:
    return {"p50_us": round(float(np.percentile(us, 50)), 1), "p90_us": round(float(np.percentile(us, 90)), 1),
            "p99_us": round(float(np.percentile(us, 99)), 1), "mean_us": round(float(us.mean()), 1)}


def numpy_call_us() -> float:
    """Microseconds of one tiny NumPy call right now: the single-order path is a few dozen of them,
    so this says how loaded the machine was (about 0.3 on an idle core)."""
    a = np.ones(17)
    t0 = time.perf_counter()
    for _ in range(20_000):
        np.add(a, a)
    return round((time.perf_counter() - t0) / 20_000 * 1e6, 3)


def single(engine: Engine, recs: list[dict]) -> dict:
    """Engine.decide per order, and each of its stages on the same orders."""
    policy = engine.policy
    states = [engine.state(str(r["customer_id"])) for r in recs]
    feats = [s.features(r) for s, r in zip(states, recs)]
    assessed = [policy.catalog.assess_one(f) for f in feats]
    phis = [None if policy.encoder is None else policy.encoder.transform_one(f) for f in feats]
    def score(i: int):  # as Policy.decide_one does between assessing and explaining
        return policy._decide_one(str(feats[i]["order_id"]), phis[i], *assessed[i])

    ones = [score(i) for i in range(len(recs))]
    idx = list(range(len(recs)))
    for r in recs[:200]:   # warm caches (customer index, compiled conditions)
        engine.decide(r)
    stages = {
        "features": timed(lambda i: engine.state(str(recs[i]["customer_id"])).features(recs[i]), idx),
        "eligibility_rules": timed(lambda i: policy.catalog.assess_one(feats[i]), idx),
        "encode": timed(lambda i: policy.encoder.transform_one(feats[i]) if policy.encoder else None, idx),
        "score": timed(score, idx),
        "explain": timed(lambda i: policy._explain(
            ones[i], policy._drivers(None if phis[i] is None else phis[i][None], [ones[i].actions])[0],
            engine.segments.get(str(recs[i]["customer_id"]))), idx),
    }
    cpu = time.process_time()
    decide = timed(engine.decide, recs)
    cpu = (time.process_time() - cpu) / len(recs) * 1e6   # CPU time: steadier than wall time on a shared host
    decision = timed(lambda i: policy.decide_one(feats[i], frozenset(), None), idx)
    return {"orders": len(recs), "engine_decide": summary(decide), "engine_decide_cpu_us": round(cpu, 1),
            "decision_without_features": summary(decision),
            "stages": {k: summary(v) for k, v in stages.items()},
            "stage_p50_sum_us": round(sum(float(np.percentile(v, 50)) for v in stages.values()), 1)}


def cpu_per_order(fn, groups: list[list[int]], repeats: int) -> float:
    """CPU microseconds per order of ``fn(group)`` over all groups, best of ``repeats``."""
    best = []
    for _ in range(repeats):
        t0 = time.process_time()
        for group in groups:
            fn(group)
        best.append(time.process_time() - t0)
    return round(min(best) / sum(map(len, groups)) * 1e6, 1)


def micro_batches(engine: Engine, recs: list[dict], sizes: list[int], repeats: int) -> dict:
    """`Decider.decide_many` (model, rules behind it) per micro-batch size, and `Policy.decide_many`
    on the same orders' feature rows: CPU microseconds per order."""
    decider = Decider(engine, Engine.rules_only(engine.catalog))
    states = [engine.state(str(r["customer_id"])) for r in recs]
    feats = [s.features(r) for s, r in zip(states, recs)]
    segments = [engine.segments.get(str(r["customer_id"])) for r in recs]
    none = frozenset[str]()
    out = {}
    for size in sizes:
        groups = [list(range(lo, min(lo + size, len(recs)))) for lo in range(0, len(recs), size)]
        decider.decide_many([recs[i] for i in groups[0]], [states[i] for i in groups[0]], [none] * len(groups[0]))
        out[str(size)] = {
            "decider_decide_many_cpu_us": cpu_per_order(lambda g: decider.decide_many(
                [recs[i] for i in g], [states[i] for i in g], [none] * len(g)), groups, repeats),
            "policy_decide_many_cpu_us": cpu_per_order(lambda g: engine.policy.decide_many(
                [feats[i] for i in g], [none] * len(g), [segments[i] for i in g]), groups, repeats)}
    return out


def batch(engine: Engine, orders: pd.DataFrame, repeats: int) -> dict:
    """Engine.decide_batch on all orders (best of ``repeats``), and its two big parts."""
    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    total = best(lambda: engine.decide_batch(orders))
    feats = features_for_orders(engine.snapshot, orders)
    features_s = best(lambda: features_for_orders(engine.snapshot, orders))
    policy_s = best(lambda: engine.policy.decide_frame(feats))
    return {"orders": len(orders), "seconds": round(total, 3), "orders_per_s": round(len(orders) / total),
            "parts_s": {"features_for_orders": round(features_s, 3), "policy_decide_frame": round(policy_s, 3),
                        "output_frame": round(max(total - features_s - policy_s, 0.0), 3)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: train one on demo data)")
    ap.add_argument("--data", help="the data directory the model was trained on (orders are resampled from it)")
    ap.add_argument("--customers", type=int, default=5000)
    ap.add_argument("--orders", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="1,7,32", help="micro-batch sizes for Decider.decide_many")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decide.json"))
    args = ap.parse_args()
    if bool(args.model) != bool(args.data):
        raise SystemExit("--model and --data go together")
    with threadpool_limits(1):
        data_dir, model_dir = (Path(args.data), Path(args.model)) if args.model else build(args.customers)
        engine = Engine.load(model_dir)
        orders = new_orders(engine, data_dir, max(args.batch, args.orders))
        load_before = os.getloadavg()
        reference = numpy_call_us()
        one = single(engine, records(orders.head(args.orders)))
        micro = micro_batches(engine, records(orders.head(args.orders)), [int(x) for x in args.sizes.split(",")],
                     args.repeats)
        many = batch(engine, orders.head(args.batch), args.repeats)
        reference = min(reference, numpy_call_us())
    result = {"model": str(model_dir), "policy": engine.policy.name,
              "playbook_slots": list(engine.policy.playbook_slots), "boxes_scored": len(engine.policy.combos),
              "cpus": os.cpu_count(), "loadavg_before": load_before, "numpy_call_us": reference,
              "single": one, "micro_batches": micro, "batch": many,
              "targets": TARGETS,
              "met": {"decide_p99_us": one["engine_decide"]["p99_us"] < TARGETS["decide_p99_us"],
                      "decision_p50_us": one["decision_without_features"]["p50_us"] < TARGETS["decision_p50_us"],
                      "batch_orders_per_s": many["orders_per_s"] >= TARGETS["batch_orders_per_s"]}}
    d, s = one["engine_decide"], one["stages"]
    print(f"machine: one tiny NumPy call {reference} us, load average {load_before[0]:.1f}")
    print(f"Engine.decide      p50 {d['p50_us']:.0f} us  p99 {d['p99_us']:.0f} us  CPU {one['engine_decide_cpu_us']:.0f} us "
          f"per order ({one['orders']} orders)")
    print("  stages p50 (us): " + ", ".join(f"{k} {v['p50_us']:.0f}" for k, v in s.items()))
    print("decide_many CPU us per order (Decider / Policy alone): " + ", ".join(
        f"{k}: {v['decider_decide_many_cpu_us']:.0f} / {v['policy_decide_many_cpu_us']:.0f}" for k, v in micro.items()))
    print(f"Engine.decide_batch {many['orders_per_s']:,} orders/s ({many['orders']:,} orders, "
          + ", ".join(f"{k} {v:.2f}s" for k, v in many["parts_s"].items()) + ")")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
