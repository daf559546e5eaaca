"""Names shared by every layer: input columns, slots, derived features.

This module has no dependencies so that the catalog (which must reject an
unknown feature name) and the feature builder (which must produce exactly
these) agree by construction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "ACTION_FEATURE_PATTERNS",
    "CATEGORY_VALUES",
    "FEATURES",
    "JOURNEY_STAGES",
    "MAX_CTX_FIELDS",
    "NPS_TIERS",
    "SLOTS",
    "TABLES",
    "context_problems",
    "is_feature_name",
]

SLOTS: tuple[str, ...] = ("packaging", "insert", "coupon")
NPS_TIERS: tuple[str, ...] = ("promoter", "passive", "detractor", "unknown")
JOURNEY_STAGES: tuple[str, ...] = ("new", "developing", "loyal", "lapsed")

# Input tables: required and optional columns (``ctx_*`` on orders are passed through).
TABLES: dict[str, dict[str, tuple[str, ...]]] = {
    "orders": {
        "required": ("order_id", "customer_id", "order_ts", "order_value"),
        "optional": ("n_items", "channel", "categories", "is_gift", "returned_value", "region"),
    },
    "nps": {"required": ("customer_id", "response_ts", "score"), "optional": ()},
    "exposures": {"required": ("order_id", "slot", "action_id"), "optional": ("propensity", "reward")},
    "incidents": {"required": ("customer_id", "type", "ts"), "optional": ("order_id",)},
}

# ``ctx_*`` context columns: each becomes model features, so their names and
# number are bounded wherever they enter (data files, the API, the decision
# log): 3,000 fields or 60 KB names on 40 orders made training take 6 GB.
_CTX_NAME = re.compile(r"ctx_[A-Za-z0-9_]{1,60}")
MAX_CTX_FIELDS = 32
_SHOWN = 64


def context_problems(names: Iterable[str]) -> list[tuple[str, str]]:
    """``(name, reason)`` for every refused ``ctx_*`` name, and for the first one past the limit.

    Names are shortened to 64 characters, so that the error stays one line.
    """
    ctx = [n for n in names if n.startswith("ctx_")]
    shown = [n if len(n) <= _SHOWN else n[:_SHOWN - 3] + "..." for n in ctx]
    out = [(s, "a context field's name must be ctx_ followed by 1 to 60 letters, digits or '_'")
           for n, s in zip(ctx, shown) if not _CTX_NAME.fullmatch(n)]
    if len(ctx) > MAX_CTX_FIELDS:
        out.append((shown[MAX_CTX_FIELDS], f"too many context fields: at most {MAX_CTX_FIELDS} ctx_* names"))
    return out


# Derived, point-in-time features of an order, by kind. "category" values are
# strings, "number" floats (NaN = not known yet), "bool" booleans, "set" a
# pipe-separated string of members (only ``categories``).
FEATURES: dict[str, str] = {
    # the order itself
    "order_value": "number",
    "n_items": "number",
    "channel": "category",
    "region": "category",
    "is_gift": "bool",
    "categories": "set",
    "main_category": "category",
    # who the customer is at the order's timestamp
    "nps_tier": "category",
    "nps_score": "number",
    "journey_stage": "category",
    "prior_orders": "number",
    "recency_days": "number",
    "tenure_days": "number",
    "monetary": "number",          # mean value of prior orders
    "total_spend": "number",
    "return_rate": "number",       # returned / ordered value, over prior orders past the return window
    "gift_share": "number",
    "incidents_90d": "number",
    "days_since_incident": "number",
    "last_incident_type": "category",
}
CATEGORY_VALUES: dict[str, tuple[str, ...]] = {"nps_tier": NPS_TIERS, "journey_stage": JOURNEY_STAGES}

# Per-action history features; <id> is a catalog action id, <D> a contact-cap window.
ACTION_FEATURE_PATTERNS: tuple[str, ...] = ("received_{id}", "days_since_{id}", "received_{id}_{days}d")
_ACTION_FEATURE_RE = re.compile(r"^(received|days_since)_(?P<id>.+?)(_(?P<days>\d+)d)?$")
_SHARE_RE = re.compile(r"^(cat_share|channel_share)_.+$")


def is_feature_name(name: str, action_ids: set[str] | frozenset[str] = frozenset()) -> bool:
    """True if ``name`` is something a catalog condition may test.

    ``ctx_*`` columns are the shop's own context and pass through as they are;
    per-action history features are only valid for actions the catalog defines.
    """
    if name in FEATURES or name.startswith("ctx_") or _SHARE_RE.match(name):
        return True
    m = _ACTION_FEATURE_RE.match(name)
    return bool(m and m.group("id") in action_ids)
