"""Spark beside the local path: time and peak memory of the same work on the same history.

What is compared, each side in a fresh process so that its peak memory is its own:

- ``local``: ``load_data`` + ``FeatureParams.fit`` + ``order_features`` + ``order_rewards``
  (as ``training.train`` calls them);
- ``spark``: ``spark.tables.read_tables`` + ``spark.features.feature_params`` +
  ``features_and_rewards``, run to completion (Spark's ``noop`` sink), on ``--master``.
  Peak memory: the driver's Python process, and each process below it (VmHWM): the JVM,
  which holds the driver's and the executors' heaps in local mode, and the Python workers.

With ``--work snapshot`` the Spark side alone runs the steps of ``train`` that no longer need the
history on the driver: the checked read, the feature parameters, the model's snapshot built per
customer bucket and joined on the driver, the customer frame from it, and the data fingerprint.

With ``--work train`` the whole of ``insertrec train`` is compared instead: ``load_data`` +
``training.train`` against ``spark.training.train_on_spark`` (the driver given
``--driver-memory``; it holds the tables of a sample of about ``--sample-orders`` orders of whole
customers, all of them on a history that small). The history is the
default simulated world's (``World.write_demo_data``, ~2.4 orders per customer), generated
into ``--data`` unless it is there; ``--parts`` writes the orders as that many Parquet part
files (``orders/part-*.parquet``), one customer range at a time, never the whole history in
memory at once.

Usage: python bench/scale_spark.py [--customers 406000] [--master local[2]] [--data DIR] [--parts N]
       [--work features|snapshot|train] [--driver-memory 6g] [--sample-orders 1000000] [--timeout 7200]
       [--max-rss-gib 16]
       [--result NAME.json]
Writes bench/results/scale_spark.json (``--work train``: scale_spark_train.json) or ``--result``;
a side that fails (out of memory, timeout, over ``--max-rss-gib``) is reported with the steps it reached and the memory
sampled until then.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024.0 ** 3
TARGET_RATIO = 2.0   # issue 13: Spark at most twice the local time on the same machine


def _rss_gib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss * 1024.0 / GIB


def generate(data: Path, customers: int, seed: int, parts: int) -> dict:
    """The simulated shop; with ``parts`` > 1, its tables as Parquet part files written one
    customer range at a time (each part a world of its own customers, seeds apart)."""
    from insertrec.world import World

    start = time.perf_counter()
    world = World.default()
    if parts <= 1:
        world.write_demo_data(data, customers=customers, seed=seed)
    else:
        import pandas as pd

        for part in range(parts):
            with tempfile.TemporaryDirectory(prefix="insertrec-part-") as tmp:
                world.write_demo_data(tmp, customers=customers // parts, seed=seed + part)
                for name in ("orders", "nps", "exposures", "incidents"):
                    frame = pd.read_csv(Path(tmp) / f"{name}.csv", dtype=str, keep_default_na=False)
                    for key in ("order_id", "customer_id"):
                        if key in frame:
                            frame[key] = f"p{part}-" + frame[key]
                    (data / name).mkdir(parents=True, exist_ok=True)
                    frame.to_parquet(data / name / f"part-{part:05d}.parquet", index=False)
                if part == parts - 1:   # last: a directory with its catalog is a complete history
                    shutil.copy(Path(tmp) / "catalog.yaml", data / "catalog.yaml")
    return {"seconds": time.perf_counter() - start}


def run_train(side: str, data: Path, master: str, driver_memory: str, sample_orders: int) -> dict:
    """`insertrec train` on one side, timed per step, in this process."""
    from insertrec.training import TrainConfig

    start = last = time.perf_counter()
    steps: dict[str, float] = {}
    step = ["start"]

    def progress(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps[step[0]] = now - last
        print(f"STEP {step[0]} done after {now - last:.1f} s; next: {name} (driver peak so far "
              f"{_rss_gib(resource.RUSAGE_SELF):.2f} GiB)", file=sys.stderr, flush=True)
        step[0], last = name, now

    with tempfile.TemporaryDirectory(prefix="insertrec-scale-model-") as out:
        if side == "local":
            from insertrec.data import load_data
            from insertrec.training import train

            progress("load")
            result = train(load_data(data), out, TrainConfig(), progress)
        else:
            from insertrec.spark.training import train_on_spark

            result = train_on_spark(data, out, master=master, conf={"spark.driver.memory": driver_memory},
                                    progress=progress, sample_orders=sample_orders)
        progress("end")
    report = {"seconds": time.perf_counter() - start, "steps_seconds": steps, "version": result.manifest["version"],
              "peak_rss_gib": _rss_gib(resource.RUSAGE_SELF)}
    if side == "spark":
        report["descendants_peak_rss_gib"] = _descendants_peak_gib()
    return report


def run_snapshot(data: Path, master: str, driver_memory: str) -> dict:
    """The Spark side of `train` up to the customer frame, timed per step, in this process."""
    import pandas as pd

    from insertrec import features
    from insertrec.spark.features import feature_params, snapshot
    from insertrec.spark.session import spark_session
    from insertrec.spark.tables import fingerprint, read_tables
    from insertrec.training import TrainConfig

    config = TrainConfig()
    start, steps = time.perf_counter(), {}

    def step(name: str) -> None:
        steps[name] = time.perf_counter() - start - sum(steps.values())
        print(f"STEP {name} done after {steps[name]:.1f} s (driver peak so far {_rss_gib(resource.RUSAGE_SELF):.2f} GiB)",
              file=sys.stderr, flush=True)

    spark = spark_session(master, {"spark.driver.memory": driver_memory})
    step("session")
    tables = read_tables(spark, data)
    orders = tables.orders.count()
    step("read")
    params = feature_params(tables, nps_ttl_days=config.nps_ttl_days, lapse_days=config.lapse_days)
    step("feature params")
    last = tables.orders.agg({"order_ts": "max"}).first()[0]
    cutoff = pd.Timestamp(int(last), unit="ns", tz="UTC") + pd.Timedelta(seconds=1)
    joined = snapshot(tables, params, cutoff)
    step("snapshot")
    customers = len(features.customer_frame(joined, cutoff))
    step("customer frame")
    fingerprint(tables)
    step("fingerprint")
    descendants = _descendants_peak_gib()
    spark.stop()
    return {"orders": orders, "customers": customers, "seconds": time.perf_counter() - start, "steps_seconds": steps,
            "driver_python_peak_rss_gib": _rss_gib(resource.RUSAGE_SELF), "descendants_peak_rss_gib": descendants}


def run_side(side: str, data: Path, master: str) -> dict:
    """One side in this process (called in a fresh child by `measure`)."""
    from insertrec.training import TrainConfig

    config = TrainConfig()
    start, steps = time.perf_counter(), {}
    if side == "local":
        from insertrec import features
        from insertrec.data import load_data

        loaded = load_data(data)
        steps["load"] = time.perf_counter() - start
        catalog = loaded.catalog
        params = features.FeatureParams.fit(loaded, catalog=catalog, nps_ttl_days=config.nps_ttl_days,
                                            lapse_days=config.lapse_days)
        feats = features.order_features(loaded, params)
        costs = {a.id: a.cost for slot in catalog.slots.values() for a in slot.actions}
        features.order_rewards(loaded, horizon_days=config.horizon_days, costs=costs)
        orders = len(feats)
    else:
        from insertrec.spark.features import feature_params, features_and_rewards
        from insertrec.spark.session import spark_session
        from insertrec.spark.tables import read_tables

        spark = spark_session(master)
        steps["session"] = time.perf_counter() - start
        tables = read_tables(spark, data)
        orders = tables.orders.count()
        steps["load"] = time.perf_counter() - start - steps["session"]
        catalog = tables.catalog
        params = feature_params(tables, nps_ttl_days=config.nps_ttl_days, lapse_days=config.lapse_days)
        costs = {a.id: a.cost for slot in catalog.slots.values() for a in slot.actions}
        result = features_and_rewards(tables, params, horizon_days=config.horizon_days, costs=costs)
        result.write.format("noop").mode("overwrite").save()
        steps["features"] = time.perf_counter() - start - sum(steps.values())
        descendants = _descendants_peak_gib()
        spark.stop()
        return {"orders": orders, "seconds": time.perf_counter() - start, "steps_seconds": steps,
                "driver_python_peak_rss_gib": _rss_gib(resource.RUSAGE_SELF), "descendants_peak_rss_gib": descendants}
    steps["features"] = time.perf_counter() - start - sum(steps.values())
    return {"orders": orders, "seconds": time.perf_counter() - start, "steps_seconds": steps,
            "peak_rss_gib": _rss_gib(resource.RUSAGE_SELF)}


def _tree(root: int) -> list[int]:
    """``root``'s descendants (not itself)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _status_gib(pid: int, field: str) -> tuple[str, float] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:")), 0)
    return f"{name}[{pid}]", kib * 1024.0 / GIB


def _descendants_peak_gib() -> dict[str, float]:
    """Peak resident set (VmHWM) of each process below this one, by command: in local mode the
    JVM holds the driver's and the executors' heaps, the Python workers run the pandas code."""
    return dict(found for pid in _tree(os.getpid()) if (found := _status_gib(pid, "VmHWM")) is not None)


class _Watch(threading.Thread):
    """Samples the resident memory of a process and of everything below it every 2 s: the peak of
    each, and of their sum (what the machine had to hold at once), also when the run fails."""

    def __init__(self, pid: int, limit_gib: float):
        super().__init__(daemon=True)
        self.pid, self.limit, self.stop = pid, limit_gib, threading.Event()
        self.peaks: dict[str, float] = {}
        self.total = 0.0
        self.stopped_at: float | None = None

    def run(self) -> None:
        while not self.stop.wait(2.0):
            now = [found for pid in [self.pid, *_tree(self.pid)] if (found := _status_gib(pid, "VmRSS"))]
            for key, gib in now:
                self.peaks[key] = max(self.peaks.get(key, 0.0), gib)
            total = sum(gib for _, gib in now)
            self.total = max(self.total, total)
            if total > self.limit and self.stopped_at is None:   # the machine is shared: stop before it swaps or kills
                self.stopped_at = total
                os.killpg(self.pid, signal.SIGKILL)

    def report(self) -> dict:
        out = {"sampled_peak_rss_gib": self.peaks, "sampled_peak_total_rss_gib": self.total}
        return out | ({} if self.stopped_at is None else {"stopped_over_limit_gib": [self.stopped_at, self.limit]})


def measure(side: str, data: Path, master: str, work: str, driver_memory: str, timeout: float,
            limit_gib: float, sample_orders: int) -> dict:
    """One side in a fresh process; a failure (e.g. out of memory) is reported with the steps
    reached and the memory sampled until then."""
    cmd = [sys.executable, __file__, "--side", side, "--data", str(data), "--master", master, "--work", work,
           "--driver-memory", driver_memory, "--sample-orders", str(sample_orders)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        watch = _Watch(child.pid, limit_gib)
        watch.start()
        try:
            out, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
        watch.stop.set()
        err.seek(0)
        lines = err.read().splitlines()
    print("\n".join(line for line in lines if line.startswith("STEP")), file=sys.stderr)
    common = {"loadavg_1m_before": load, **watch.report()}
    if child.returncode != 0:
        return {"failed": {"returncode": child.returncode, "after_seconds": time.perf_counter() - start,
                           "steps": [line for line in lines if line.startswith("STEP")],
                           "errors": list(dict.fromkeys(line.strip() for line in lines if not line.startswith("\t")
                                                        and ("Error" in line or "Exception" in line)))[:12],
                           "stderr_tail": [line for line in lines if "WARN" not in line][-25:]}, **common}
    return {**json.loads(out.splitlines()[-1]), **common}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=406_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--data", help="history directory (generated there if absent)")
    ap.add_argument("--parts", type=int, default=1, help="write the history as this many Parquet part files")
    ap.add_argument("--sides", default="local,spark", help="which of local,spark to run")
    ap.add_argument("--work", choices=("features", "snapshot", "train"), default="features",
                    help="compare the checked read and features, or the whole of `insertrec train`; "
                         "snapshot: the Spark side's read, snapshot, customer frame and fingerprint alone")
    ap.add_argument("--driver-memory", default="6g", help="with --work train or snapshot: the Spark driver's memory")
    ap.add_argument("--sample-orders", type=int, default=1_000_000,
                    help="with --work train: orders of the Spark driver's sample of whole customers "
                         "(spark.training.SAMPLE_ORDERS by default; every customer when the history has no more)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds a side may run before it is stopped")
    ap.add_argument("--max-rss-gib", type=float, default=16.0,
                    help="stop a side whose processes together hold more than this (the machine is shared)")
    ap.add_argument("--result", help="file name under bench/results (default scale_spark[_train].json)")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        if args.work == "train":
            print(json.dumps(run_train(args.side, Path(args.data), args.master, args.driver_memory,
                                       args.sample_orders)))
        elif args.work == "snapshot":
            print(json.dumps(run_snapshot(Path(args.data), args.master, args.driver_memory)))
        else:
            print(json.dumps(run_side(args.side, Path(args.data), args.master)))
        return
    with tempfile.TemporaryDirectory(prefix="insertrec-scale-spark-") as tmp:
        data = Path(args.data or Path(tmp) / "shop")
        report: dict = {"customers": args.customers, "master": args.master, "cpus": os.cpu_count(),
                        "work": args.work, "driver_memory": args.driver_memory}
        if args.work == "train":
            report["sample_orders"] = args.sample_orders
        if not (data / "catalog.yaml").is_file():
            report["generate"] = generate(data, args.customers, args.seed, args.parts)
        sides = {side: measure(side, data, args.master, args.work, args.driver_memory, args.timeout,
                              args.max_rss_gib, args.sample_orders)
                 for side in args.sides.split(",")}
        report |= sides
        if {"local", "spark"} <= set(sides) and not any("failed" in side for side in sides.values()):
            ratio = sides["spark"]["seconds"] / sides["local"]["seconds"]
            report["spark_over_local"] = {"ratio": ratio, "target": TARGET_RATIO, "within": ratio <= TARGET_RATIO}
    name = args.result or {"train": "scale_spark_train.json", "snapshot": "scale_spark_snapshot.json"}.get(
        args.work, "scale_spark.json")
    out = ROOT / "bench" / "results" / name
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
