"""The marketer's report: self-contained, complete, and safe with hostile text."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from test_segments import planted

from insertrec.report import render_report
from insertrec.segments import SegmentModel


@pytest.fixture(scope="module")
def page() -> tuple[str, pd.DataFrame]:
    frame = planted(n_each=60)
    model = SegmentModel(random_state=0).fit(frame)
    profiles = model.profiles()
    # Customer-controlled text ends up in names and catalog texts: make it hostile.
    profiles.loc[0, "segment_name"] = "<script>alert(1)</script> VIPs & co"
    treatments = pd.DataFrame({"segment_id": [0, 0, 1], "slot": ["coupon", "coupon", "insert"],
                               "action_id": ["c10", "none", "card"],
                               "action_name": ["10% <b>off</b>", "No coupon", "Thank-you card"],
                               "share": [0.75, 0.25, 1.0], "why": ["value \"estimate\"", "control", "playbook"]})
    html = render_report(profiles, frame.assign(segment_id=model.predict(frame)), treatments=treatments,
                         title="Segments <Q3>", metrics={"repeat_auc": 0.71})
    return html, profiles


def test_self_contained(page: tuple[str, pd.DataFrame]) -> None:
    html, _ = page
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", html, re.I)
    assert "http" not in html and "@import" not in html and "url(" not in html
    assert html.count("<svg") >= 5       # size, value, NPS, stage, propensity


def test_every_segment_and_treatment_is_shown_escaped(page: tuple[str, pd.DataFrame]) -> None:
    html, profiles = page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; VIPs &amp; co" in html
    for name in profiles["segment_name"].iloc[1:]:
        assert name in html
    for desc in profiles["description"]:
        assert desc.replace("&", "&amp;") in html
    assert "10% &lt;b&gt;off&lt;/b&gt; (75%)" in html and "Thank-you card (100%)" in html
    assert "Segments &lt;Q3&gt;" in html and "<b>off</b>" not in html


def test_numbers_are_formatted_for_people(page: tuple[str, pd.DataFrame]) -> None:
    html, profiles = page
    first = profiles.iloc[1]
    assert f"{first['p_repeat']:.0%}" in html and f"{first['share']:.0%}" in html
    assert "0.71" in html                      # the AUC, in plain words next to it
    assert not re.search(r"\d\.\d{4,}", html)  # no raw floats like 0.2345678


def test_without_treatments_or_metrics() -> None:
    frame = planted(n_each=30)
    model = SegmentModel().fit(frame)
    html = render_report(model.profiles(), frame)
    assert "What each segment receives" not in html and "AUC" not in html
    assert all(n in html for n in model.names_)
