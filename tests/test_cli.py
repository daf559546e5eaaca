"""The commands a user runs, end to end, and how they fail on bad input."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from insertrec.cli import main

SPEC_SIMULATE_KEYS = {"value_model", "value_oracle", "value_rules", "value_logging", "value_random",
                      "oracle_ratio"}
SPEC_EVALUATE_KEYS = {"policy_value_dr", "policy_value_ips", "policy_value_snips", "logging_policy_value",
                      "rules_policy_value", "lift_vs_logging", "lift_vs_rules", "ess"}


SHOP_CUTOFF = "2024-09-01"


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A small simulated shop and a model trained through the CLI on its history before SHOP_CUTOFF
    (the demo's two years end in late 2024), so that what follows is data the model has not seen."""
    root = tmp_path_factory.mktemp("shop")
    data, model = root / "data", root / "model"
    assert main(["demo-data", "--out", str(data), "--customers", "3000", "--seed", "5"]) == 0
    assert main(["train", "--data", str(data), "--out", str(model), "--no-mlflow", "--cutoff", SHOP_CUTOFF]) == 0
    return root, data, model


def test_demo_data_writes_the_tables_and_the_world(shop):
    _, data, _ = shop
    for name in ("orders.csv", "nps.csv", "exposures.csv", "incidents.csv", "catalog.yaml", "world.json"):
        assert (data / name).is_file(), name
    world = json.loads((data / "world.json").read_text())
    assert "effects" in world and "customer_types" in world


def test_train_writes_a_self_describing_model(shop):
    _, _, model = shop
    manifest = json.loads((model / "manifest.json").read_text())
    for key in ("version", "catalog_sha256", "data_fingerprint", "feature_list", "metrics", "libraries"):
        assert key in manifest, key
    assert {"repeat_auc", "segments_k", "silhouette"} <= set(manifest["metrics"])
    assert set(manifest["artifacts"]) >= {"engine.joblib", "catalog.yaml", "segments.csv", "report.html"}


def test_segments_command_writes_spec_columns_and_report(shop, capsys):
    root, _, model = shop
    out = root / "seg"
    assert main(["segments", "--model", str(model), "--out", str(out)]) == 0
    seg = pd.read_csv(out / "segments.csv")
    assert list(seg.columns) == ["customer_id", "segment_id", "segment_name", "nps_tier", "journey_stage",
                                 "p_repeat", "expected_orders"]
    assert seg["p_repeat"].between(0, 1).all()
    html = (out / "report.html").read_text()
    assert "<svg" in html and "http://" not in html and "https://" not in html


def test_simulate_and_evaluate_report_spec_metric_names(shop, capsys):
    _, data, model = shop
    assert main(["simulate", "--model", str(model), "--world", str(data / "world.json"),
                 "--orders", "1000", "--json"]) == 0
    captured = capsys.readouterr()
    sim = json.loads(captured.out)
    assert "simulating 1000 fresh orders" in captured.err       # progress on stderr, stdout stays JSON
    assert set(sim) >= SPEC_SIMULATE_KEYS
    assert sim["value_oracle"] >= sim["value_model"]
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--json"]) == 0
    out = capsys.readouterr()
    metrics = json.loads(out.out)
    assert set(metrics) >= SPEC_EVALUATE_KEYS
    for lift in ("lift_vs_rules", "lift_vs_logging"):   # the interval, printed or not, and the lift inside it
        low, high = metrics[f"{lift}_low"], metrics[f"{lift}_high"]
        assert low < high
        assert (low <= metrics[lift] <= high) if metrics[lift] is not None else f"{lift} withheld" in out.err
    # judged only on the orders after the training cutoff, and it says so
    orders = pd.read_csv(data / "orders.csv", parse_dates=["order_ts"])
    after = orders["order_ts"] >= pd.Timestamp(SHOP_CUTOFF, tz="UTC")
    assert metrics["evaluated_from"] == pd.Timestamp(SHOP_CUTOFF, tz="UTC").isoformat()
    assert 0 < metrics["orders_evaluated"] <= after.sum()
    assert metrics["orders_left_out_inside_training"] == (~after).sum()
    assert f"at or after the training cutoff {metrics['evaluated_from']}" in out.err
    assert f"warning: {(~after).sum()} orders of the data fall inside the training period" in out.err


def test_evaluate_refuses_data_the_model_learned_from(shop, tmp_path, capsys):
    _, data, model = shop
    seen = tmp_path / "seen"
    seen.mkdir()
    orders = pd.read_csv(data / "orders.csv")
    orders = orders[pd.to_datetime(orders["order_ts"]) < pd.Timestamp(SHOP_CUTOFF, tz="UTC")]
    orders.to_csv(seen / "orders.csv", index=False)
    exposures = pd.read_csv(data / "exposures.csv")
    exposures[exposures["order_id"].isin(orders["order_id"])].to_csv(seen / "exposures.csv", index=False)
    (seen / "catalog.yaml").write_text((data / "catalog.yaml").read_text())
    assert main(["evaluate", "--model", str(model), "--data", str(seen)]) == 2
    err = capsys.readouterr().err
    [reason] = [line for line in err.splitlines() if not line.startswith("[insertrec")]       # not progress
    assert reason.startswith("insertrec: ") and "Traceback" not in err
    assert "no order at or after the model's training cutoff" in reason and "--cutoff" in reason
    assert main(["evaluate", "--model", str(model), "--data", str(tmp_path / "missing")]) == 2
    assert "data directory not found" in capsys.readouterr().err


@pytest.mark.slow
def test_simulate_rounds_reports_each_months_true_value_and_refuses_no_rounds(shop, capsys):
    _, data, model = shop
    args = ["simulate", "--model", str(model), "--world", str(data / "world.json"), "--customers", "1500"]
    assert main([*args, "--rounds", "1", "--json"]) == 0
    rounds = json.loads(capsys.readouterr().out)["rounds"]
    assert len(rounds) == 1
    assert rounds[0]["value_oracle"] >= rounds[0]["value_deployed"] and rounds[0]["cumulative_regret"] >= 0
    assert main([*args, "--rounds", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "insertrec: --rounds: expected at least 1 (got 0)"


def test_recommend_gives_one_row_per_order_and_slot(shop):
    root, data, model = shop
    orders = pd.read_csv(data / "orders.csv").tail(200)     # the same customers, ordering again later
    orders["order_id"] = "new-" + orders["order_id"]
    orders["order_ts"] = (pd.to_datetime(orders["order_ts"]) + pd.Timedelta(days=30)).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    orders.to_csv(root / "new_orders.csv", index=False)
    out = root / "decisions.csv"
    assert main(["recommend", "--model", str(model), "--orders", str(root / "new_orders.csv"),
                 "--out", str(out)]) == 0
    dec = pd.read_csv(out)
    assert list(dec.columns[:4]) == ["order_id", "slot", "action_id", "propensity"]
    assert len(dec) == 200 * 3 and dec["propensity"].between(0, 1, inclusive="right").all()
    again = root / "again.csv"
    main(["recommend", "--model", str(model), "--orders", str(root / "new_orders.csv"), "--out", str(again)])
    pd.testing.assert_frame_equal(dec, pd.read_csv(again))   # same orders, same model: same decisions


def test_a_tampered_model_is_refused_before_it_is_loaded(shop, tmp_path, capsys):
    import shutil

    _, _, model = shop
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    with open(copy / "engine.joblib", "ab") as f:
        f.write(b"\0")
    assert main(["segments", "--model", str(copy), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "engine.joblib" in err and "SHA-256" in err and "Traceback" not in err


def test_bad_input_exits_2_with_a_one_line_reason_and_no_traceback(tmp_path):
    (tmp_path / "orders.csv").write_text("order_id,customer_id,order_ts,order_value\n"
                                         "o1,c1,2024-01-01,12.5\no2,c1,not-a-date,-3\n")
    proc = subprocess.run([sys.executable, "-m", "insertrec.cli", "train", "--data", str(tmp_path),
                           "--out", str(tmp_path / "m"), "--no-mlflow"], capture_output=True, text=True)
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.startswith("insertrec: invalid data:") and "line 3" in first
    assert "order_ts" in proc.stderr and "order_value" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_train_refuses_a_pessimism_that_is_not_a_finite_number_not_below_zero(shop, tmp_path, capsys, value):
    _, data, _ = shop
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--no-mlflow",
                 "--pessimism", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--pessimism" in err and "finite number >= 0" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_an_orders_only_history_trains_segments_and_logs_to_mlflow(shop, tmp_path, monkeypatch, capsys):
    """SPEC: only orders is required. Without a catalog there is no policy, but segments,
    repurchase propensity, the report and the MLflow run are there, and every command that
    decides says in one line why it cannot."""
    _, data, _ = shop
    orders_only, model = tmp_path / "orders-only", tmp_path / "model"
    orders_only.mkdir()
    (orders_only / "orders.csv").write_text((data / "orders.csv").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(["train", "--data", str(orders_only), "--out", str(model)]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "no catalog.yaml" in notes[0]
    assert f"insertrec init-catalog --out {orders_only / 'catalog.yaml'}" in notes[0]
    assert "repeat_auc" in captured.out and "MLflow run" in captured.out

    from insertrec.tracking import client

    c = client()
    runs = c.search_runs([c.get_experiment_by_name("insertrec").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["repeat_auc"] > 0.5
    assert {"segments.csv", "report.html", "manifest.json"} <= {a.path for a in c.list_artifacts(runs[0].info.run_id)}
    assert c.search_registered_models() == []       # nothing that decides, nothing to register

    assert main(["segments", "--model", str(model), "--out", str(tmp_path / "seg")]) == 0
    seg = pd.read_csv(tmp_path / "seg" / "segments.csv")
    assert seg["customer_id"].nunique() > 1000 and seg["p_repeat"].between(0, 1).all()
    assert "<svg" in (tmp_path / "seg" / "report.html").read_text()
    capsys.readouterr()

    refusals = [["evaluate", "--model", str(model), "--data", str(data)],
                ["recommend", "--model", str(model), "--orders", str(data / "orders.csv"), "--out", "d.csv"],
                ["serve", "--model", str(model), "--insecure-dev", "--port", "1"]]
    for argv in refusals:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        [reason] = [line for line in err.splitlines() if not line.startswith("[insertrec")]   # not progress
        assert reason.startswith("insertrec: ") and "trained without catalog.yaml" in reason, argv
        assert "init-catalog" in err and "Traceback" not in err


def test_a_catalog_without_exposures_serves_the_playbook_with_exploration(shop, tmp_path, capsys):
    _, data, _ = shop
    history, model = tmp_path / "history", tmp_path / "model"
    history.mkdir()
    for name in ("orders.csv", "catalog.yaml"):
        (history / name).write_text((data / name).read_text())
    orders = pd.read_csv(data / "orders.csv")
    cutoff = pd.to_datetime(orders["order_ts"]).quantile(0.8)
    assert main(["train", "--data", str(history), "--out", str(model), "--no-mlflow",
                 "--cutoff", cutoff.isoformat()]) == 0
    assert "cold start: 0 logged orders" in capsys.readouterr().err
    later = orders[pd.to_datetime(orders["order_ts"]) >= cutoff]
    later.to_csv(tmp_path / "later.csv", index=False)
    assert main(["recommend", "--model", str(model), "--orders", str(tmp_path / "later.csv"),
                 "--out", str(tmp_path / "d.csv")]) == 0
    dec = pd.read_csv(tmp_path / "d.csv")
    assert len(dec) == 3 * len(later)
    assert set(dec["policy"]) == {"rules", "explore"}
    explored = dec.groupby("order_id")["policy"].first().eq("explore").mean()
    assert 0.1 < explored < 0.5                     # a cold start's share, 0.1 per slot, three slots
    assert dec.groupby("slot")["action_id"].nunique().min() > 1


def test_recommend_names_the_order_and_shows_its_timestamp_when_it_is_too_early(shop, capsys):
    root, data, model = shop
    assert main(["recommend", "--model", str(model), "--orders", str(data / "orders.csv"),
                 "--out", str(root / "early.csv")]) == 2
    lines = capsys.readouterr().err.splitlines()
    orders = pd.read_csv(data / "orders.csv")
    ts, order_id = orders["order_ts"].iloc[0], orders["order_id"].iloc[0]
    assert f"order {order_id!r}" in lines[0] and str(pd.Timestamp(ts))[:10] in lines[0].split("(got")[1]
    early = (pd.to_datetime(orders["order_ts"]) < pd.Timestamp(SHOP_CUTOFF, tz="UTC")).sum()
    assert lines[-1].endswith(f"{early - 20} more orders are before the snapshot's end (not listed)")


def test_init_catalog_writes_a_starter_that_loads_and_never_overwrites(tmp_path, capsys):
    from insertrec.catalog import Catalog

    out = tmp_path / "shop" / "catalog.yaml"
    assert main(["init-catalog", "--out", str(out)]) == 0
    catalog = Catalog.load(out)
    assert list(catalog.slots) == ["packaging", "insert", "coupon"]
    assert all(len(slot.actions) >= 3 for slot in catalog.slots.values())
    assert any(a.when.clauses for slot in catalog.slots.values() for a in slot.actions)
    assert len(catalog.rules) >= 3 and out.read_text().startswith("#")
    out.write_text("# mine\n")
    assert main(["init-catalog", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "# mine\n"
    assert main(["init-catalog", "--out", str(out), "--force"]) == 0
    assert Catalog.load(out).sha256 == catalog.sha256


def test_help_says_what_the_tool_does_and_every_option_has_help_and_its_default(capsys):
    import argparse

    from insertrec.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    assert "which packaging, insert and coupon go into" in top and "insertrec demo-data --out demo" in top
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"train", "evaluate", "promote", "init-catalog", "serve"} <= set(commands)
    for name, sub in commands.items():
        shown = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings}: no help"
            if action.default is not None and action.default is not False and "default" not in action.help:
                assert f"(default: {action.default})" in shown, f"{name} {action.option_strings}"
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"insertrec {version('insertrec')}"
