"""The `insertrec` command line (see ``DESCRIPTION``): the only place that prints and exits.

Each subcommand imports what it needs when it runs, so `insertrec --help`,
`recommend` or `serve` never pay for MLflow's import. Every error caused by
input is an `InsertrecError`: one line on stderr (plus the full problem list
for bad data) and exit status 2; nothing a user did wrong shows a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from insertrec.errors import CatalogError, DataError, InsertrecError

if TYPE_CHECKING:   # imported when a subcommand runs (see above)
    from insertrec.data import Dataset
    from insertrec.engine import Engine
    from insertrec.world import World

__all__ = ["build_parser", "main"]


def _print_json_or_table(metrics: dict[str, Any], as_json: bool) -> None:
    if as_json:   # strict JSON: a withheld (NaN) figure is null
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                          for k, v in metrics.items()}, indent=2, sort_keys=True, default=float))
        return
    width = max(len(k) for k in metrics) if metrics else 0
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


def _load(args: argparse.Namespace) -> Dataset:
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

    config = TrainConfig(cutoff=args.cutoff, horizon_days=args.horizon_days, epsilon=args.epsilon,
                         seed=args.seed, pessimism=args.pessimism)
    progress = Progress()
    if args.engine == "spark":   # the same model directory, its heavy steps computed on Spark
        for given, flag in ((args.decisions, "--decisions"), (args.skip_bad_rows, "--skip-bad-rows")):
            if given:
                raise InsertrecError(f"{flag} is not supported with --engine spark (train locally to use it)")
        from insertrec.spark.session import parse_conf
        from insertrec.spark.training import train_on_spark

        result = train_on_spark(args.data, args.out, config, master=args.spark_master,
                                conf=parse_conf(args.spark_conf), progress=progress)
    else:
        data = _load(args)
        if args.decisions:
            from insertrec.logged import merge_logged

            data = merge_logged(data, args.decisions)
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
        print(f"MLflow run {run.run_id}" + (f", registered as version {run.version}" if run.version else "")
              + ("" if run.model_uri else " (no model logged: nothing to decide with without a catalog)"))
    _print_json_or_table(result.metrics, False)
    print(f"model written to {result.model_dir}")


def cmd_init_catalog(args: argparse.Namespace) -> None:
    from importlib.resources import files

    out = Path(args.out)
    if out.exists() and not args.force:
        raise InsertrecError(f"{out} already exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(files("insertrec").joinpath("starter_catalog.yaml").read_text(encoding="utf-8"),
                   encoding="utf-8")
    print(f"wrote a starter catalog to {out}: edit the actions, costs and rules, then train again")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from insertrec.engine import Engine
    from insertrec.evaluation import evaluate_on, training_cutoff
    from insertrec.tracking import Progress

    progress = Progress()
    progress("loading the model and the data")
    engine = Engine.load(args.model)
    horizon = int(engine.manifest.get("params", {}).get("horizon_days", 60))
    cutoff = training_cutoff(engine.manifest, args.model)
    data = _load(args)
    progress("features and off-policy evaluation")
    metrics, report, unseen = evaluate_on(engine.policy, engine.params, data, horizon, cutoff)
    print(f"[insertrec] {unseen.describe()}", file=sys.stderr)
    for withheld in (report["value"], report["lifts"]):
        if withheld["withheld"]:
            print(f"[insertrec] {withheld['why']}", file=sys.stderr)
    _print_json_or_table(metrics | {"orders_evaluated": len(unseen.logged), "evaluated_from": cutoff.isoformat(),
                                    "orders_left_out_inside_training": unseen.inside}, args.json)


def cmd_simulate(args: argparse.Namespace) -> None:
    from insertrec.engine import Engine
    from insertrec.simulation import simulate
    from insertrec.tracking import Progress
    from insertrec.world import World

    progress = Progress()
    progress("loading the model and the world")
    engine, world = Engine.load(args.model), World.load(args.world)
    if args.rounds is not None:
        _closed_loop(engine, world, args)
        return
    metrics = simulate(engine, world, orders=args.orders, seed=args.seed, progress=progress)
    _print_json_or_table(metrics, args.json)


def _closed_loop(engine: Engine, world: World, args: argparse.Namespace) -> None:
    """`simulate --rounds K`: retrained as MODEL was (its settings), on a fresh history of the world."""
    from dataclasses import fields

    from insertrec.closedloop import closed_loop, retrained
    from insertrec.training import TrainConfig

    params = engine.manifest.get("params", {})
    config = TrainConfig(**{f.name: params[f.name] for f in fields(TrainConfig) if f.name in params} | {"cutoff": None})
    columns = ("round", "orders", "value_deployed", "value_oracle", "value_control", "uplift_capture",
               "regret", "cumulative_regret")

    def show(row: dict[str, float]) -> None:
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

    if args.engine == "spark":   # the same decisions, computed on Spark: a directory of part files
        from insertrec.spark.decisions import recommend
        from insertrec.spark.session import parse_conf

        rows, orders = recommend(args.model, args.orders, args.out, args.spark_master, parse_conf(args.spark_conf))
        print(f"wrote {rows} decisions ({orders} orders) to {args.out}/ (part files)")
        return
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


DESCRIPTION = """\
insertrec decides, for every order, which packaging, insert and coupon go into
the parcel so that the customer comes back, learned off-policy from the shop's
own logged history. It also segments the customers and scores their repurchase
propensity for the marketers' report."""

EPILOG = """\
a first run on a simulated shop:
  insertrec demo-data --out demo
  insertrec train --data demo --out models/demo
  insertrec segments --model models/demo --out demo/report
  insertrec simulate --model models/demo --world demo/world.json

Every command exits with status 2 and a one-line reason on bad input.
'insertrec COMMAND --help' shows a command's options and their defaults."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default shown after its help, unless the help already says it or there is
    none to show (a required option, an off-by-default flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action) or text


class _TopHelpFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level help: the description and the examples kept as written."""


def _auto_or_number(text: str) -> float | str:
    """``--pessimism``, ``--epsilon``: 'auto' or a number (TrainConfig checks its range and names the flag)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("insertrec")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="insertrec", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_TopHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)

    c = command("demo-data", "write a simulated shop's data directory and its world.json")
    c.add_argument("--out", required=True, help="data directory to write")
    c.add_argument("--customers", type=int, default=5000, help="customers in the simulated shop")
    c.add_argument("--seed", type=int, default=0, help="random seed of the simulated history")
    c.add_argument("--world", help="world.json to simulate (default: the embedded default world)")
    c.set_defaults(fn=cmd_demo_data)

    c = command("train", "learn segments, repurchase propensity and (given catalog.yaml) the policy; "
                         "write a model directory and log the run to MLflow")
    c.add_argument("--data", required=True, help="data directory (orders.csv or .parquet; the other tables "
                                                 "and catalog.yaml optional)")
    c.add_argument("--out", required=True, help="model directory to write")
    c.add_argument("--cutoff", help="learn only from history before this ISO 8601 date or time, keeping the "
                                    "rest to evaluate on (default: all of it)")
    c.add_argument("--horizon-days", type=int, default=60, help="days after an order in which the customer's "
                                                                "next order counts as its reward")
    c.add_argument("--epsilon", type=_auto_or_number, default="auto", metavar="SHARE|auto",
                   help="'auto' (the default): each slot explores the share the run's evidence recommends "
                        "(from 2%% to 50%% of its decisions; see the report's 'How much to explore'); SHARE: "
                        "that share of decisions, from 0 to 1, in every slot")
    c.add_argument("--seed", type=int, default=0, help="random seed of the learners")
    c.add_argument("--pessimism", type=_auto_or_number, default="auto", metavar="Z|auto",
                   help="'auto' (the default): spend on the playbook's action only where its estimated gain "
                        "exceeds 1 standard error of it in the slots where the history does not show the "
                        "playbook paying, the estimates deciding elsewhere; Z: in every slot, only where "
                        "an action's estimated gain exceeds Z standard errors (0: the estimates decide; see "
                        "the README)")
    c.add_argument("--experiment", default="insertrec", help="MLflow experiment name")
    c.add_argument("--register-as", default="insertrec", help="MLflow registered model name ('' to skip)")
    c.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    c.add_argument("--decisions", help="also learn from the service's decision log (SQLAlchemy URL)")
    c.add_argument("--skip-bad-rows", action="store_true",
                   help="set bad rows aside in rejected.csv instead of refusing the data")
    _engine_arguments(c)
    c.set_defaults(fn=cmd_train)

    c = command("init-catalog", "write a commented starter catalog.yaml to edit")
    c.add_argument("--out", required=True, help="file to write (usually DATA/catalog.yaml)")
    c.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    c.set_defaults(fn=cmd_init_catalog)

    c = command("evaluate", "off-policy evaluation of a model on the logged orders after its training cutoff")
    c.add_argument("--model", required=True, help="model directory")
    c.add_argument("--data", required=True, help="data directory with logged exposures")
    c.add_argument("--json", action="store_true", help="print the metrics as JSON")
    c.add_argument("--skip-bad-rows", action="store_true",
                   help="set bad rows aside in rejected.csv instead of refusing the data")
    c.set_defaults(fn=cmd_evaluate)

    c = command("simulate", "true value of the model's policy in a simulated world")
    c.add_argument("--model", required=True, help="model directory")
    c.add_argument("--world", required=True, help="world.json (demo-data writes one beside the data)")
    c.add_argument("--orders", type=int, default=5000, help="fresh orders to simulate")
    c.add_argument("--seed", type=int, default=1, help="random seed of the fresh orders (of the closed loop's history)")
    c.add_argument("--rounds", type=int, help="run the closed loop (deploy, log, retrain) for K monthly rounds, "
                   "retraining with MODEL's settings on a fresh history of the world")
    c.add_argument("--customers", type=int, default=5000, help="customers of the closed loop's history")
    c.add_argument("--json", action="store_true", help="print the values as JSON")
    c.set_defaults(fn=cmd_simulate)

    c = command("segments", "write segments.csv and report.html for marketers")
    c.add_argument("--model", required=True, help="model directory")
    c.add_argument("--out", required=True, help="directory to write the two files to")
    c.add_argument("--currency", default=None,
                   help='what the report calls amounts, e.g. EUR (default: "currency units")')
    c.set_defaults(fn=cmd_segments)

    c = command("recommend", "batch decisions for a file of orders")
    c.add_argument("--model", required=True, help="model directory")
    c.add_argument("--orders", required=True, help="orders .csv or .parquet, placed after the model's cutoff")
    c.add_argument("--out", required=True, help="decisions file to write (.csv, or .parquet)")
    _engine_arguments(c)
    c.set_defaults(fn=cmd_recommend)

    c = command("serve", "the HTTP API")
    c.add_argument("--model", required=True, help="model directory or models:/NAME@ALIAS")
    c.add_argument("--host", help="default 127.0.0.1 (or INSERTREC_HOST)")
    c.add_argument("--port", type=int, help="default 8000 (or INSERTREC_PORT)")
    c.add_argument("--workers", type=int, help="default 1 (or INSERTREC_WORKERS)")
    c.add_argument("--config", help="settings file (env vars take precedence)")
    c.add_argument("--insecure-dev", action="store_true", help="allow starting without API keys")
    c.set_defaults(fn=cmd_serve)

    c = command("promote", "move the champion alias to a version shown better than the current champion")
    c.add_argument("--model-name", required=True, help="MLflow registered model name")
    c.add_argument("--version", required=True, help="the challenger's version number")
    c.add_argument("--data", help="recent logged data to compare on; only orders after both versions' "
                                  "training cutoffs count (default: the challenger's training data)")
    c.add_argument("--force", action="store_true", help="move the alias whatever the comparison says")
    c.set_defaults(fn=cmd_promote)
    return p


def _engine_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--engine", choices=("local", "spark"), default="local",
                   help="where to compute: this process, or Apache Spark (pip install insertrec[spark])")
    c.add_argument("--spark-master", default="local[*]", help="with --engine spark: the Spark master URL")
    c.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="with --engine spark: a Spark setting (repeatable)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        args.fn(args)
    except (DataError, CatalogError) as err:
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
