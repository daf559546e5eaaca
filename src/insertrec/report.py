"""The marketer's report: one self-contained HTML page that says what to do, segment by segment.

Two steps, so that the page can be drawn again without the model in memory:

- :func:`build_report` (at training time) gathers the facts as plain JSON:
  who each segment is, the box the engine gives them and the value model's
  drivers behind it, what that box is worth per order against the playbook
  and against the all-default box, what it costs and how much stock and
  budget it uses over the horizon, a recommended action, and the warnings
  the evidence calls for. Training keeps it as ``report.json``.
- :func:`render_report` draws the page from those facts, in a currency
  chosen at that point (``insertrec segments --currency``).

Self-contained on purpose: the page is mailed around and opened offline, so
the charts are SVG drawn here, the styles are inline, and nothing is fetched
(no scripts, fonts, images or CDNs). Every piece of text that comes from data
(segment names, action names, the shop's name) is escaped. The layout wraps
down to 800 px: tables turn into one card per row below 1000 px.
"""

from __future__ import annotations

from html import escape
from importlib.resources import files
from string import Template
from typing import Any

import numpy as np
import pandas as pd

from insertrec.explorationshare import HORIZON_MONTHS
from insertrec.policy import Policy
from insertrec.schema import JOURNEY_STAGES, NPS_TIERS
from insertrec.valuemodel import BoxGrid

__all__ = ["EVIDENCE", "MATERIAL_SHARE", "build_report", "evidence_warnings", "recommendation", "render_report",
           "segment_outcomes"]

# Thresholds behind the warnings: below these the figures are shown, but flagged as weak.
EVIDENCE = {"holdout_orders": 1000, "ess": 200.0, "repeat_auc": 0.6}
MATERIAL_SHARE = 0.01   # a gain below 1% of the value per order is "about the same"
_Z90 = 1.6449   # two-sided 90% normal interval
_NPS_COLORS = {"promoter": "#2e7d32", "passive": "#9e9e9e", "detractor": "#c62828", "unknown": "#e0e0e0"}
_STAGE_COLORS = {"new": "#90caf9", "developing": "#42a5f5", "loyal": "#1565c0", "lapsed": "#ffb74d"}
_LABEL_W, _BAR_W, _VALUE_W, _ROW_H = 300, 240, 130, 26
_FEATURE_WORDS = {
    "order_value": "order value", "n_items": "items in the order", "is_gift": "gift order",
    "nps_score": "NPS score", "prior_orders": "orders so far", "recency_days": "days since the last order",
    "tenure_days": "days since the first order", "monetary": "average order value so far",
    "total_spend": "total spent so far", "return_rate": "return rate", "gift_share": "share of gift orders",
    "incidents_90d": "service incidents in 90 days", "days_since_incident": "days since an incident",
}


# -- facts ----------------------------------------------------------------------------------------

def _mean_interval(values: np.ndarray) -> dict[str, float]:
    """Mean and its 90% interval over the customers (normal approximation: hundreds of rows)."""
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    half = _Z90 * float(values.std(ddof=1)) / np.sqrt(n) if n > 1 else float("nan")
    return {"value": mean, "low": mean - half, "high": mean + half}


def _feature_words(name: str, action_names: dict[str, str]) -> str:
    """An encoder feature name in a marketer's words ("journey_stage=loyal" -> "journey stage: loyal")."""
    base, _, level = name.partition("=")
    if base.startswith(("received_", "days_since_")):
        kind, _, rest = base.partition("_since_") if base.startswith("days_since_") else base.partition("_")
        action = next((n for a, n in action_names.items() if rest == a or rest.startswith(a + "_")), rest)
        words = f"days since they got {action}" if kind == "days" else f"times they got {action}"
    elif base.startswith(("cat_share_", "channel_share_")):
        words = f"share of orders {'in' if base.startswith('cat') else 'via'} {base.split('_share_', 1)[1]}"
    elif base.startswith("ctx_"):
        words = base[4:].replace("_", " ")
    else:
        words = _FEATURE_WORDS.get(base, base.replace("_", " "))
    if level == "missing":
        return f"{words} unknown"
    return f"{words}: {level}" if level else words


def _drivers(policy: Policy, grid: BoxGrid, names: list[str], phi: np.ndarray, rules: np.ndarray, slot: int,
             action: int, top: int = 3) -> list[dict[str, Any]]:
    """What moves ``action``'s value over the slot default the most for this segment, largest first.

    The value model is linear in the features per action, so the segment's
    average of each term is its average feature times the weight difference:
    the same per-action terms `Policy` gives as reasons for one order. Two
    terms that are not features are named too: the action's effect on every
    customer (the intercept) and the playbook bonus where the rules pick it.
    """
    column = grid.columns[slot]
    mean_phi = phi.mean(axis=0)
    effect = mean_phi * (grid.weights[:, column + action] - grid.weights[:, column + policy.space.defaults[slot]])
    action_names = {a.id: a.name for s in policy.catalog.slots.values() for a in s.actions}
    words = ["every customer (its base effect)" if n == "intercept" else _feature_words(n, action_names)
             for n in names]
    effect = np.append(effect, grid.beta[slot] * float(np.mean(rules[:, slot] == action)))
    words.append("the playbook's rules pick it")
    order = [j for j in np.argsort(-np.abs(effect), kind="stable") if abs(effect[j]) > 1e-3]
    return [{"words": words[j], "effect": float(effect[j])} for j in order[:top]]


def segment_outcomes(policy: Policy, feats: pd.DataFrame, segment_of: pd.Series,
                     expected_orders: pd.Series) -> dict[int, dict[str, Any]]:
    """Per segment id: the engine's box on each customer's latest order, why, and what it is worth.

    ``segment_of`` and ``expected_orders`` are indexed by customer id (str).
    Values are the value model's estimates (net revenue over the horizon
    after the order minus the box's cost), averaged over the segment's
    customers with a 90% interval over customers; exploration is left out.
    """
    recent = feats.groupby("customer_id", sort=False).tail(1).reset_index(drop=True)
    all_ids = recent["customer_id"].astype(str)
    seg = segment_of.reindex(all_ids).to_numpy()
    keep = ~pd.isna(seg)
    recent, seg, ids = recent[keep].reset_index(drop=True), seg[keep].astype(int), all_ids.to_numpy()[keep]
    catalog, space = policy.catalog, policy.space
    eligible, rules = catalog.assess(recent)
    columns, defaults = np.array(catalog.columns), np.array(space.defaults)
    rows = np.arange(len(recent))[:, None]
    playbook = np.where(eligible[rows, rules + columns], rules, defaults)
    chosen = policy.decide_frame(recent, explore=False).greedy
    flat_costs = np.concatenate([s.costs for s in catalog.slots.values()])
    cost = flat_costs[chosen + columns].sum(axis=1)
    model, encoder = policy.value_model, policy.encoder
    names: list[str] = []
    if model is not None and encoder is not None:
        phi, names = encoder.transform(recent), encoder.feature_names_
        grid, rule_columns = model.box_grid, rules + model.box_grid.columns
        v_chosen = grid.value(phi, rule_columns, chosen)
        per_order = model.baseline(phi) + v_chosen
        vs_rules = v_chosen - grid.value(phi, rule_columns, playbook)
        vs_default = v_chosen - grid.value(phi, rule_columns, np.broadcast_to(defaults, chosen.shape))
    horizon_orders = expected_orders.reindex(ids).fillna(0.0).to_numpy(dtype=float)
    out: dict[int, dict[str, Any]] = {}
    for sid in np.unique(seg):
        m = seg == sid
        n_expected = float(horizon_orders[m].sum())
        box, use = [], []
        for s, (slot_name, slot) in enumerate(catalog.slots.items()):
            counts = np.bincount(chosen[m, s], minlength=len(slot.actions)) / m.sum()
            top = int(np.argmax(counts))
            why: list[dict[str, Any]] = []
            if model is None:
                note = "the marketer's playbook (no learnt engine yet)"
            elif slot_name in policy.playbook_slots:
                note = "the playbook decides this slot: on the holdout the engine did worse than it here"
            elif top == defaults[s]:
                note = "most get the default: for them no alternative adds value"
            else:
                why, note = _drivers(policy, grid, names, phi[m], rules[m], s, top), ""
            picks = [{"action_id": slot.actions[a].id, "action_name": slot.actions[a].name,
                      "share": float(counts[a]), "default": bool(a == defaults[s])}
                     for a in np.argsort(-counts, kind="stable") if counts[a] > 0]
            box.append({"slot": slot_name, "picks": picks, "drivers": why, "note": note,
                        "same_as_playbook": float(np.mean(chosen[m, s] == playbook[m, s]))})
            for a in np.flatnonzero(counts):
                action = slot.actions[int(a)]
                if action.stock is None and action.budget is None:
                    continue
                units = float(counts[a]) * n_expected
                use.append({"action_name": action.name, "units": units, "spend": units * action.cost,
                            "stock": action.stock, "budget": action.budget})
        facts: dict[str, Any] = {"orders": int(m.sum()), "box": box, "use": use,
                                 "cost_per_order": float(cost[m].mean()), "expected_orders": n_expected,
                                 "horizon_cost": float(cost[m].mean()) * n_expected}
        if model is not None:
            facts |= {"value_per_order": _mean_interval(per_order[m]), "vs_rules": _mean_interval(vs_rules[m]),
                      "vs_default": _mean_interval(vs_default[m])}
        out[int(sid)] = facts
    return out


def evidence_warnings(metrics: dict[str, float], ope: dict[str, Any] | None, policy: str | None) -> list[str]:
    """Plain-words warnings where the evidence behind the report's figures is weak or bad news."""
    out = []
    auc = metrics.get("repeat_auc", float("nan"))
    if np.isfinite(auc) and auc < EVIDENCE["repeat_auc"]:
        out.append(f"The chance to order again ranks customers poorly on the holdout (AUC {auc:.2f}; 0.5 is "
                   "guessing, 0.6 is the least this report relies on): read those figures as rough.")
    if policy is None:
        return out
    if policy == "rules":
        out.append("There is no learnt engine yet (too few logged orders): the playbook decides every parcel, "
                   "so no value or uplift is estimated.")
        return out
    ope = ope or {}
    orders = int(ope.get("orders", 0))
    if orders < EVIDENCE["holdout_orders"]:
        out.append(f"The holdout that judged the engine has only {orders:,} orders (fewer than "
                   f"{EVIDENCE['holdout_orders']:,}): its figures are uncertain.")
    ess = metrics.get("ess", float("nan"))
    if np.isfinite(ess) and ess < EVIDENCE["ess"]:
        out.append(f"Few holdout orders resemble what the engine would do (effective sample size {ess:,.0f}): "
                   "its holdout value is uncertain.")
    value = ope.get("value") or {}
    if value.get("withheld"):
        out.append(f"The holdout cannot say what the engine is worth per order: {value.get('why')}.")
    lifts = ope.get("lifts") or {}
    if lifts.get("withheld"):
        out.append(f"The holdout cannot say how the engine compares with the playbook: {lifts.get('why')}.")
    diff = ope.get("model_minus_rules") or {}
    lift = metrics.get("lift_vs_rules", float("nan"))
    if (np.isfinite(lift) and lift < 0) or diff.get("high", 0.0) < 0:
        sure = " (the whole 95% interval is below zero)" if diff.get("high", 0.0) < 0 else ""
        size = f": {lift:+.1%} per order" if np.isfinite(lift) else ""   # a withheld lift has no figure
        out.append(f"On the holdout the engine did worse than the playbook{size}{sure}. "
                   "Keep the playbook until a retrained engine beats it.")
    slots = ope.get("playbook_slots") or []
    if slots:
        out.append(f"The engine did worse than the playbook in {', '.join(slots)} on the holdout; "
                   "the playbook decides there.")
    return out


def recommendation(facts: dict[str, Any], engine_lost: bool) -> str:
    """A short next step for one segment, from its uplift over the playbook and the holdout verdict."""
    if "vs_rules" not in facts:
        return ("Serve the playbook, and log what each parcel held (with its probability) so that the "
                "engine can learn what works for these customers.")
    if engine_lost:
        return "Keep the playbook: on the holdout the engine did worse than it."
    up = facts["vs_rules"]
    if all(b["same_as_playbook"] >= 0.9 for b in facts["box"]):
        return "Keep the playbook: the engine gives these customers the same parcel."
    material = MATERIAL_SHARE * abs(facts.get("value_per_order", {}).get("value", 0.0))
    if abs(up["value"]) < material:
        return (f"Either box will do: the engine's is worth about the same as the playbook's "
                f"({up['value']:+,.2f} per order).")
    if up["low"] > 0:
        return f"Switch to the engine's box: about {up['value']:+,.2f} per order over the playbook."
    if up["high"] < 0:
        return "Keep the playbook for these customers: the engine's box is estimated to be worth less."
    return ("Test the engine's box on part of this segment's orders before switching: its gain over the "
            "playbook is not yet clear.")


def _customer_figures(customers: pd.DataFrame) -> dict[str, Any]:
    p = pd.to_numeric(customers.get("p_repeat", pd.Series(dtype=float)), errors="coerce")
    e = pd.to_numeric(customers.get("expected_orders", pd.Series(dtype=float)), errors="coerce")
    returns = pd.to_numeric(customers.get("return_rate", pd.Series(dtype=float)), errors="coerce")
    nps = customers.get("nps_tier", pd.Series(dtype="string")).astype("string")
    return {"customers": len(customers), "mean_p_repeat": float(p.mean()) if len(p) else float("nan"),
            "expected_orders": float(e.sum()) if len(e) else float("nan"),
            "returns_recorded": bool((returns > 0).any()),
            "nps_recorded": bool(nps.isin([t for t in NPS_TIERS if t != "unknown"]).any())}


def build_report(profiles: pd.DataFrame, customers: pd.DataFrame, *, shop: str, period: dict[str, Any],
                 metrics: dict[str, float] | None = None, ope: dict[str, Any] | None = None,
                 policy: Policy | None = None, feats: pd.DataFrame | None = None,
                 version: str = "", currency: str | None = None) -> dict[str, Any]:
    """Everything the page shows, as JSON-able facts.

    ``profiles`` is ``SegmentModel.profiles()``; ``customers`` the scored
    customer frame with ``segment_id``; ``period`` holds ``as_of``,
    ``data_from``, ``data_to`` (timestamps) and ``horizon_days``; ``ope`` is
    training's ``ope.json``; ``policy`` and ``feats`` (the order features)
    give the engine's boxes and their value (None: no policy was learnt).
    """
    metrics = metrics or {}
    kind = None if policy is None else policy.name
    outcomes: dict[int, dict[str, Any]] = {}
    if policy is not None and feats is not None and len(feats):
        by_id = customers.set_index(customers["customer_id"].astype(str))
        outcomes = segment_outcomes(policy, feats, by_id["segment_id"], by_id["expected_orders"])
    warnings = evidence_warnings(metrics, ope, kind)
    diff = (ope or {}).get("model_minus_rules") or {}
    lost = kind == "model" and (metrics.get("lift_vs_rules", 0.0) < 0 or diff.get("high", 0.0) < 0)
    segments = []
    for row in profiles.to_dict("records"):
        facts = outcomes.get(int(row["segment_id"]))
        seg = dict(row)
        if facts is not None:
            seg |= {"engine": facts, "action": recommendation(facts, lost)}
        segments.append(seg)
    holdout = None
    if kind == "model" and ope:
        holdout = {"orders": ope.get("orders"), "model": (ope.get("model") or {}).get("dr"),
                   "rules": (ope.get("rules") or {}).get("dr"), "model_minus_rules": diff or None,
                   "lift_vs_rules": metrics.get("lift_vs_rules"), "ess": metrics.get("ess"),
                   "value_withheld": (ope.get("value") or {}).get("why")}
    exploration = None
    if policy is not None and ope and ope.get("exploration"):
        exploration = {"served_epsilon": policy.slot_epsilon, "slots": ope["exploration"]}
    stamp = lambda k: None if pd.isna(period.get(k)) else pd.Timestamp(period[k]).date().isoformat()
    return _plain({"shop": shop, "version": version, "currency": currency, "policy": kind,
            "as_of": stamp("as_of"), "data_from": stamp("data_from"), "data_to": stamp("data_to"),
            "horizon_days": int(period.get("horizon_days", 60)), **_customer_figures(customers),
            "repeat_auc": metrics.get("repeat_auc"), "holdout": holdout, "exploration": exploration,
            "warnings": warnings, "segments": segments})


def _plain(value: Any) -> Any:
    """JSON's own types throughout: NumPy scalars unwrapped, NaN and infinities as null (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# -- drawing --------------------------------------------------------------------------------------

def _number(v: float | None, spec: str) -> str:
    return "n/a" if v is None or not np.isfinite(v) else format(v, spec)


def _money(v: float | None, signed: bool = False) -> str:
    return _number(v, "+,.2f" if signed else ",.2f")


def _pct(v: float | None) -> str:
    return _number(v, ".0%")


def _share_of(used: float, available: float) -> str:
    if not available:
        return "none left"
    share = used / available
    return "under 1%" if 0 < share < 0.01 else f"{share:.0%}"


def _count(v: float | None) -> str:
    return _number(v, ",.0f")


def _label(y: float, text: str) -> str:
    short = text if len(text) <= 46 else text[:45] + "\u2026"
    return (f'<text x="{_LABEL_W - 8}" y="{y + _ROW_H / 2 + 4:.1f}" text-anchor="end">'
            f'<title>{escape(text)}</title>{escape(short)}</text>')


def _svg(n_rows: int, body: str) -> str:
    width, height = _LABEL_W + _BAR_W + _VALUE_W, max(n_rows, 1) * _ROW_H + 4
    return (f'<svg width="100%" viewBox="0 0 {width} {height}" role="img" '
            f'preserveAspectRatio="xMinYMin meet">{body}</svg>')


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


def _stacked(names: list[str], shares: list[dict[str, float]], colors: dict[str, str]) -> str:
    """100% stacked bars: the mix of a category within each segment."""
    rows = []
    for i, (name, mix) in enumerate(zip(names, shares)):
        y, x = i * _ROW_H, float(_LABEL_W)
        parts = [_label(y, name)]
        for level, color in colors.items():
            share = float(mix.get(level) or 0.0)
            w = _BAR_W * share
            if w <= 0:
                continue
            parts.append(f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{_ROW_H - 8}" '
                         f'fill="{color}"><title>{escape(name)}: {level} {share:.0%}</title></rect>')
            if w >= 30:
                ink = "#fff" if level not in ("unknown", "new") else "#212121"
                parts.append(f'<text x="{x + w / 2:.1f}" y="{y + _ROW_H / 2 + 4:.1f}" text-anchor="middle" '
                             f'style="fill:{ink}">{share:.0%}</text>')
            x += w
        rows.append("".join(parts))
    return _svg(len(names), "".join(rows))


def _legend(colors: dict[str, str]) -> str:
    items = "".join(f'<i style="background:{c}"></i>{escape(k)}' for k, c in colors.items())
    return f'<p class="legend">{items}</p>'


def _card(title: str, chart: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<div class="card"><h3>{escape(title)}</h3>{chart}{note_html}</div>'


def _charts(report: dict[str, Any], money: str) -> str:
    segs = report["segments"]
    names = [str(s["segment_name"]) for s in segs]
    col = lambda c: np.array([np.nan if s.get(c) is None else s[c] for s in segs], dtype=float)
    mix = lambda prefix, levels: [{lv: s.get(f"{prefix}_{lv}", 0.0) for lv in levels} for s in segs]
    cards = [
        _card("Segment size (customers)", _bars(names, col("customers"), [
            f"{_count(v)} ({s:.0%})" for v, s in zip(col("customers"), col("share"))], "#5c6bc0")),
        _card(f"Average spend per customer ({money})", _bars(
            names, col("mean_value"), [_money(v) for v in col("mean_value")], "#26a69a"),
              "Total net spend so far, average per customer."),
        _card("Chance to order again", _bars(names, col("p_repeat"), [
            f"{p:.0%} \u00b7 {e:.2f} orders" for p, e in zip(col("p_repeat"), col("expected_orders"))], "#ef6c00"),
              f"Average chance that a customer orders again within {report['horizon_days']} days, "
              "and the orders expected from each."),
        _card("Journey stage", _stacked(names, mix("stage", JOURNEY_STAGES), _STAGE_COLORS)
              + _legend(_STAGE_COLORS), "Stage of each customer's latest order; see the definitions below."),
    ]
    if report["nps_recorded"]:
        cards.append(_card("NPS mix", _stacked(names, mix("nps", NPS_TIERS), _NPS_COLORS) + _legend(_NPS_COLORS),
                           "Latest survey answer: promoters 9-10, passives 7-8, detractors 0-6; "
                           "unknown = no recent answer."))
    return f'<div class="grid">{"".join(cards)}</div>'


def _interval(est: dict[str, Any] | None, signed: bool = True) -> str:
    if not est:
        return "n/a"
    return (f"<b>{_money(est['value'], signed)}</b> "
            f"<span class=\"note\">(90% interval {_money(est['low'], signed)} to {_money(est['high'], signed)})</span>")


def _box(engine: dict[str, Any]) -> str:
    items = []
    for b in engine["box"]:
        picks = ", ".join(f"{escape(p['action_name'])} ({p['share']:.0%})" for p in b["picks"][:3])
        why = "; ".join(f"{escape(d['words'])} ({d['effect']:+.2f})" for d in b["drivers"])
        why = f"Chosen for: {why}" if why else escape(b["note"].capitalize())
        items.append(f"<li><b>{escape(b['slot'].capitalize())}</b>: {picks}<br><span class=\"note\">{why}"
                     "</span></li>")
    return f"<ul>{''.join(items)}</ul>"


def _use(engine: dict[str, Any], money: str, horizon: int) -> str:
    lines = [f"<li>Cost per order: <b>{_money(engine['cost_per_order'])}</b></li>",
             f"<li>Over the next {horizon} days (~{_count(engine['expected_orders'])} orders expected): "
             f"<b>{_money(engine['horizon_cost'])}</b> {escape(money)}</li>"]
    for u in engine["use"]:
        parts = []
        if u["stock"] is not None:
            parts.append(f"{_count(u['units'])} units, {_share_of(u['units'], u['stock'])} of its stock of "
                         f"{_count(u['stock'])}")
        if u["budget"] is not None:
            parts.append(f"{_money(u['spend'])} {escape(money)}, {_share_of(u['spend'], u['budget'])} of its "
                         f"budget of {_money(u['budget'])}")
        lines.append(f"<li>{escape(u['action_name'])}: {'; '.join(parts)}</li>")
    return f"<ul>{''.join(lines)}</ul>"


def _segment(seg: dict[str, Any], report: dict[str, Any], money: str) -> str:
    sid = int(seg["segment_id"])
    who = (f"{_count(seg['customers'])} customers ({_pct(seg['share'])}). {escape(str(seg.get('description', '')))}")
    head = (f'<section class="segment" id="segment-{sid}"><h3>{escape(str(seg["segment_name"]))}</h3>'
            f'<p class="who">{who}</p>')
    engine = seg.get("engine")
    if engine is None:
        return head + "</section>"
    if "value_per_order" in engine:
        value = (f"<p>Expected value per order: {_interval(engine['value_per_order'], signed=False)}</p>"
                 f"<p class=\"uplift\">Against the playbook: {_interval(engine['vs_rules'])}</p>"
                 f"<p class=\"uplift\">Against the all-default box: {_interval(engine['vs_default'])}</p>")
    else:
        value = "<p>No value estimate: the playbook decides (no learnt engine yet).</p>"
    return (head + f'<div class="action"><h4>Recommended action</h4><p>{escape(seg["action"])}</p></div>'
            '<div class="facts">'
            f'<div class="box"><h4>What the engine gives them</h4>{_box(engine)}</div>'
            f'<div class="value"><h4>What it is worth ({escape(money)} per order)</h4>{value}</div>'
            f'<div class="cost"><h4>What it costs and uses</h4>{_use(engine, money, report["horizon_days"])}'
            "</div></div></section>")


def _table(report: dict[str, Any], money: str) -> str:
    cols = [("Customers", lambda s: _count(s["customers"])), ("Share", lambda s: _pct(s["share"])),
            (f"Avg spend ({money})", lambda s: _money(s["mean_value"])),
            (f"Avg order ({money})", lambda s: _money(s["mean_order_value"])),
            ("Orders each", lambda s: _number(s["orders_per_customer"], ".1f")),
            ("Chance to order again", lambda s: _pct(s["p_repeat"])),
            ("Expected orders", lambda s: _number(s["expected_orders"], ".2f"))]
    if report["returns_recorded"]:
        cols.append(("Return rate", lambda s: _pct(s["return_rate"])))
    head = "<tr><th>Segment</th>" + "".join(f"<th>{escape(c)}</th>" for c, _ in cols) + "</tr>"
    rows = "".join(
        f'<tr><td class="name">{escape(str(s["segment_name"]))}</td>'
        + "".join(f'<td class="n" data-label="{escape(c)}">{f(s)}</td>' for c, f in cols) + "</tr>"
        for s in report["segments"])
    return f'<table class="responsive"><thead>{head}</thead><tbody>{rows}</tbody></table>'


def _summary(report: dict[str, Any]) -> str:
    segs = report["segments"]
    biggest = max(segs, key=lambda s: s["customers"])
    best = max(segs, key=lambda s: -1.0 if s["p_repeat"] is None else s["p_repeat"])
    kpis = [(_count(report["customers"]), "customers"), (str(len(segs)), "segments"),
            (_pct(report["mean_p_repeat"]), f"average chance to order again within {report['horizon_days']} days"),
            (_count(report["expected_orders"]), "orders expected within that time")]
    auc = report.get("repeat_auc")
    if auc is not None and np.isfinite(auc):
        kpis.append((f"{auc:.2f}", "how well that chance ranks customers (AUC; 0.5 = guessing, 1 = perfect)"))
    hold = report.get("holdout")
    if hold and hold.get("model_minus_rules"):
        kpis.append((_money(hold["model_minus_rules"]["value"], signed=True),
                     "per order, engine vs playbook on the holdout"))
    boxes = "".join(f'<div class="kpi"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for v, k in kpis)
    text = (f"The {_count(report['customers'])} customers fall into {len(segs)} segments. The largest is "
            f"<b>{escape(str(biggest['segment_name']))}</b> ({_pct(biggest['share'])} of customers); "
            f"the most likely to order again is <b>{escape(str(best['segment_name']))}</b> "
            f"({_pct(best['p_repeat'])} within {report['horizon_days']} days).")
    return f'<p class="summary">{text}</p><div class="kpis">{boxes}</div>'


def _exploration(report: dict[str, Any], money: str) -> str:
    """Per slot the recommended exploration share (`explorationshare`): the sentence, then the figures."""
    ex = report.get("exploration")
    if not ex:
        return ""
    items = []
    for slot, a in ex["slots"].items():
        figures = (f"recommended share {a['recommended_epsilon']:.0%}; cost {_money(a['cost_per_order'])} {money} "
                   f"per order (one exploring decision gives up {_money(a['gap'])}); model vs {a['fallback']} "
                   f"{_money(a['gain'], signed=True)} \u00b1 {_money(a['half_width'])} (80% interval); "
                   f"orders to settle it {_count(a['orders_needed'])} ({_count(a['judged_orders'])} judged so far, "
                   f"{_count(a['horizon_orders'])} expected in the next {HORIZON_MONTHS} months)")
        items.append(f"<li><b>{escape(slot.capitalize())}</b>: {escape(a['reason'])}<br>"
                     f"<span class=\"note\">{escape(figures)}</span></li>")
    served = ex["served_epsilon"]   # per slot; one number in report.json files written before it was
    shares = set(served.values()) if isinstance(served, dict) else {served}
    if isinstance(served, dict) and all(served[slot] == a["recommended_epsilon"] for slot, a in ex["slots"].items()):
        note = ("Served: each slot explores the share recommended here (train --epsilon auto, the default); "
                "train with --epsilon SHARE to explore one share in every slot instead.")
    else:
        note = (f"Not served: the engine explores {', '.join(f'{e:.0%}' for e in sorted(shares))} of decisions in "
                "every slot, as trained (--epsilon); train with --epsilon auto to serve the recommended shares.")
    return (f'<section class="exploration"><h2>How much to explore</h2><ul>{"".join(items)}</ul>'
            f'<p class="note">{escape(note)}</p></section>')


def _definitions(report: dict[str, Any], money: str) -> str:
    h = report["horizon_days"]
    items = [
        ("Journey stage", "The stage of each customer's latest order: new = one order so far, developing = "
         "2-3 orders, loyal = 4 or more, lapsed = no order for longer than the lapse period."),
        ("Chance to order again", f"The calibrated probability of at least one more order within {h} days "
         "after the as-of date; expected orders counts them."),
        ("Expected value per order", f"What an order is worth to the shop with the engine's box: the customer's "
         f"net revenue ({money}, value minus returns) in the {h} days after the order, minus the box's cost, as "
         "the value model estimates it on each customer's latest order."),
        ("Against the playbook / the all-default box", "The same estimate for the engine's box minus the box "
         "the catalog's rules would send, or the box with every slot at its default. Intervals are 90% "
         "intervals over the segment's customers; they do not include the model's own error, which the "
         "holdout figures below measure."),
        ("Cost and use", f"Cost of the box's actions per order, and over the orders the segment is expected "
         f"to place in the next {h} days, against the catalog's stock and budget."),
    ]
    hold = report.get("holdout")
    if hold and hold.get("model") and hold.get("rules"):
        m, r = hold["model"], hold["rules"]
        engine = ("its value is not given, since too few of those orders resemble its boxes"
                  if hold.get("value_withheld") else
                  f"{_money(m['value'])} per order ({_money(m['low'])} to {_money(m['high'])})")
        items.append(("Holdout", f"The engine was judged on {_count(hold['orders'] or 0)} later orders it was "
                      f"not trained on (doubly robust off-policy estimate): {engine}, against the playbook's "
                      f"{_money(r['value'])} ({_money(r['low'])} to {_money(r['high'])})."))
    body = "".join(f"<dt>{escape(t)}</dt><dd>{escape(d)}</dd>" for t, d in items)
    return f"<h2>How to read this report</h2><dl>{body}</dl>"


def render_report(report: dict[str, Any], *, currency: str | None = None) -> str:
    """The whole page as one HTML string, from :func:`build_report`'s facts.

    ``currency`` names the amounts (default: the one the facts carry, else
    "currency units").
    """
    money = currency or report.get("currency") or "currency units"
    shop = str(report.get("shop") or "your shop")
    title = f"Customer segments and what to send them: {shop}"
    period = (f"Orders from {report['data_from']} to {report['data_to']} \u00b7 as of {report['as_of']} "
              f"\u00b7 horizon {report['horizon_days']} days \u00b7 amounts in {money}")
    if report.get("version"):
        period += f" \u00b7 model version {report['version']}"
    parts = [f"<h1>{escape(title)}</h1>", f'<p class="meta">{escape(period)}</p>']
    if report["warnings"]:
        items = "".join(f"<li>{escape(w)}</li>" for w in report["warnings"])
        parts.append(f'<section class="warnings" role="alert"><h2>Read with care</h2><ul>{items}</ul></section>')
    parts.append(_summary(report))
    if any("engine" in s for s in report["segments"]):
        parts.append("<h2>What to do, segment by segment</h2>")
    else:
        parts.append("<h2>Who the segments are</h2>")
    parts.extend(_segment(s, report, money) for s in report["segments"])
    parts += ["<h2>Segments at a glance</h2>", _charts(report, money),
              "<h2>Segment table</h2>", _table(report, money), _exploration(report, money),
              _definitions(report, money)]
    page = Template(files("insertrec").joinpath("templates/report.html").read_text(encoding="utf-8"))
    return page.substitute(title=escape(title), body="".join(parts))
