"""The marketer's report: one self-contained HTML page about the segments.

Self-contained on purpose: it is mailed around and opened offline, so the
charts are SVG drawn here, the styles are inline, and nothing is fetched
(no scripts, fonts, images or CDNs). Every piece of text that comes from
data (segment names, action names, catalog notes) is escaped.
"""

from __future__ import annotations

from html import escape

import numpy as np
import pandas as pd

from insertrec.schema import JOURNEY_STAGES, NPS_TIERS

_NPS_COLORS = {"promoter": "#2e7d32", "passive": "#9e9e9e", "detractor": "#c62828", "unknown": "#e0e0e0"}
_STAGE_COLORS = {"new": "#90caf9", "developing": "#42a5f5", "loyal": "#1565c0", "lapsed": "#ffb74d"}
_LABEL_W, _BAR_W, _VALUE_W, _ROW_H = 320, 240, 130, 26

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
 color:#212121;background:#fafafa}
main{max-width:1240px;margin:0 auto;padding:24px 32px}
h1{font-size:26px;margin:0 0 6px} h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #ddd;
 padding-bottom:4px} h3{font-size:15px;margin:0 0 6px}
.summary{font-size:15px;line-height:1.5;max-width:900px}
.kpis{display:flex;gap:14px;flex-wrap:wrap;margin:14px 0}
.kpi{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:10px 14px;min-width:150px}
.kpi b{display:block;font-size:22px} .kpi span{font-size:12px;color:#616161}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:16px}
.card{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:12px 14px}
.note{font-size:12px;color:#616161;margin:4px 0 0}
.legend{font-size:12px;margin:4px 0 0} .legend i{display:inline-block;width:10px;height:10px;
 margin:0 4px 0 10px;border-radius:2px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border-bottom:1px solid #e0e0e0;padding:7px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0;font-weight:600} td.n{text-align:right;white-space:nowrap}
td.name{font-weight:600;min-width:180px}
svg text{font-size:12px;fill:#212121}
"""


def _fmt_money(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:,.0f}"


def _fmt_pct(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.0%}"


def _label(y: float, text: str) -> str:
    short = text if len(text) <= 50 else text[:49] + "\u2026"
    return (f'<text x="{_LABEL_W - 8}" y="{y + _ROW_H / 2 + 4:.1f}" text-anchor="end">'
            f'<title>{escape(text)}</title>{escape(short)}</text>')


def _bars(names: list[str], values: np.ndarray, shown: list[str], color: str) -> str:
    """Horizontal bars, one per segment, scaled to the largest value."""
    top = float(np.nanmax(values)) if len(values) and np.nanmax(values) > 0 else 1.0
    rows = []
    for i, (name, v, text) in enumerate(zip(names, values, shown)):
        y = i * _ROW_H
        w = 0.0 if not np.isfinite(v) else _BAR_W * v / top
        rows.append(f'{_label(y, name)}<rect x="{_LABEL_W}" y="{y + 4}" width="{w:.1f}" '
                    f'height="{_ROW_H - 8}" fill="{color}" rx="2"/>'
                    f'<text x="{_LABEL_W + w + 6:.1f}" y="{y + _ROW_H / 2 + 4:.1f}">{escape(text)}</text>')
    return _svg(len(names), "".join(rows))


def _stacked(names: list[str], shares: pd.DataFrame, colors: dict[str, str]) -> str:
    """100% stacked bars: the mix of a category within each segment."""
    rows = []
    for i, name in enumerate(names):
        y, x = i * _ROW_H, float(_LABEL_W)
        parts = [_label(y, name)]
        for level, color in colors.items():
            share = float(shares.iloc[i][level])
            w = _BAR_W * share
            if w <= 0:
                continue
            tip = f"{level}: {share:.0%}"
            parts.append(f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{_ROW_H - 8}" '
                         f'fill="{color}"><title>{escape(name)}: {tip}</title></rect>')
            if w >= 30:
                ink = "#fff" if level not in ("unknown", "new") else "#212121"
                parts.append(f'<text x="{x + w / 2:.1f}" y="{y + _ROW_H / 2 + 4:.1f}" text-anchor="middle" '
                             f'style="fill:{ink}">{share:.0%}</text>')
            x += w
        rows.append("".join(parts))
    return _svg(len(names), "".join(rows))


def _svg(n_rows: int, body: str) -> str:
    width, height = _LABEL_W + _BAR_W + _VALUE_W, max(n_rows, 1) * _ROW_H + 4
    return (f'<svg width="100%" viewBox="0 0 {width} {height}" role="img" '
            f'preserveAspectRatio="xMinYMin meet">{body}</svg>')


def _legend(colors: dict[str, str]) -> str:
    items = "".join(f'<i style="background:{c}"></i>{escape(k)}' for k, c in colors.items())
    return f'<p class="legend">{items}</p>'


def _card(title: str, chart: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<div class="card"><h3>{escape(title)}</h3>{chart}{note_html}</div>'


def _charts(profiles: pd.DataFrame) -> str:
    names = profiles["segment_name"].astype(str).tolist()
    col = lambda c: profiles[c].to_numpy(dtype=float)
    size = _bars(names, col("customers"), [f"{int(v):,} ({s:.0%})" for v, s in
                                           zip(col("customers"), col("share"))], "#5c6bc0")
    value = _bars(names, col("mean_value"), [_fmt_money(v) for v in col("mean_value")], "#26a69a")
    repeat = _bars(names, col("p_repeat"), [f"{p:.0%} \u00b7 {e:.2f} orders" for p, e in
                                            zip(col("p_repeat"), col("expected_orders"))], "#ef6c00")
    nps = _stacked(names, profiles[[f"nps_{t}" for t in NPS_TIERS]].set_axis(list(NPS_TIERS), axis=1),
                   _NPS_COLORS)
    stage = _stacked(names, profiles[[f"stage_{s}" for s in JOURNEY_STAGES]]
                     .set_axis(list(JOURNEY_STAGES), axis=1), _STAGE_COLORS)
    return "".join([
        _card("Segment size (customers)", size),
        _card("Average spend per customer", value, "Total spent so far, average per customer."),
        _card("NPS mix", nps + _legend(_NPS_COLORS),
              "Latest survey answer: promoters 9-10, passives 7-8, detractors 0-6; unknown = no recent answer."),
        _card("Journey stage", stage + _legend(_STAGE_COLORS),
              "New = one order, developing = 2-3, loyal = 4 or more, lapsed = no order for a long time."),
        _card("Likely to order again", repeat,
              "Average chance that a customer orders again within the horizon, and expected orders each."),
    ])


def _table(profiles: pd.DataFrame) -> str:
    head = ("<tr><th>Segment</th><th>Who they are</th><th>Customers</th><th>Share</th>"
            "<th>Avg spend</th><th>Avg order</th><th>Orders each</th><th>Chance to order again</th>"
            "<th>Expected orders</th><th>Return rate</th></tr>")
    rows = []
    for _, s in profiles.iterrows():
        rows.append(
            f'<tr><td class="name">{escape(str(s["segment_name"]))}</td>'
            f'<td>{escape(str(s.get("description", "")))}</td>'
            f'<td class="n">{int(s["customers"]):,}</td><td class="n">{_fmt_pct(s["share"])}</td>'
            f'<td class="n">{_fmt_money(s["mean_value"])}</td>'
            f'<td class="n">{_fmt_money(s["mean_order_value"])}</td>'
            f'<td class="n">{s["orders_per_customer"]:.1f}</td><td class="n">{_fmt_pct(s["p_repeat"])}</td>'
            f'<td class="n">{s["expected_orders"]:.2f}</td><td class="n">{_fmt_pct(s["return_rate"])}</td></tr>')
    return f"<table>{head}{''.join(rows)}</table>"


def _treatments(profiles: pd.DataFrame, treatments: pd.DataFrame) -> str:
    names = dict(zip(profiles["segment_id"], profiles["segment_name"].astype(str)))
    slots = list(dict.fromkeys(treatments["slot"].astype(str)))
    head = "<tr><th>Segment</th>" + "".join(f"<th>{escape(s.capitalize())}</th>" for s in slots) + "</tr>"
    rows = []
    for seg_id, seg in treatments.groupby("segment_id", sort=True):
        cells = []
        for slot in slots:
            picks = seg[seg["slot"].astype(str) == slot].sort_values("share", ascending=False)
            items = "<br>".join(f"{escape(str(r.action_name))} ({r.share:.0%})" for r in picks.itertuples())
            whys = "; ".join(dict.fromkeys(escape(str(w)) for w in picks["why"]))
            cells.append(f'<td>{items or "&ndash;"}<p class="note">{whys}</p></td>')
        rows.append(f'<tr><td class="name">{escape(names.get(seg_id, f"Segment {seg_id}"))}</td>'
                    f'{"".join(cells)}</tr>')
    return ("<h2>What each segment receives, and why</h2>"
            "<p class=\"note\">Share of the segment's customers given each action on their latest order.</p>"
            f"<table>{head}{''.join(rows)}</table>")


def _summary(profiles: pd.DataFrame, customers: pd.DataFrame, metrics: dict[str, float] | None) -> str:
    n = len(customers)
    p = pd.to_numeric(customers.get("p_repeat", pd.Series(dtype=float)), errors="coerce")
    e = pd.to_numeric(customers.get("expected_orders", pd.Series(dtype=float)), errors="coerce")
    biggest = profiles.sort_values("customers", ascending=False).iloc[0]
    best = profiles.sort_values("p_repeat", ascending=False).iloc[0]
    kpis = [(f"{n:,}", "customers"), (f"{len(profiles)}", "segments"),
            (_fmt_pct(float(p.mean())) if len(p) else "n/a", "average chance to order again"),
            (f"{e.sum():,.0f}" if len(e) else "n/a", "orders expected within the horizon")]
    if metrics and np.isfinite(metrics.get("repeat_auc", np.nan)):
        kpis.append((f"{metrics['repeat_auc']:.2f}", "propensity accuracy (AUC, 0.5 = guessing)"))
    boxes = "".join(f'<div class="kpi"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for v, k in kpis)
    text = (f"The {n:,} customers fall into {len(profiles)} segments. The largest is "
            f"<b>{escape(str(biggest['segment_name']))}</b> ({_fmt_pct(biggest['share'])} of customers); "
            f"the most likely to order again is <b>{escape(str(best['segment_name']))}</b> "
            f"({_fmt_pct(best['p_repeat'])} within the horizon).")
    return f'<p class="summary">{text}</p><div class="kpis">{boxes}</div>'


def render_report(profiles: pd.DataFrame, customers: pd.DataFrame, *,
                  treatments: pd.DataFrame | None = None, title: str = "Customer segments",
                  metrics: dict[str, float] | None = None) -> str:
    """The whole page as one HTML string.

    ``profiles`` is ``SegmentModel.profiles()``; ``customers`` the scored
    customer frame (for the base totals); ``treatments`` optional rows of
    ``segment_id, slot, action_id, action_name, share, why``; ``metrics``
    the training metrics (only ``repeat_auc`` is shown, in plain words).
    """
    parts = [f"<h1>{escape(title)}</h1>", _summary(profiles, customers, metrics),
             "<h2>Segments at a glance</h2>", f'<div class="grid">{_charts(profiles)}</div>',
             "<h2>Segment table</h2>", _table(profiles)]
    if treatments is not None and not treatments.empty:
        parts.append(_treatments(profiles, treatments))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")
