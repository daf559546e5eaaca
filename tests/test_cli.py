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


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A small simulated shop and a model trained on it through the CLI."""
    root = tmp_path_factory.mktemp("shop")
    data, model = root / "data", root / "model"
    assert main(["demo-data", "--out", str(data), "--customers", "3000", "--seed", "5"]) == 0
    assert main(["train", "--data", str(data), "--out", str(model), "--no-mlflow"]) == 0
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
    sim = json.loads(capsys.readouterr().out)
    assert set(sim) >= SPEC_SIMULATE_KEYS
    assert sim["value_oracle"] >= sim["value_model"]
    assert main(["evaluate", "--model", str(model), "--data", str(data), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= SPEC_EVALUATE_KEYS


@pytest.mark.slow
def test_simulate_rounds_reports_each_months_true_value_and_refuses_no_rounds(shop, capsys):
    _, data, model = shop
    args = ["simulate", "--model", str(model), "--world", str(data / "world.json"), "--customers", "1500"]
    assert main([*args, "--rounds", "1", "--json"]) == 0
    rounds = json.loads(capsys.readouterr().out)["rounds"]
    assert len(rounds) == 1
    assert rounds[0]["value_oracle"] >= rounds[0]["value_deployed"] and rounds[0]["cumulative_regret"] >= 0
    assert main([*args, "--rounds", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("insertrec: --rounds") and "\n" not in err


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
