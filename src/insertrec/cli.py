"""The `insertrec` command: the only place that prints and exits.

Each subcommand imports what it needs when it runs, so `insertrec --help`,
`recommend` or `serve` never pay for MLflow's import. Every error caused by
input is an `InsertrecError`: one line on stderr (plus the full problem list
for bad data) and exit status 2; nothing a user did wrong shows a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from insertrec.errors import DataError, InsertrecError

__all__ = ["build_parser", "main"]


def _print_json_or_table(metrics: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics, indent=2, sort_keys=True, default=float))
        return
    width = max(len(k) for k in metrics) if metrics else 0
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


def _load(args: argparse.Namespace):
    from insertrec.data import load_data, write_rejected

    data = load_data(args.data, skip_bad_rows=getattr(args, "skip_bad_rows", False))
    if len(data.rejected):
        out = Path(getattr(args, "out", None) or ".")
        target = (out if out.suffix == "" else out.parent) / "rejected.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        count = write_rejected(data, target)
        print(f"[insertrec] skipped {count} bad rows; each is listed with its reason in {target}",
              file=sys.stderr)
    return data


def cmd_demo_data(args: argparse.Namespace) -> None:
    from insertrec.world import World

    world = World.load(args.world) if args.world else World.default()
    world.write_demo_data(Path(args.out), customers=args.customers, seed=args.seed)
    print(f"wrote a simulated shop ({args.customers} customers, seed {args.seed}) to {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from insertrec.tracking import Progress
    from insertrec.training import TrainConfig, train

    if args.decisions:
        from insertrec.serving.decisionlog import merge_logged

        data = merge_logged(_load(args), args.decisions)
    else:
        data = _load(args)
    config = TrainConfig(cutoff=args.cutoff, horizon_days=args.horizon_days, epsilon=args.epsilon,
                         seed=args.seed)
    progress = Progress()
    result = train(data, args.out, config, progress=progress)
    for note in result.notes:
        print(f"[insertrec] note: {note}", file=sys.stderr)
    if not args.no_mlflow:
        progress("logging the run to MLflow")
        from insertrec.tracking import log_training_run

        run = log_training_run(result.model_dir, params=result.manifest["params"] | {
            "data": str(Path(args.data).resolve()),
            "data_fingerprint": result.manifest["data_fingerprint"],
            "catalog_sha256": result.manifest["catalog_sha256"]},
            metrics=result.metrics | progress.seconds(), experiment=args.experiment,
            register_as=args.register_as or None)
        print(f"MLflow run {run.run_id}" + (f", registered as version {run.version}" if run.version else ""))
    _print_json_or_table(result.metrics, False)
    print(f"model written to {result.model_dir}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from insertrec.engine import Engine
    from insertrec.evaluation import evaluate_on

    engine = Engine.load(args.model)
    horizon = int(engine.manifest.get("params", {}).get("horizon_days", 60))
    metrics, _ = evaluate_on(engine.policy, engine.params, _load(args), horizon)
    _print_json_or_table(metrics, args.json)


def cmd_simulate(args: argparse.Namespace) -> None:
    from insertrec.engine import Engine
    from insertrec.simulation import simulate
    from insertrec.world import World

    engine, world = Engine.load(args.model), World.load(args.world)
    if args.rounds is not None:
        _closed_loop(engine, world, args)
        return
    metrics = simulate(engine, world, orders=args.orders, seed=args.seed)
    _print_json_or_table(metrics, args.json)


def _closed_loop(engine, world, args: argparse.Namespace) -> None:
    """`simulate --rounds K`: retrained as MODEL was (its settings), on a fresh history of the world."""
    from dataclasses import fields

    from insertrec.closedloop import closed_loop, retrained
    from insertrec.training import TrainConfig

    params = engine.manifest.get("params", {})
    config = TrainConfig(**{f.name: params[f.name] for f in fields(TrainConfig) if f.name in params} | {"cutoff": None})
    columns = ("round", "orders", "value_deployed", "value_oracle", "value_control", "uplift_capture",
               "regret", "cumulative_regret")

    def show(row: dict) -> None:
        if not args.json:
            print("  ".join(f"{row[c]:>{len(c)}.0f}" if c in ("round", "orders") else f"{row[c]:>{len(c)}.3f}"
                            for c in columns), flush=True)

    if not args.json:
        print("  ".join(columns))
    rows = closed_loop(world, args.rounds, retrained(config), customers=args.customers, seed=args.seed,
                       progress=show)
    if args.json:
        print(json.dumps({"rounds": rows}, indent=2))


def cmd_segments(args: argparse.Namespace) -> None:
    from insertrec import modeldir

    modeldir.verify(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(args.model) / "segments.csv", out / "segments.csv")
    facts = Path(args.model) / "report.json"
    if facts.exists():   # drawn again, in the currency asked for (models before report.json: copied)
        from insertrec.report import render_report

        page = render_report(json.loads(facts.read_text(encoding="utf-8")), currency=args.currency)
        (out / "report.html").write_text(page, encoding="utf-8")
    else:
        shutil.copyfile(Path(args.model) / "report.html", out / "report.html")
    print(f"wrote {out / 'segments.csv'} and {out / 'report.html'}")


def cmd_recommend(args: argparse.Namespace) -> None:
    from insertrec.data import load_orders_file
    from insertrec.decide import Decider
    from insertrec.engine import Engine

    decisions = Decider(Engine.load(args.model)).decide_batch(load_orders_file(args.orders))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        decisions.to_parquet(out, index=False)
    else:
        decisions.to_csv(out, index=False)
    print(f"wrote {len(decisions)} decisions ({decisions['order_id'].nunique()} orders) to {out}")


def cmd_serve(args: argparse.Namespace) -> None:
    from insertrec.serving.app import run

    run(model=args.model, host=args.host, port=args.port, workers=args.workers,
        insecure_dev=args.insecure_dev, config=args.config)


def cmd_promote(args: argparse.Namespace) -> None:
    from insertrec.registry import promote

    result = promote(args.model_name, args.version, data_dir=args.data, force=args.force)
    print(result.summary())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="insertrec", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("demo-data", help="write a simulated shop's data directory and its world.json")
    c.add_argument("--out", required=True)
    c.add_argument("--customers", type=int, default=5000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--world", help="world.json to simulate (default: the embedded default world)")
    c.set_defaults(fn=cmd_demo_data)

    c = sub.add_parser("train", help="learn segments, repurchase propensity and the policy; write a model")
    c.add_argument("--data", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--cutoff", help="learn only from history before this date (default: all of it)")
    c.add_argument("--horizon-days", type=int, default=60)
    c.add_argument("--epsilon", type=float, default=0.1, help="share of decisions that explore")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--experiment", default="insertrec", help="MLflow experiment name")
    c.add_argument("--register-as", default="insertrec", help="MLflow registered model name ('' to skip)")
    c.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    c.add_argument("--decisions", help="also learn from the service's decision log (SQLAlchemy URL)")
    c.add_argument("--skip-bad-rows", action="store_true",
                   help="set bad rows aside in rejected.csv instead of refusing the data")
    c.set_defaults(fn=cmd_train)

    c = sub.add_parser("evaluate", help="off-policy evaluation of a model on logged data")
    c.add_argument("--model", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--json", action="store_true")
    c.add_argument("--skip-bad-rows", action="store_true")
    c.set_defaults(fn=cmd_evaluate)

    c = sub.add_parser("simulate", help="true value of the model's policy in a simulated world")
    c.add_argument("--model", required=True)
    c.add_argument("--world", required=True)
    c.add_argument("--orders", type=int, default=5000)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--rounds", type=int, help="run the closed loop (deploy, log, retrain) for K monthly rounds, "
                   "retraining with MODEL's settings on a fresh history of the world")
    c.add_argument("--customers", type=int, default=5000, help="customers of the closed loop's history")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_simulate)

    c = sub.add_parser("segments", help="write segments.csv and report.html for marketers")
    c.add_argument("--model", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--currency", default=None,
                   help='what the report calls amounts, e.g. EUR (default: "currency units")')
    c.set_defaults(fn=cmd_segments)

    c = sub.add_parser("recommend", help="batch decisions for a file of orders")
    c.add_argument("--model", required=True)
    c.add_argument("--orders", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_recommend)

    c = sub.add_parser("serve", help="the HTTP API")
    c.add_argument("--model", required=True, help="model directory or models:/NAME@ALIAS")
    c.add_argument("--host", help="default 127.0.0.1 (or INSERTREC_HOST)")
    c.add_argument("--port", type=int, help="default 8000 (or INSERTREC_PORT)")
    c.add_argument("--workers", type=int, help="default 1 (or INSERTREC_WORKERS)")
    c.add_argument("--config", help="settings file (env vars take precedence)")
    c.add_argument("--insecure-dev", action="store_true", help="allow starting without API keys")
    c.set_defaults(fn=cmd_serve)

    c = sub.add_parser("promote", help="move the champion alias after comparing with the current champion")
    c.add_argument("--model-name", required=True)
    c.add_argument("--version", required=True)
    c.add_argument("--data", help="recent logged data to compare on (default: the challenger's own holdout)")
    c.add_argument("--force", action="store_true")
    c.set_defaults(fn=cmd_promote)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        args.fn(args)
    except DataError as err:
        print(f"insertrec: {err}", file=sys.stderr)
        if len(err.problems) > 1:
            print(err.details(), file=sys.stderr)
        return 2
    except InsertrecError as err:
        print(f"insertrec: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
