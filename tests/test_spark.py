"""The Spark engine: its tables equal the local loader's; the local path never imports PySpark.

Skipped when PySpark or Java is missing on a developer's machine, but failing under CI=true.
One SparkSession (local[2]) serves the whole test session.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from insertrec.data import load_data
from insertrec.errors import DataError
from insertrec.features import FeatureParams, order_features, order_rewards
from insertrec.valuemodel import ActionSpace, ValueModel
from insertrec.world import World

_CI = os.environ.get("CI", "").lower() == "true"


def _spark_or_skip():
    try:
        import pyspark  # noqa: F401
    except ImportError:
        if _CI:
            raise
        pytest.skip("pyspark not installed (pip install -e '.[spark]')")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        if _CI:
            pytest.fail("Java is missing: .ci/system-packages installs openjdk-17-jre-headless")
        pytest.skip("Java not installed")


@pytest.fixture(scope="session")
def spark():
    _spark_or_skip()
    from insertrec.spark.session import spark_session

    session = spark_session("local[2]", {"spark.sql.shuffle.partitions": "2"})
    yield session
    session.stop()


@pytest.fixture(scope="session")
def shop(tmp_path_factory):
    out = tmp_path_factory.mktemp("shop")
    World.default().write_demo_data(out, customers=200, seed=0)
    return out


def test_the_local_commands_never_import_pyspark() -> None:
    code = ("import sys; from insertrec import cli, engine, training\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'pyspark' not in sys.modules, 'pyspark imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_spark_tables_equal_the_local_loader(spark, shop) -> None:
    from insertrec.spark.tables import read_tables, to_dataset

    tables = read_tables(spark, shop)
    names = ("orders", "nps", "exposures", "incidents")
    spark_data = to_dataset({n: tables.table(n).toPandas() for n in names if tables.table(n) is not None},
                            tables.catalog, tables.ctx_numeric)
    local = load_data(shop)
    for name in names:
        a, b = getattr(local, name), getattr(spark_data, name)
        keys = list(a.columns[:3])
        a = a.sort_values(keys).reset_index(drop=True)
        b = b.sort_values(keys).reset_index(drop=True)[a.columns]
        pd.testing.assert_frame_equal(a, b, check_dtype=False, obj=name)


def test_csv_read_in_splits_or_as_one_stream_equals_the_local_loader(spark, shop, tmp_path) -> None:
    """A CSV without a double quote is read line by line in splits (here of 16 KB, so every
    table in several), one with a quoted cell spanning lines as one stream: both give the local
    loader's tables, rows in file order."""
    from insertrec.spark.tables import read_tables, to_dataset
    from insertrec.spark.training import _collected

    quoted = tmp_path / "quoted"
    shutil.copytree(shop, quoted)
    orders = pd.read_csv(quoted / "orders.csv", dtype=str, keep_default_na=False)
    orders.loc[3, "ctx_device"] = "mobile\nphone"
    orders.to_csv(quoted / "orders.csv", index=False)
    spark.conf.set("spark.sql.files.maxPartitionBytes", "16384")
    try:
        for directory in (shop, quoted):
            tables = read_tables(spark, directory)
            names = ("orders", "nps", "exposures", "incidents")
            on_spark = to_dataset({n: _collected(tables.table(n)) for n in names}, tables.catalog, tables.ctx_numeric)
            local = load_data(directory)
            for name in names:
                pd.testing.assert_frame_equal(getattr(on_spark, name), getattr(local, name), check_dtype=False,
                                              obj=f"{directory.name} {name}")
        assert "mobile\nphone" in set(on_spark.orders["ctx_device"])
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")


def test_parquet_part_files_and_bad_cells(spark, shop, tmp_path) -> None:
    from insertrec.spark.tables import read_tables

    local = load_data(shop)
    parts = tmp_path / "orders"
    parts.mkdir()
    half = len(local.orders) // 2
    local.orders.iloc[:half].to_parquet(parts / "part-0.parquet", index=False, coerce_timestamps="us")
    bad = local.orders.iloc[half:].copy()
    bad.loc[bad.index[0], "order_value"] = -1.0
    bad.to_parquet(parts / "part-1.parquet", index=False, coerce_timestamps="us")
    with pytest.raises(DataError) as err:
        read_tables(spark, tmp_path)
    assert [(p.file, p.column, p.reason) for p in err.value.problems] == [("part-1.parquet", "order_value", "negative")]
    good = tmp_path / "good"
    (good / "orders").mkdir(parents=True)
    local.orders.to_parquet(good / "orders" / "part-0.parquet", index=False, coerce_timestamps="us")
    assert read_tables(spark, good).orders.count() == len(local.orders)


def test_spark_features_and_rewards_equal_the_local_ones(spark, shop, tmp_path) -> None:
    from insertrec.spark.features import feature_params, features_and_rewards, to_pandas
    from insertrec.spark.tables import read_tables

    # half the orders without a logged reward: theirs is the revenue over the horizon, censored
    # by the last order of the whole shop (not of a bucket)
    mixed = tmp_path / "mixed"
    shutil.copytree(shop, mixed)
    exposures = pd.read_csv(mixed / "exposures.csv", dtype=str, keep_default_na=False)
    exposures.loc[exposures["order_id"].str[-1].isin(list("02468")), "reward"] = ""
    exposures.to_csv(mixed / "exposures.csv", index=False)
    local = load_data(mixed)
    tables = read_tables(spark, mixed)
    params = feature_params(tables, nps_ttl_days=200)
    assert params == FeatureParams.fit(local, nps_ttl_days=200)
    costs = {a.id: a.cost for slot in local.catalog.slots.values() for a in slot.actions}
    feats, rewards = to_pandas(features_and_rewards(tables, params, horizon_days=30, costs=costs,
                                                    orders_per_bucket=150))
    pd.testing.assert_frame_equal(feats, order_features(local, params), check_dtype=False)
    expected = order_rewards(local, horizon_days=30, costs=costs)
    assert 0 < expected["reward_complete"].mean() < 1
    pd.testing.assert_frame_equal(rewards, expected, check_dtype=False)


def test_spark_snapshot_and_fingerprint_equal_the_local_ones(spark, shop) -> None:
    """The model's snapshot built per customer bucket and joined on the driver, and the data
    fingerprint (the model version) hashed partition by partition: the local ones."""
    from insertrec.features import Snapshot, customer_frame, features_for_orders
    from insertrec.spark.features import snapshot
    from insertrec.spark.tables import fingerprint, read_tables

    local = load_data(shop)
    tables = read_tables(spark, shop)
    assert fingerprint(tables) == local.fingerprint()
    params = FeatureParams.fit(local)
    as_of = local.orders["order_ts"].max() + pd.Timedelta(days=3)
    whole = Snapshot.build(local, params, as_of=as_of)
    joined = snapshot(tables, params, as_of, orders_per_bucket=100)
    assert len(whole.customer_ids) > 100 and list(joined.customer_ids) == list(whole.customer_ids)
    pd.testing.assert_frame_equal(customer_frame(joined, as_of), customer_frame(whole, as_of))
    new = local.orders.tail(80).assign(order_ts=as_of, order_id=lambda f: "new-" + f["order_id"])
    pd.testing.assert_frame_equal(features_for_orders(joined, new), features_for_orders(whole, new))


@pytest.mark.parametrize("make", [lambda: ValueModel(random_state=3),
                                  lambda: ValueModel(boosted_baseline=False, max_weight=5.0)])
def test_value_model_from_spark_statistics_equals_the_local_fit(spark, make) -> None:
    from insertrec.spark.statistics import fit_value_model

    rng = np.random.default_rng(7)
    n, space = 2_000, ActionSpace((3, 2, 4), (0, 1, 0))
    phi = np.column_stack([np.ones(n), rng.normal(size=(n, 4))])
    actions = np.column_stack([rng.integers(0, s, n) for s in space.sizes])
    rules = np.column_stack([rng.integers(0, s, n) for s in space.sizes])
    rewards = phi @ rng.normal(size=5) + 2.0 * (actions[:, 0] == 1) * phi[:, 1] + rng.normal(size=n)
    pscore = rng.uniform(0.05, 1.0, n)
    local = make().fit(phi, actions, rewards, space, rules, pscore)
    rows = spark.createDataFrame(pd.DataFrame({
        "_row": np.arange(n), "phi": list(phi), "actions": list(actions), "rules": list(rules),
        "reward": rewards, "pscore": pscore})).repartition(3)
    distributed = fit_value_model(make(), rows, space)
    assert distributed.alpha_ == local.alpha_
    np.testing.assert_allclose(distributed.theta_, local.theta_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(distributed.baseline(phi[:50]), local.baseline(phi[:50]), rtol=0, atol=1e-8)


@pytest.fixture(scope="module")
def model(shop, tmp_path_factory):
    from insertrec.training import TrainConfig, train

    out = tmp_path_factory.mktemp("model") / "model"
    train(load_data(shop), out, TrainConfig(min_logged_orders=100))
    return out


def test_recommend_on_spark_equals_recommend_row_for_row(spark, shop, model, tmp_path) -> None:
    from insertrec.cli import main

    orders = pd.read_csv(shop / "orders.csv", dtype=str).tail(120)   # customers seen, some twice
    orders["order_id"] = "new-" + orders["order_id"]
    ts = pd.to_datetime(orders["order_ts"], utc=True)
    orders["order_ts"] = (ts + (ts.max() - ts.min()) + pd.Timedelta(days=1)).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    orders.loc[orders.index[:5], "customer_id"] = "never-seen"
    assert orders["customer_id"].duplicated().any()
    orders.to_csv(tmp_path / "new.csv", index=False)
    assert main(["recommend", "--model", str(model), "--orders", str(tmp_path / "new.csv"),
                 "--out", str(tmp_path / "local.csv")]) == 0
    assert main(["recommend", "--model", str(model), "--orders", str(tmp_path / "new.csv"), "--out",
                 str(tmp_path / "spark.parquet"), "--engine", "spark", "--spark-master", "local[2]",
                 "--spark-conf", "spark.sql.shuffle.partitions=2"]) == 0
    local = pd.read_csv(tmp_path / "local.csv", dtype={"order_id": str})
    parts = sorted((tmp_path / "spark.parquet").glob("part-*.parquet"))
    on_spark = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    assert len(local) == 120 * 3 and set(local["policy"]) >= {"model"}
    pd.testing.assert_frame_equal(on_spark, local, check_dtype=False)


def test_spark_udf_of_the_registered_model_decides_like_the_engine(spark, shop, model, tmp_path, monkeypatch) -> None:
    from insertrec.engine import Engine
    from insertrec.tracking import load_mlflow, log_training_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)    # the default store: ./mlflow.db
    version = log_training_run(model, {}, {}).version
    mlflow = load_mlflow()
    engine = Engine.load(model)
    orders = pd.read_csv(shop / "orders.csv", dtype=str).drop_duplicates("customer_id").head(40)
    columns = mlflow.models.get_model_info(f"models:/insertrec/{version}").signature.inputs.input_names()
    orders = orders[columns]
    orders["order_id"] = "new-" + orders["order_id"]
    orders["order_ts"] = engine.manifest["cutoff"]
    orders[["order_value", "n_items"]] = orders[["order_value", "n_items"]].astype(float)
    orders["is_gift"] = orders["is_gift"].str.lower() == "true"
    slots = list(engine.policy.slot_names)
    result = ", ".join(["order_id string, policy string"]
                       + [f"{s} string, {s}_propensity double" for s in slots])
    udf = mlflow.pyfunc.spark_udf(spark, f"models:/insertrec/{version}", result_type=result,
                                  env_manager="local", params={"layout": "per_order"})
    frame = spark.createDataFrame(orders).repartition(2)
    got = (frame.select(udf(*orders.columns).alias("d")).select("d.*").toPandas()
           .set_index("order_id").sort_index())
    expected = engine.decide_batch(orders).set_index(["order_id", "slot"])
    for slot in slots:
        pd.testing.assert_series_equal(got[slot], expected.xs(slot, level="slot")["action_id"].sort_index(),
                                       check_names=False)
        np.testing.assert_array_equal(got[f"{slot}_propensity"],
                                      expected.xs(slot, level="slot")["propensity"].sort_index())
    assert len(got) == len(orders)

    # the README's snippet, as written, on the same orders once the version is the champion
    mlflow.MlflowClient().set_registered_model_alias("insertrec", "champion", version)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text[text.index("## On Apache Spark"):], re.S)
    assert snippet, "README: no python block under 'On Apache Spark'"
    scope = {"spark": spark, "orders": frame}
    exec(snippet.group(1), scope)
    readme = scope["decisions"].toPandas().set_index("order_id").sort_index()
    pd.testing.assert_frame_equal(readme, got)


def _readme_on_spark(command: str) -> list[str]:
    """The README's `insertrec COMMAND ... --engine spark` line (first bash block under
    "On Apache Spark"), as arguments."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("## On Apache Spark"):], re.S)
    assert block, "README: no bash block under 'On Apache Spark'"
    commands = [shlex.split(line) for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]
    found = [c for c in commands if c[:2] == ["insertrec", command] and "--engine" in c]
    assert len(found) == 1, f"README: no `insertrec {command} --engine spark` under 'On Apache Spark'"
    return found[0][1:]


def test_train_on_spark_writes_the_local_model(spark, tmp_path, monkeypatch) -> None:
    from insertrec.cli import main
    from insertrec.engine import Engine
    from insertrec.training import TrainConfig, train

    shop = tmp_path / "shop"     # large enough for a value model with the default settings
    World.default().write_demo_data(shop, customers=400, seed=1)
    monkeypatch.chdir(tmp_path)    # the README's relative paths
    args = _readme_on_spark("train")
    assert main([*args, "--no-mlflow"]) == 0    # logging a model directory: the spark_udf test
    on_spark = tmp_path / args[args.index("--out") + 1]
    local = tmp_path / "local-model"
    cutoff = args[args.index("--cutoff") + 1]    # history_before on Spark
    train(load_data(shop), local, TrainConfig(cutoff=cutoff))

    a, b = Engine.load(local), Engine.load(on_spark)
    assert b.manifest["version"] == a.manifest["version"] and a.manifest["cutoff"].startswith(cutoff)
    assert b.manifest["data_fingerprint"] == a.manifest["data_fingerprint"]
    assert a.policy.value_model is not None and b.policy.value_model is not None
    assert b.policy.value_model.alpha_ == a.policy.value_model.alpha_
    np.testing.assert_allclose(b.policy.value_model.theta_, a.policy.value_model.theta_, rtol=0, atol=1e-8)
    assert b.policy.playbook_slots == a.policy.playbook_slots

    orders = pd.read_csv(shop / "orders.csv", dtype=str).tail(150)
    orders["order_id"] = "new-" + orders["order_id"]
    orders["order_ts"] = a.manifest["cutoff"]
    orders.to_csv(tmp_path / "new.csv", index=False)
    for model in (local, on_spark):
        assert main(["recommend", "--model", str(model), "--orders", "new.csv", "--out", f"{model.name}.csv"]) == 0
    decided = pd.read_csv(f"{local.name}.csv", dtype={"order_id": str})
    assert len(decided) == 150 * len(a.policy.slot_names) and "model" in set(decided["policy"])
    # the same boxes; propensities equal up to the last bits of coefficients equal to ~1e-15
    pd.testing.assert_frame_equal(pd.read_csv(f"{on_spark.name}.csv", dtype={"order_id": str}), decided,
                                  check_exact=False, rtol=0, atol=1e-12)

    # the README's `recommend --engine spark` as written: a directory of part files in, part files out
    recommend = _readme_on_spark("recommend")
    (tmp_path / recommend[recommend.index("--orders") + 1]).mkdir()
    orders.to_csv(tmp_path / recommend[recommend.index("--orders") + 1] / "part-0.csv", index=False)
    model = tmp_path / recommend[recommend.index("--model") + 1]
    model.parent.mkdir(parents=True, exist_ok=True)
    if not model.exists():
        shutil.copytree(on_spark, model)
    assert main(recommend) == 0
    written = pd.read_parquet(tmp_path / recommend[recommend.index("--out") + 1])
    assert sorted(written["order_id"].unique()) == sorted(decided["order_id"].unique())
    assert len(written) == len(decided)


def test_train_on_spark_with_a_sample_of_customers_on_the_driver(spark, tmp_path, monkeypatch) -> None:
    """A history larger than the driver's sample: the driver fits the nuisance models and the
    tournament on a third of the customers, yet the model knows every customer (its snapshot and
    segments built per bucket on Spark, equal to the local ones' customers), its cutoff and
    version are the whole history's, and the sample is of whole customers. The final ridge's
    rows are numbered in ranges of order time of a few hundred rows, as a large history's are."""
    from insertrec.engine import Engine
    from insertrec.features import customer_frame
    from insertrec.spark.training import train_on_spark
    from insertrec.training import TrainConfig, train

    shop = tmp_path / "shop"
    World.default().write_demo_data(shop, customers=400, seed=1)
    local = load_data(shop)
    config = TrainConfig(min_logged_orders=100)
    train(local, tmp_path / "local", config)
    monkeypatch.setattr("insertrec.spark.training._ROWS_PER_RANGE", 300)
    train_on_spark(shop, tmp_path / "spark", config, master="local[2]", sample_orders=len(local.orders) // 3)
    a, b = Engine.load(tmp_path / "local"), Engine.load(tmp_path / "spark")
    for key in ("version", "cutoff", "data_fingerprint"):
        assert b.manifest[key] == a.manifest[key], key
    assert a.snapshot is not None and b.snapshot is not None
    cutoff = pd.Timestamp(a.manifest["cutoff"])
    pd.testing.assert_frame_equal(customer_frame(b.snapshot, cutoff), customer_frame(a.snapshot, cutoff))
    segments = pd.read_csv(tmp_path / "spark" / "segments.csv", dtype={"customer_id": str})
    assert list(segments["customer_id"]) == list(pd.read_csv(tmp_path / "local" / "segments.csv",
                                                             dtype={"customer_id": str})["customer_id"])
    assert set(b.segments) == set(a.segments) and set(b.segments.values()) <= set(segments["segment_name"])
    assert dict(zip(segments["customer_id"], segments["segment_name"], strict=True)) == b.segments

    sampled = json.loads((tmp_path / "spark" / "ope.json").read_text())
    whole = json.loads((tmp_path / "local" / "ope.json").read_text())
    assert 0.15 * whole["train_orders"] < sampled["train_orders"] < 0.6 * whole["train_orders"]

    # the final ridge (the incumbent blend's ridge part) is fitted on every logged order of the whole
    # history, not only the sample's: the local fit on all of them, with the encoder the sample fitted.
    # The blend keeps its ridge's strengths, noise and posterior (`valuemodel.blend`), which the ridge's
    # rows alone determine, to 1e-8
    from insertrec.evaluation import logged_orders, rules_actions
    from insertrec.learners import SplineEncoder
    from insertrec.tournament import INCUMBENT

    assert sampled["tournament"]["winner"] == INCUMBENT
    assert b.policy.value_model is not None and b.policy.encoder is not None
    # the blend's encoder is a SplineEncoder over the ridge's; the ridge alone (`learners.blended`) its own
    base = b.policy.encoder.base if isinstance(b.policy.encoder, SplineEncoder) else b.policy.encoder
    params = FeatureParams.fit(local, catalog=local.catalog)
    feats = order_features(local, params)
    costs = {a.id: a.cost for slot in local.catalog.slots.values() for a in slot.actions}
    logged = logged_orders(local, feats, order_rewards(local, horizon_days=config.horizon_days, costs=costs),
                           local.catalog)
    assert logged.propensity_source == "logged" and len(logged) > 1.5 * sampled["train_orders"]
    rows = feats.iloc[logged.rows]
    expected = ValueModel(random_state=config.seed).fit(
        base.transform(rows), logged.feedback.actions, logged.feedback.rewards, b.policy.space,
        rules_actions(local.catalog, rows), logged.feedback.pscores.prod(axis=1))
    served = b.policy.value_model
    assert served.alpha_ == expected.alpha_
    np.testing.assert_allclose(served.noise_, expected.noise_, rtol=1e-8)
    d, wide = expected.n_features_, served.n_features_

    def covariances(factor: np.ndarray, width: int) -> np.ndarray:   # per action, L L' (L's signs are arbitrary)
        per_action = factor.reshape(width, -1, width).transpose(1, 0, 2)
        return np.einsum("aij,akj->aik", per_action, per_action)[:, :d, :d]

    np.testing.assert_allclose(covariances(served.gain_factor_, wide), covariances(expected.gain_factor_, d),
                               rtol=1e-6, atol=1e-12)
