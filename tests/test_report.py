"""The marketer's report: what to do per segment, honest warnings, self-contained, readable in a browser.

The browser tests open the page in headless Chromium from the distribution
(``.ci/system-packages`` installs it): a copy of the page gets a measuring
script appended (the page itself has none), Chromium runs it and prints the
DOM with the measurements, and a screenshot is kept for people to look at
(in ``$REPORT_SCREENSHOTS`` when set, else the test's temporary directory).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_segments import planted

from insertrec.cli import main
from insertrec.evaluation import lift_withheld, value_withheld
from insertrec.ope import Estimate
from insertrec.report import EVIDENCE, MATERIAL_SHARE, build_report, evidence_warnings, recommendation, render_report
from insertrec.segments import SegmentModel
from insertrec.training import TrainConfig, train
from insertrec.world import World

PERIOD = {"as_of": pd.Timestamp("2024-07-01", tz="UTC"), "data_from": pd.Timestamp("2023-01-02", tz="UTC"),
          "data_to": pd.Timestamp("2024-06-30", tz="UTC"), "horizon_days": 60}
GOOD_OPE = {"orders": 5000, "playbook_slots": [], "model_minus_rules": {"value": 1.0, "low": 0.2, "high": 1.8},
            "model": {"dr": {"value": 31.0, "low": 30.0, "high": 32.0}},
            "rules": {"dr": {"value": 30.0, "low": 29.0, "high": 31.0}}}
GOOD_METRICS = {"repeat_auc": 0.8, "ess": 2500.0, "lift_vs_rules": 0.033}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained on a small simulated shop: real segments, policy, holdout and report facts."""
    data = World.default().generate(customers=1500, seed=5).to_dataset()
    out = tmp_path_factory.mktemp("model") / "m"
    train(data, out, TrainConfig(horizon_days=60))
    return out


@pytest.fixture(scope="module")
def facts(trained: Path) -> dict:
    return json.loads((trained / "report.json").read_text())


def lost_to_rules(facts: dict) -> dict:
    """The same facts, had the holdout shown the engine worse than the playbook."""
    out = copy.deepcopy(facts)
    diff = {"value": -1.2, "low": -2.0, "high": -0.3}
    out["warnings"] = evidence_warnings({"repeat_auc": 0.43, "ess": 50.0, "lift_vs_rules": -0.04},
                                        {"orders": 250, "playbook_slots": ["coupon"], "model_minus_rules": diff},
                                        "model")
    out["repeat_auc"], out["holdout"]["model_minus_rules"] = 0.43, diff
    for seg in out["segments"]:
        seg["action"] = recommendation(seg["engine"], engine_lost=True)
    return out


# -- facts and rules ------------------------------------------------------------------------------

def test_warnings_name_weak_or_bad_evidence() -> None:
    assert evidence_warnings(GOOD_METRICS, GOOD_OPE, "model") == []
    weak = evidence_warnings({"repeat_auc": 0.43, "ess": 50.0, "lift_vs_rules": -0.04},
                             {"orders": 250, "playbook_slots": ["coupon"],
                              "model_minus_rules": {"value": -1.2, "low": -2.0, "high": -0.3}}, "model")
    text = " ".join(weak)
    assert "AUC 0.43" in text and "250 orders" in text and "effective sample size 50" in text
    assert "did worse than the playbook: -4.0%" in text and "whole 95% interval is below zero" in text
    assert "in coupon" in text
    assert len(weak) == 5
    # A model that lost on the point estimate only is still named as losing.
    assert any("did worse" in w for w in evidence_warnings(GOOD_METRICS | {"lift_vs_rules": -0.01}, GOOD_OPE, "model"))
    assert evidence_warnings({"repeat_auc": EVIDENCE["repeat_auc"]}, None, None) == []
    # When evaluate withheld the lifts (an interval wider than +-3 points) the report says why.
    why = lift_withheld("lift_vs_rules", Estimate(0.05, -0.02, 0.12), 14_000, {})
    withheld = evidence_warnings(GOOD_METRICS | {"lift_vs_rules": float("nan")},
                                 GOOD_OPE | {"lifts": {"withheld": True, "why": why}}, "model")
    assert withheld == [f"The holdout cannot say how the engine compares with the playbook: {why}."]
    # And the model's value, where evaluate withheld it.
    value_why = value_withheld(Estimate(37.0, 32.5, 41.5), 13_000, {})
    unvalued = evidence_warnings(GOOD_METRICS | {"policy_value_dr": float("nan")},
                                 GOOD_OPE | {"value": {"withheld": True, "why": value_why}}, "model")
    assert unvalued == [f"The holdout cannot say what the engine is worth per order: {value_why}."]
    # Withheld (its interval too wide to size it) yet wholly below zero: the loss is said, with no figure.
    lost = evidence_warnings(GOOD_METRICS | {"lift_vs_rules": float("nan")},
                             GOOD_OPE | {"lifts": {"withheld": True, "why": why},
                                         "model_minus_rules": {"value": -3.0, "low": -5.5, "high": -0.5}}, "model")
    assert lost[1] == ("On the holdout the engine did worse than the playbook (the whole 95% interval is below "
                       "zero). Keep the playbook until a retrained engine beats it.")
    assert "no learnt engine" in evidence_warnings({}, None, "rules")[0]


def _facts(low: float, high: float, same: float = 0.0) -> dict:
    return {"vs_rules": {"value": (low + high) / 2, "low": low, "high": high},
            "box": [{"same_as_playbook": same}, {"same_as_playbook": 1.0}]}


def test_recommendation_follows_the_uplift_and_the_holdout() -> None:
    assert recommendation(_facts(0.5, 1.5), engine_lost=False).startswith("Switch to the engine's box: about +1.00")
    assert recommendation(_facts(-1.5, -0.5), engine_lost=False).startswith("Keep the playbook for these")
    assert recommendation(_facts(-0.5, 1.5), engine_lost=False).startswith("Test the engine's box")
    assert recommendation(_facts(0.5, 1.5), engine_lost=True).startswith("Keep the playbook: on the holdout")
    assert "same parcel" in recommendation(_facts(-0.1, 0.1, same=0.95), engine_lost=False)
    assert recommendation({"box": []}, engine_lost=False).startswith("Serve the playbook")
    # A sure but tiny gain (under MATERIAL_SHARE of the order's value) is not worth a change.
    tiny = _facts(0.2, 0.4) | {"value_per_order": {"value": 0.3 / MATERIAL_SHARE * 1.5}}
    assert recommendation(tiny, engine_lost=False).startswith("Either box will do")
    assert recommendation(tiny | {"value_per_order": {"value": 20.0}}, engine_lost=False).startswith("Switch")


@pytest.mark.slow
def test_facts_of_a_trained_model_add_up(trained: Path, facts: dict) -> None:
    assert "NaN" not in (trained / "report.json").read_text()      # strict JSON, readable anywhere
    segments = pd.read_csv(trained / "segments.csv")
    assert len(facts["segments"]) == segments["segment_id"].nunique()
    assert sum(s["customers"] for s in facts["segments"]) == len(segments)
    assert facts["as_of"] and facts["data_from"] <= facts["data_to"] <= facts["as_of"]
    assert facts["shop"] == "world" and facts["policy"] == "model"
    for seg in facts["segments"]:
        engine = seg["engine"]
        v = engine["value_per_order"]
        assert v["low"] <= v["value"] <= v["high"]
        assert engine["vs_rules"]["low"] <= engine["vs_rules"]["value"] <= engine["vs_rules"]["high"]
        for box in engine["box"]:
            assert sum(p["share"] for p in box["picks"]) == pytest.approx(1.0)
            # Every slot says why: the value model's drivers, or a reason in words.
            assert box["drivers"] or box["note"]
        assert seg["action"]
    # Somewhere the engine moved off the default, and says which model terms made it.
    drivers = [d for s in facts["segments"] for b in s["engine"]["box"] for d in b["drivers"]]
    assert drivers and all(abs(d["effect"]) > 1e-3 and d["words"] for d in drivers)
    assert len({d["words"] for d in drivers}) > 1          # not one fixed sentence
    # Every slot gets a recommended exploration share, with the sentence saying why; by default it is served.
    ex = facts["exploration"]
    assert set(ex["slots"]) == {b["slot"] for b in facts["segments"][0]["engine"]["box"]}
    assert all(a["reason"] and 0 < a["recommended_epsilon"] < 1 for a in ex["slots"].values())
    assert ex["served_epsilon"] == {slot: a["recommended_epsilon"] for slot, a in ex["slots"].items()}
    # A one-order customer is "new": the stage mix of each segment matches segments.csv.
    stages = pd.crosstab(segments["segment_id"], segments["journey_stage"], normalize="index")
    for seg in facts["segments"]:
        for stage in stages.columns:
            assert seg[f"stage_{stage}"] == pytest.approx(stages.loc[seg["segment_id"], stage])


# -- the page ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(facts: dict) -> str:
    return render_report(facts, currency="EUR")


@pytest.mark.slow
def test_segments_command_writes_the_page_in_the_currency_asked_for(trained: Path, tmp_path: Path) -> None:
    assert main(["segments", "--model", str(trained), "--out", str(tmp_path / "a"), "--currency", "EUR"]) == 0
    assert "amounts in EUR" in (tmp_path / "a" / "report.html").read_text()
    assert main(["segments", "--model", str(trained), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "report.html").read_text() == (trained / "report.html").read_text()
    assert "amounts in currency units" in (tmp_path / "b" / "report.html").read_text()


@pytest.mark.slow
def test_self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "http" not in page and "@import" not in page and "url(" not in page
    assert page.count("<svg") >= 4       # size, value, propensity, stage


@pytest.mark.slow
def test_page_names_shop_period_horizon_and_currency(page: str, facts: dict) -> None:
    title = re.search(r"<h1>(.*?)</h1>", page).group(1)
    assert "world" in title and facts["version"] not in title
    for text in (f"Orders from {facts['data_from']} to {facts['data_to']}", f"as of {facts['as_of']}",
                 "horizon 60 days", "amounts in EUR"):
        assert text in page
    assert "currency units" in render_report(facts)
    assert not re.search(r"\d\.\d{4,}", page)  # no raw floats like 0.2345678


def test_the_holdout_value_is_shown_only_where_evaluate_printed_it(trained: Path, facts: dict) -> None:
    """The page's holdout figure follows training's ope.json: where evaluate withheld the model's value
    the page gives no figure for it, and a warning says why."""
    why = json.loads((trained / "ope.json").read_text())["value"]["why"]
    assert facts["holdout"]["value_withheld"] == why
    assert any(why in w for w in facts["warnings"]) if why else not any("worth per order" in w for w in facts["warnings"])
    model = facts["holdout"]["model"]
    for withheld in (None, "the model's value withheld: ..."):
        page = render_report(copy.deepcopy(facts) | {"holdout": facts["holdout"] | {"value_withheld": withheld}})
        holdout = re.search(r"<dt>Holdout</dt><dd>(.*?)</dd>", page).group(1)
        assert ("its value is not given" in holdout) == bool(withheld)
        assert (f"{model['value']:,.2f} per order" in holdout) == (not withheld), holdout


@pytest.mark.slow
def test_every_segment_says_what_to_do(page: str, facts: dict) -> None:
    sections = re.findall(r'<section class="segment" id="segment-\d+">(.*?)</section>', page, re.S)
    assert len(sections) == len(facts["segments"])
    for html, seg in zip(sections, facts["segments"]):
        assert "Expected value per order" in html and "Against the playbook" in html
        assert "Against the all-default box" in html and "Cost per order" in html
        assert seg["action"] in html.replace("&#x27;", "'")


@pytest.mark.slow
def test_hostile_text_is_escaped(facts: dict) -> None:
    hostile = copy.deepcopy(facts)
    hostile["shop"] = "<script>alert(1)</script> & co"
    hostile["segments"][0]["segment_name"] = "<img src=x onerror=alert(1)>"
    hostile["segments"][0]["engine"]["box"][0]["picks"][0]["action_name"] = "10% <b>off</b>"
    html = render_report(hostile)
    assert "<script" not in html and "<img" not in html and "<b>off</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html and "10% &lt;b&gt;off&lt;/b&gt;" in html


def test_returns_and_nps_only_when_the_data_has_them() -> None:
    frame = planted(n_each=40).assign(return_rate=0.0, nps_tier="unknown")
    model = SegmentModel(random_state=0).fit(frame)
    customers = frame.assign(segment_id=model.predict(frame))
    facts = build_report(model.profiles(), customers, shop="Orders only", period=PERIOD,
                         metrics={"repeat_auc": 0.71})
    html = render_report(facts)
    assert not facts["returns_recorded"] and "Return rate" not in html and "NPS mix" not in html
    assert "What to do" not in html and all(n in html for n in model.names_)
    with_returns = build_report(model.profiles(), customers.assign(return_rate=0.1), shop="x", period=PERIOD)
    assert "Return rate" in render_report(with_returns)
    # A segment with no customers left (KMeans can leave one empty) still draws, as "n/a".
    empty = model.profiles()
    empty.loc[0, [c for c in empty if c not in ("segment_id", "segment_name", "description")]] = np.nan
    empty.loc[0, ["customers", "share"]] = 0      # as SegmentModel fills an empty cluster
    assert "n/a" in render_report(build_report(empty, customers, shop="x", period=PERIOD))


# -- in a browser -----------------------------------------------------------------------------------

_MEASURE = """<script>
(() => {
  const box = e => e ? e.getBoundingClientRect() : null;
  const shown = e => !!e && e.offsetHeight > 0 && e.textContent.trim().length > 0;
  const out = {width: window.innerWidth, scroll: document.documentElement.scrollWidth,
    widest: Math.max(...[...document.querySelectorAll('main *')].map(e => box(e).right)),
    warnings: document.querySelectorAll('.warnings li').length,
    segments: [...document.querySelectorAll('section.segment')].map(s => ({
      value: shown(s.querySelector('.value')), uplift: shown(s.querySelector('.uplift')),
      action: shown(s.querySelector('.action')) ? s.querySelector('.action p').textContent : ''}))};
  const pre = document.createElement('pre'); pre.id = 'measured';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
})();
</script>"""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Chromium is not installed (.ci/system-packages installs it)", pytrace=False)
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    return path


def open_in_chromium(html: str, width: int, tmp: Path, screenshot: Path | None = None) -> dict:
    """Chromium's view of the page at ``width`` px: the measurements, and optionally a screenshot."""
    page, probe = tmp / f"report-{width}.html", tmp / f"probe-{width}.html"
    page.write_text(html, encoding="utf-8")
    probe.write_text(html.replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--window-size={width},2400"]

    def run(*args: str) -> str:
        profile = tmp / f"profile-{width}-{len(args)}"
        done = subprocess.run([*flags, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    dom = run("--dump-dom", probe.as_uri())
    if screenshot is not None:
        run(f"--screenshot={screenshot}", page.as_uri())
        assert screenshot.stat().st_size > 10_000
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"'))


@pytest.mark.slow
@pytest.mark.parametrize("width", [800, 1280])
def test_reads_well_in_a_browser(facts: dict, width: int, tmp_path: Path) -> None:
    shot = Path(os.environ.get("REPORT_SCREENSHOTS", tmp_path)) / f"report-{width}.png"
    seen = open_in_chromium(render_report(facts, currency="EUR"), width, tmp_path, screenshot=shot)
    assert seen["width"] == width
    assert seen["scroll"] <= seen["width"] and seen["widest"] <= seen["width"]   # nothing runs off the page
    assert len(seen["segments"]) == len(facts["segments"])
    assert all(s["value"] and s["uplift"] and s["action"] for s in seen["segments"])
    assert seen["warnings"] == len(facts["warnings"])


@pytest.mark.slow
def test_warnings_show_in_a_browser_when_the_engine_lost(facts: dict, tmp_path: Path) -> None:
    shot = Path(os.environ.get("REPORT_SCREENSHOTS", tmp_path)) / "report-lost-800.png"
    seen = open_in_chromium(render_report(lost_to_rules(facts)), 800, tmp_path, screenshot=shot)
    assert seen["warnings"] == 5 and seen["scroll"] <= seen["width"]
    assert all(s["action"].startswith("Keep the playbook: on the holdout") for s in seen["segments"])
