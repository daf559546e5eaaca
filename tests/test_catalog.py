"""catalog.yaml: refusals that point at the right line and field, the `when`
language on frames and on single orders, eligibility with contact caps, and the
rules playbook."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insertrec.catalog import Action, Cap, Catalog, Condition, Membership, Range
from insertrec.errors import CatalogError, InsertrecError
from insertrec.schema import ACTION_FEATURE_PATTERNS, NPS_TIERS

EXAMPLE = Path(__file__).parent / "data" / "catalog_example.yaml"


@pytest.fixture(scope="module")
def example() -> Catalog:
    return Catalog.load(EXAMPLE)


# ---------------------------------------------------------------------------
# Loading the example and the model
# ---------------------------------------------------------------------------


def test_example_catalog_loads_in_catalog_order(example: Catalog) -> None:
    assert list(example.slots) == ["packaging", "insert", "coupon"]
    insert = example.slots["insert"]
    assert insert.action_ids[insert.default_index] == "none"
    assert example.slots["packaging"].action_ids == ("standard_box", "branded_box", "minimal_mailer", "gift_wrap")
    assert example.slots["coupon"].costs.tolist() == [0.0, 3.0, 6.5, 2.5]
    slot, sample = example.action("sample")
    assert slot == "insert"
    assert (sample.stock, sample.budget, sample.cap) == (2500, 5000.0, Cap(count=1, days=90))
    assert sample.note == "Product sample"  # note defaults to the name
    assert example.action("gift_wrap")[1].note == "Gift wrap, no price on the slip"
    assert len(example.rules) == 10 and example.rules[0].choose == {"insert": "apology_note", "coupon": "no_coupon"}
    assert "loyalty_invite" in example.action_ids and len(example.action_ids) == 17
    assert example.file == str(EXAMPLE)


def test_costs_are_read_only(example: Catalog) -> None:
    with pytest.raises(ValueError):
        example.slots["insert"].costs[0] = 99.0


def test_unknown_action_or_index_is_a_user_error(example: Catalog) -> None:
    with pytest.raises(CatalogError, match="no action 'ghost'"):
        example.action("ghost")
    with pytest.raises(CatalogError, match="no action 'sample' in slot 'coupon'"):
        example.slots["coupon"].index_of("sample")
    assert example.slots["insert"].index_of("sample") == 3


def test_cap_windows_cover_caps_and_conditions_on_received_counts() -> None:
    catalog = Catalog.from_yaml(textwrap.dedent("""\
        slots:
          insert:
            actions:
              - {id: none, name: None, cost: 0, default: true}
              - id: sample
                name: Sample
                cost: 2
                max_per_customer: {count: 1, days: 90}
              - id: card
                name: Card
                cost: 0.2
                when: {received_sample_30d: {max: 0}}
        rules:
          - when: {received_card_7d: {max: 0}}
            choose: {insert: card}
        """))
    assert catalog.cap_windows() == {"sample": (30, 90), "card": (7,)}
    assert catalog.action("sample")[1].cap_feature == "received_sample_90d"
    assert "received_{id}_{days}d" in ACTION_FEATURE_PATTERNS


def test_sha256_pins_the_exact_text() -> None:
    text = EXAMPLE.read_text()
    a, b = Catalog.from_yaml(text), Catalog.from_yaml(text)
    changed = Catalog.from_yaml(text.replace("cost: 0.45", "cost: 0.46"))
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    assert changed.sha256 != a.sha256
    assert Catalog.from_yaml(text + "# a comment\n").sha256 != a.sha256
    assert a.text == text


def test_to_dict_reads_back_to_the_same_catalog(example: Catalog) -> None:
    again = Catalog.from_yaml(yaml.safe_dump(example.to_dict(), sort_keys=False))
    assert again.to_dict() == example.to_dict()
    assert [r.when for r in again.rules] == [r.when for r in example.rules]
    assert again.slots["insert"].actions == example.slots["insert"].actions


def test_a_single_slot_catalog_is_allowed() -> None:
    catalog = Catalog.from_yaml("slots:\n  coupon:\n    actions:\n      - {id: no_coupon, name: No, cost: 0, default: true}\n")
    assert list(catalog.slots) == ["coupon"] and catalog.rules == ()
    frame = pd.DataFrame({"order_value": [1.0, 2.0]})
    assert catalog.rules_choice(frame)["coupon"].tolist() == [0, 0]
    assert catalog.rules_fired(frame).tolist() == [-1, -1]


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read") as err:
        Catalog.load(tmp_path / "nope.yaml")
    assert err.value.file.endswith("nope.yaml")
    (tmp_path / "latin.yaml").write_bytes(b"slots: \xe9\n")
    with pytest.raises(CatalogError, match="not UTF-8"):
        Catalog.load(tmp_path / "latin.yaml")


def test_yes_no_are_text_not_booleans() -> None:
    """YAML 1.1 would read Norway's code as False."""
    catalog = Catalog.from_yaml(textwrap.dedent("""\
        slots:
          coupon:
            actions:
              - {id: none, name: None, cost: 0, default: true}
              - {id: nordic, name: Nordic, cost: 1, when: {region: [NO, SE]}}
        """))
    frame = pd.DataFrame({"region": ["NO", "DE", "SE"]})
    assert catalog.eligible(frame)["coupon"][:, 1].tolist() == [True, False, True]


def test_merge_keys_may_be_overridden() -> None:
    catalog = Catalog.from_yaml(textwrap.dedent("""\
        slots:
          coupon:
            actions:
              - &base {id: none, name: None, cost: 0, default: true}
              - <<: *base
                id: c10
                cost: 3
                default: false
        """))
    assert catalog.slots["coupon"].action_ids == ("none", "c10")
    assert catalog.slots["coupon"].costs.tolist() == [0.0, 3.0]


# ---------------------------------------------------------------------------
# Refusals: each names the line and the field
# ---------------------------------------------------------------------------

# Lines 1-9 are fixed; the card's own lines start at line 10, `tail` follows them.
TEMPLATE = """\
slots:
  insert:
    actions:
      - id: none
        name: No insert
        cost: 0
        default: true
      - id: card
        name: Card
{card}
{tail}"""


def catalog_text(card: str = "cost: 0.3", tail: str = "") -> str:
    return TEMPLATE.format(card=textwrap.indent(textwrap.dedent(card), " " * 8).rstrip("\n"),
                           tail=tail)


CARD = "slots.insert.actions[1]"
REFUSALS = [
    # (card lines, tail, field, line, words of the reason)
    ("cost: -1", "", f"{CARD}.cost", 10, "zero or more"),
    ("cost: '2,5'", "", f"{CARD}.cost", 10, "expected a number"),
    ("cost: .inf", "", f"{CARD}.cost", 10, "zero or more"),
    ("cost: true", "", f"{CARD}.cost", 10, "expected a number"),
    ("note: hi", "", f"{CARD}.cost", 8, "missing 'cost'"),
    ("cost: 0.3\nstock: 2.5", "", f"{CARD}.stock", 11, "whole number"),
    ("cost: 0.3\nstock: -3", "", f"{CARD}.stock", 11, "zero or more"),
    ("cost: 0.3\nbudget: lots", "", f"{CARD}.budget", 11, "expected a number"),
    ("cost: 0.3\ndefualt: true", "", f"{CARD}.defualt", 11, "unknown key 'defualt'"),
    ("cost: 0.3\ndefault: 'yes'", "", f"{CARD}.default", 11, "true or false"),
    ("cost: 0.3\nmax_per_customer: {count: 0, days: 90}", "", f"{CARD}.max_per_customer.count", 11, "at least 1"),
    ("cost: 0.3\nmax_per_customer: {count: 1}", "", f"{CARD}.max_per_customer.days", 11, "missing 'days'"),
    ("cost: 0.3\nmax_per_customer:\n  count: 1\n  days: 90d", "", f"{CARD}.max_per_customer.days", 13,
     "whole number"),
    ("cost: 0.3\nmax_per_customer: 1", "", f"{CARD}.max_per_customer", 11, "expected a mapping"),
    ("cost: 0.3\nwhen:\n  nps_teir: [promoter]", "", f"{CARD}.when.nps_teir", 12, "did you mean 'nps_tier'"),
    ("cost: 0.3\nwhen:\n  nps_tier:\n    - promoter\n    - pasive", "", f"{CARD}.when.nps_tier[1]", 14,
     "'pasive' is not a nps_tier"),
    ("cost: 0.3\nwhen: {journey_stage: {not: [loyal, lost]}}", "", f"{CARD}.when.journey_stage.not[1]", 11,
     "'lost' is not a journey_stage"),
    ("cost: 0.3\nwhen: [nps_tier]", "", f"{CARD}.when", 11, "expected a mapping"),
    ("cost: 0.3\nwhen: {order_value: {between: [1, 2]}}", "", f"{CARD}.when.order_value.between", 11,
     "unknown key 'between'"),
    ("cost: 0.3\nwhen: {order_value: {min: lots}}", "", f"{CARD}.when.order_value.min", 11, "expected a number"),
    ("cost: 0.3\nwhen: {order_value: {min: 50, max: 20}}", "", f"{CARD}.when.order_value", 11, "above max"),
    ("cost: 0.3\nwhen: {order_value: {}}", "", f"{CARD}.when.order_value", 11, "empty test"),
    ("cost: 0.3\nwhen: {order_value: big}", "", f"{CARD}.when.order_value", 11, "is a number"),
    ("cost: 0.3\nwhen: {channel: {min: 1}}", "", f"{CARD}.when.channel", 11, "min/max need a number"),
    ("cost: 0.3\nwhen: {is_gift: yes}", "", f"{CARD}.when.is_gift", 11, "true or false"),
    ("cost: 0.3\nwhen: {channel: []}", "", f"{CARD}.when.channel", 11, "matches nothing"),
    ("cost: 0.3\nwhen: {channel: null}", "", f"{CARD}.when.channel", 11, "got nothing"),
    ("cost: 0.3\nwhen: {categories: ['a|b']}", "", f"{CARD}.when.categories[0]", 11, "contain '|'"),
    ("cost: 0.3\nwhen:\n  any:\n    - nps_tier: [promoter]\n    - fooo: 1", "", f"{CARD}.when.any[1].fooo", 14,
     "unknown feature 'fooo'"),
    ("cost: 0.3\nwhen: {any: []}", "", f"{CARD}.when.any", 11, "at least one"),
    ("cost: 0.3\nwhen: {all: [nps_tier]}", "", f"{CARD}.when.all[0]", 11, "expected a mapping"),
    ("cost: 0.3\nwhen: {received_ghost_30d: {max: 0}}", "", f"{CARD}.when.received_ghost_30d", 11,
     "unknown feature"),
    ("cost: 0\ndefault: true\nwhen: {is_gift: true}", "", f"{CARD}.when", 12, "always eligible"),
    ("cost: 0\ndefault: true", "", f"{CARD}.default", 11, "second default; 'none'"),
    ("cost: 0.3\ncost: 0.4", "", "cost", 11, "duplicate key 'cost'"),
    ("cost: [0.3", "", None, 11, "started on line 10"),
    ("cost: 0.3\n\twhen: x", "", None, 11, "not valid YAML"),
    # whole slots
    ("cost: 0.3", "  inserts:\n    actions: []\n", "slots.inserts", 11, "unknown slot 'inserts'"),
    ("cost: 0.3", "  coupon:\n    actions: []\n", "slots.coupon.actions", 12, "at least one action"),
    ("cost: 0.3", "  coupon:\n", "slots.coupon", 11, "expected a mapping"),
    ("cost: 0.3", "  coupon:\n    actions:\n      - {id: c10, name: C, cost: 3}\n", "slots.coupon.actions", 12,
     "no action has 'default: true'"),
    ("cost: 0.3", "  coupon:\n    actions:\n      - {id: card, name: C, cost: 0, default: true}\n",
     "slots.coupon.actions[0].id", 13, "first at slots.insert.actions[1].id, line 8"),
    ("cost: 0.3", "  coupon:\n    actions:\n      - {id: promo_30d, name: P, cost: 1, default: true}\n",
     "slots.coupon.actions[0].id", 13, "invalid id"),
    ("cost: 0.3", "  coupon:\n    actions:\n      - name: No coupon\n        cost: 0\n", "slots.coupon.actions[0].id",
     13, "missing 'id'"),
    ("cost: 0.3", "  coupon:\n    actions:\n      - {id: c, cost: 0, default: true}\n", "slots.coupon.actions[0].name",
     13, "missing 'name'"),
    # top level
    ("cost: 0.3", "extras: 1\n", "extras", 11, "unknown key 'extras'"),
    ("cost: 0.3", "rules: {a: 1}\n", "rules", 11, "expected a list"),
    # rules
    ("cost: 0.3", "rules:\n  - when: {nps_tier: [promoter]}\n    choose: {insert: ghost}\n", "rules[0].choose.insert",
     13, "'ghost' is not an action of slot 'insert'"),
    ("cost: 0.3", "rules:\n  - choose: {insert: card}\n  - when: {nps_tier: [passive]}\n    choose:\n      coupon: c10\n",
     "rules[1].choose.coupon", 15, "unknown slot 'coupon'"),
    ("cost: 0.3", "rules:\n  - choose: {insert: card}\n  - when: {nps_tier: [passive]}\n", "rules[1].choose", 13,
     "missing 'choose'"),
    ("cost: 0.3", "rules:\n  - when: {nps_tier: [passive]}\n    choose: {}\n", "rules[0].choose", 13, "names no slot"),
    ("cost: 0.3", "rules:\n  - when: {nps_tier: pasive}\n    choose: {insert: card}\n", "rules[0].when.nps_tier", 12,
     "'pasive' is not a nps_tier"),
    ("cost: 0.3", "rules:\n  - when: {nps_tier: [promoter]}\n    choose: {insert: card}\n    why: because\n",
     "rules[0].why", 14, "unknown key 'why'"),
]


@pytest.mark.parametrize(("card", "tail", "field", "line", "reason"), REFUSALS,
                         ids=[f"{r[2]}@{r[3]}:{r[4]}" for r in REFUSALS])
def test_refusal_names_line_and_field(card: str, tail: str, field: str | None, line: int, reason: str) -> None:
    text = catalog_text(card, tail)
    with pytest.raises(CatalogError) as err:
        Catalog.from_yaml(text, file="shop/catalog.yaml")
    assert (err.value.field, err.value.line) == (field, line), str(err.value)
    assert reason in err.value.reason
    message = str(err.value)
    assert message.startswith(f"shop/catalog.yaml line {line}") and "\n" not in message


def test_every_problem_of_a_catalog_is_listed_at_once() -> None:
    """A marketer fixing typos wants them all in one run, each with its line and field."""
    text = """slots:
  insert:
    actions:
      - {id: none, name: None, cost: 0, default: true}
      - id: card
        name: Card
        cots: 0.3
      - id: flyer
        name: Flyer
        cost: -1
        when: {nps_teir: [promoter], channel: {mn: 3}}
  coupon:
    actions:
      - {id: c10, name: Ten off, cost: 0.5}
  packaging:
    actions:
      - {id: box, name: Box, cost: 0.4, default: true}
rules:
  - when: {journey_stage: [lost]}
    choose: {insert: ghost, coupon: c10, packaging: box}
"""
    with pytest.raises(CatalogError) as err:
        Catalog.from_yaml(text, file="shop/catalog.yaml")
    found = [(p.field, p.line) for p in err.value.problems]
    assert found == [
        ("slots.insert.actions[1].cots", 7), ("slots.insert.actions[1].cost", 5),  # the action's line
        ("slots.insert.actions[2].when.nps_teir", 11), ("slots.insert.actions[2].when.channel.mn", 11),
        ("slots.insert.actions[2].cost", 10), ("slots.coupon.actions", 13),
        ("rules[0].when.journey_stage[0]", 19), ("rules[0].choose.insert", 20)], err.value.details()
    message = str(err.value)
    assert message.startswith("shop/catalog.yaml line 7 field 'slots.insert.actions[1].cots'")
    assert "(and 7 more problems; see the full list)" in message and "\n" not in message
    details = err.value.details().splitlines()
    assert len(details) == 8 and "did you mean 'nps_tier'" in details[2] and "'default: true'" in details[5]


def test_slot_defaults_are_checked_even_when_an_action_is_refused() -> None:
    text = """slots:
  insert:
    actions:
      - {name: A, cost: 0, default: true}
      - {id: b, name: B, cost: 0, default: true}
  coupon:
    actions:
      - {id: c, name: C, cost: -1}
"""
    with pytest.raises(CatalogError) as err:
        Catalog.from_yaml(text)
    assert [(p.field, p.reason.split(";")[0]) for p in err.value.problems] == [
        ("slots.insert.actions[0].id", "missing 'id'"),
        ("slots.insert.actions[1].default", "a second default"),
        ("slots.coupon.actions[0].cost", "must be zero or more, got -1"),
        ("slots.coupon.actions", "no action has 'default: true'")]
    assert "actions[0] is already this slot's default" in err.value.problems[1].reason


def test_the_cli_prints_every_catalog_problem(tmp_path, capsys) -> None:
    from insertrec.cli import main

    (tmp_path / "orders.csv").write_text("order_id,customer_id,order_ts,order_value\no1,c1,2024-01-01,10\n")
    (tmp_path / "catalog.yaml").write_text(catalog_text("cots: 0.3\nwhen: {nps_teir: [promoter]}"))
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--no-mlflow"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("insertrec: ") and "more problems" in lines[0]
    assert any("'cots'" in line for line in lines[1:]) and any("nps_teir" in line for line in lines[1:])
    assert any("missing 'cost'" in line for line in lines[1:])


def test_the_template_itself_is_valid() -> None:
    """Guards the refusal table: each refusal comes from its one change."""
    catalog = Catalog.from_yaml(catalog_text())
    assert catalog.slots["insert"].action_ids == ("none", "card")


@pytest.mark.parametrize(("text", "reason"), [
    ("", "empty"),
    ("- slots", "expected a mapping"),
    ("rules: []\n", "missing 'slots'"),
    ("slots: {}\n", "no slots"),
    ("slots:\n  {1: x}\n", "keys must be text"),
])
def test_refusal_of_the_whole_file(text: str, reason: str) -> None:
    with pytest.raises(InsertrecError, match=reason):
        Catalog.from_yaml(text)


# ---------------------------------------------------------------------------
# The condition language
# ---------------------------------------------------------------------------


def when(spec: dict, action_ids: tuple[str, ...] = ()) -> Condition:
    """Parse a `when` the way the catalog does, from a Python dict."""
    actions = [{"id": "none", "name": "None", "cost": 0, "default": True},
               {"id": "probe", "name": "Probe", "cost": 0, "when": spec}]
    actions += [{"id": a, "name": a, "cost": 0} for a in action_ids]
    catalog = Catalog.from_yaml(yaml.safe_dump({"slots": {"insert": {"actions": actions}}}))
    return catalog.action("probe")[1].when


FRAME = pd.DataFrame({
    "nps_tier": ["promoter", "passive", "detractor", "unknown", "promoter"],
    "order_value": [10.0, 25.0, np.nan, 40.0, 25.0],
    "is_gift": [True, False, False, True, False],
    "categories": ["apparel|shoes", "home", "", None, "shoes"],
    "channel": ["web", "marketplace", None, "app", "web"],
    "ctx_segment": ["a", "b", "a", None, "c"],
})


@pytest.mark.parametrize(("spec", "expected"), [
    ({}, [1, 1, 1, 1, 1]),
    ({"nps_tier": ["promoter", "passive"]}, [1, 1, 0, 0, 1]),
    ({"nps_tier": "passive"}, [0, 1, 0, 0, 0]),
    ({"nps_tier": {"in": ["detractor"]}}, [0, 0, 1, 0, 0]),
    ({"nps_tier": {"not": ["promoter"]}}, [0, 1, 1, 1, 0]),
    ({"is_gift": True}, [1, 0, 0, 1, 0]),
    ({"is_gift": False}, [0, 1, 1, 0, 1]),
    ({"order_value": {"min": 25}}, [0, 1, 0, 1, 1]),           # inclusive; NaN is not "at least 25"
    ({"order_value": {"max": 25}}, [1, 1, 0, 0, 1]),
    ({"order_value": {"min": 20, "max": 30}}, [0, 1, 0, 0, 1]),
    ({"order_value": {"min": 20, "not": [40]}}, [0, 1, 0, 0, 1]),
    ({"order_value": 25}, [0, 1, 0, 0, 1]),
    ({"categories": ["shoes", "garden"]}, [1, 0, 0, 0, 1]),     # any member
    ({"categories": "home"}, [0, 1, 0, 0, 0]),
    ({"categories": ["appar"]}, [0, 0, 0, 0, 0]),               # members, not substrings
    ({"categories": {"not": ["shoes"]}}, [0, 1, 1, 1, 0]),      # none of them; missing has none
    ({"channel": {"not": ["marketplace"]}}, [1, 0, 1, 1, 1]),   # missing channel is not a marketplace
    ({"ctx_segment": ["a"]}, [1, 0, 1, 0, 0]),
    ({"ctx_unknown_column": ["a"]}, [0, 0, 0, 0, 0]),           # a column the data lacks: missing
    ({"ctx_unknown_column": {"not": ["a"]}}, [1, 1, 1, 1, 1]),
    ({"ctx_unknown_column": {"min": 0}}, [0, 0, 0, 0, 0]),
    ({"ctx_segment": {"min": 0}}, [0, 0, 0, 0, 0]),             # text is never a number
    ({"any": [{"nps_tier": ["detractor"]}, {"order_value": {"min": 40}}]}, [0, 0, 1, 1, 0]),
    ({"all": [{"nps_tier": ["promoter"]}, {"is_gift": False}]}, [0, 0, 0, 0, 1]),
    ({"nps_tier": ["promoter"], "any": [{"is_gift": True}, {"channel": "app"}]}, [1, 0, 0, 0, 0]),
    ({"any": [{"all": [{"channel": "web"}, {"order_value": {"min": 20}}]}, {"nps_tier": "unknown"}]},
     [0, 0, 0, 1, 1]),
])
def test_condition_semantics(spec: dict, expected: list[int]) -> None:
    condition = when(spec)
    assert condition.mask(FRAME).astype(int).tolist() == expected
    records = FRAME.to_dict("records")
    assert [int(condition.compile()(r)) for r in records] == expected
    assert [int(condition.compile()({k: v for k, v in r.items() if v is not None})) for r in records] == expected


def test_category_values_from_numbers_match_text_columns() -> None:
    condition = when({"region": [75, 92]})
    assert condition.mask(pd.DataFrame({"region": ["75", "13", "92"]})).tolist() == [True, False, True]


def test_holds_accepts_categories_as_a_list() -> None:
    """The HTTP API receives categories as a JSON list."""
    condition = when({"categories": ["shoes"]})
    assert condition.compile()({"categories": ["apparel", "shoes"]})
    assert not condition.compile()({"categories": ["apparel"]})
    assert not condition.compile()({"categories": []})


def test_condition_features_lists_what_it_reads() -> None:
    condition = when({"nps_tier": ["promoter"], "any": [{"received_c10_30d": {"max": 0}}, {"ctx_x": 1}]},
                     action_ids=("c10",))
    assert condition.features() == {"nps_tier", "received_c10_30d", "ctx_x"}


# mask and holds must agree value by value, whatever the column dtypes turn out to be.
CTX_VALUES = [st.integers(0, 2), st.floats(0, 2, allow_nan=False), st.sampled_from(["a", "b", "1"]), st.booleans()]
FEATURE_VALUES = {
    "order_value": st.one_of(st.integers(-3, 3), st.floats(-3, 3, allow_nan=False)),
    "nps_tier": st.sampled_from(NPS_TIERS),
    "channel": st.sampled_from(["web", "app", "marketplace"]),
    "is_gift": st.booleans(),
    "categories": st.lists(st.sampled_from(["apparel", "shoes", "home"]), max_size=3).map("|".join),
    "ctx_mix": st.one_of(*CTX_VALUES),
}
NUMERIC = ("order_value", "ctx_mix")


@st.composite
def leaves(draw: st.DrawFn) -> Membership | Range:
    feature = draw(st.sampled_from(sorted(FEATURE_VALUES)))
    if feature in NUMERIC and draw(st.booleans()):
        low, high = draw(st.one_of(st.none(), st.floats(-3, 3))), draw(st.one_of(st.none(), st.floats(-3, 3)))
        return Range(feature, low, high)
    values = draw(st.lists(FEATURE_VALUES[feature], min_size=1, max_size=3))
    if feature == "categories":
        values = [m for v in values for m in v.split("|") if m] or ["home"]
    return Membership(feature, tuple(values), negate=draw(st.booleans()))


conditions = st.recursive(
    leaves(),
    lambda inner: st.builds(Condition, st.lists(inner, min_size=1, max_size=3).map(tuple), st.booleans()),
    max_leaves=8,
).map(lambda c: c if isinstance(c, Condition) else Condition((c,)))


@st.composite
def order_rows(draw: st.DrawFn) -> list[dict]:
    """Rows whose columns are sometimes all one type (bool, float, text), sometimes mixed,
    with gaps as absent keys, None or NaN, or absent from every row."""
    values = dict(FEATURE_VALUES, ctx_mix=draw(st.sampled_from(CTX_VALUES + [FEATURE_VALUES["ctx_mix"]])))
    modes = {feature: draw(st.sampled_from(["full", "gaps", "absent"])) for feature in values}
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        row = {}
        for feature, strategy in values.items():
            gap = modes[feature] == "absent" or (modes[feature] == "gaps" and draw(st.booleans()))
            if not gap:
                row[feature] = draw(strategy)
            elif modes[feature] == "gaps" and draw(st.booleans()):
                row[feature] = draw(st.sampled_from([None, math.nan]))
        rows.append(row)
    return rows


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(condition=conditions, rows=order_rows())
def test_mask_and_holds_agree(condition: Condition, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows, index=range(len(rows)))  # keeps the rows even when no key is present
    assert condition.mask(frame).tolist() == [condition.compile()(r) for r in rows]


# ---------------------------------------------------------------------------
# Eligibility and caps
# ---------------------------------------------------------------------------


def test_contact_cap_counts_what_the_customer_received(example: Catalog) -> None:
    frame = pd.DataFrame({
        "channel": ["web"] * 4,
        "order_value": [30.0] * 4,
        "received_sample_90d": [0.0, 1.0, np.nan, 3.0],
    })
    sample = example.slots["insert"].index_of("sample")
    assert example.eligible(frame)["insert"][:, sample].tolist() == [True, False, True, False]
    # no count column at all: nothing received yet
    assert example.eligible(frame.drop(columns="received_sample_90d"))["insert"][:, sample].all()
    # the cap and `when` both apply
    frame["channel"] = "marketplace"
    assert not example.eligible(frame)["insert"][:, sample].any()


def test_cap_count_above_one() -> None:
    action = Action("c10", "10% off", 3.0, cap=Cap(count=2, days=60))
    frame = pd.DataFrame({"received_c10_60d": [0, 1, 2, 5]})
    assert action.eligible(frame).tolist() == [True, True, False, False]
    assert [action.compile()(r) for r in frame.to_dict("records")] == [True, True, False, False]


def test_defaults_are_always_eligible_and_shapes_follow_the_catalog(example: Catalog) -> None:
    frame = pd.DataFrame({"channel": ["marketplace", "web"]})
    eligible = example.eligible(frame)
    for name, slot in example.slots.items():
        assert eligible[name].shape == (2, len(slot.actions)) and eligible[name].dtype == bool
        assert eligible[name][:, slot.default_index].all()
    empty = example.eligible(frame.iloc[:0])
    assert empty["insert"].shape == (0, 9)


# Orders as the feature builder would describe them, for the frame-vs-one-order checks.
ORDER = st.fixed_dictionaries({
    "nps_tier": st.sampled_from(NPS_TIERS),
    "journey_stage": st.sampled_from(["new", "developing", "loyal", "lapsed"]),
    "channel": st.sampled_from(["web", "app", "marketplace"]),
    "is_gift": st.booleans(),
    "order_value": st.one_of(st.just(math.nan), st.floats(0, 120)),
    "n_items": st.integers(1, 4).map(float),
    "categories": st.lists(st.sampled_from(["apparel", "shoes", "home", "beauty"]), max_size=2).map("|".join),
    "incidents_90d": st.integers(0, 2).map(float),
    "return_rate": st.one_of(st.just(math.nan), st.floats(0, 1)),
    "ctx_packaging_pref": st.sampled_from(["minimal", "standard"]),
    "received_sample_90d": st.integers(0, 2).map(float),
    "received_next_order_10_60d": st.integers(0, 3).map(float),
})


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(ORDER, min_size=1, max_size=10))
def test_one_order_paths_match_the_frame_paths(example: Catalog, rows: list[dict]) -> None:
    frame = pd.DataFrame.from_records(rows)
    eligible, choice, assessed = example.eligible(frame), example.rules_choice(frame), example.assess(frame)
    together = example.assess_many(rows)   # the service's micro-batches
    assert together.eligible.dtype == bool and together.eligible.tolist() == assessed.eligible.tolist()
    assert together.playbook.tolist() == assessed.playbook.tolist()
    for i, record in enumerate(rows):
        one = example.assess_one(record)
        assert one.eligible.tolist() == assessed.eligible[i].tolist()
        assert one.playbook.tolist() == assessed.playbook[i].tolist()
    for slot, picks in choice.items():  # a rule never picks an ineligible action
        assert eligible[slot][np.arange(len(rows)), picks].all()


# ---------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------


def ids(catalog: Catalog, choice: dict[str, np.ndarray]) -> list[dict[str, str]]:
    n = len(next(iter(choice.values())))
    return [{s: catalog.slots[s].action_ids[choice[s][i]] for s in choice} for i in range(n)]


def test_rules_playbook(example: Catalog) -> None:
    frame = pd.DataFrame({
        "nps_tier": ["detractor", "promoter", "promoter", "passive", "unknown", "unknown"],
        "incidents_90d": [0.0, 0.0, 0.0, 0.0, 2.0, 0.0],
        "channel": ["web", "web", "marketplace", "web", "web", "web"],
        "journey_stage": ["loyal", "developing", "developing", "loyal", "new", "lapsed"],
        "is_gift": [False] * 6,
    })
    assert example.rules_fired(frame).tolist() == [0, 3, 3, 4, 0, -1]
    assert ids(example, example.rules_choice(frame)) == [
        {"packaging": "standard_box", "insert": "apology_note", "coupon": "no_coupon"},
        {"packaging": "standard_box", "insert": "referral_card", "coupon": "no_coupon"},
        # referral cards are suppressed on the marketplace: the rule falls back to the default
        {"packaging": "standard_box", "insert": "none", "coupon": "no_coupon"},
        {"packaging": "standard_box", "insert": "none", "coupon": "next_order_10"},
        {"packaging": "standard_box", "insert": "apology_note", "coupon": "no_coupon"},
        {"packaging": "standard_box", "insert": "none", "coupon": "no_coupon"},
    ]


def test_capped_rule_choice_falls_back_to_default(example: Catalog) -> None:
    frame = pd.DataFrame({"nps_tier": ["passive", "passive"], "received_next_order_10_60d": [1.0, 2.0]})
    assert example.rules_choice(frame)["coupon"].tolist() == [1, 0]
    record = frame.iloc[1].to_dict()
    assert example.assess_one(record).playbook[list(example.slots).index("coupon")] == 0
    assert example.rules_fired(frame)[1] == 4


def test_first_matching_rule_wins_even_when_its_choice_is_ineligible() -> None:
    """A later rule does not step in: the playbook's order is the marketer's priority."""
    catalog = Catalog.from_yaml(textwrap.dedent("""\
        slots:
          insert:
            actions:
              - {id: none, name: None, cost: 0, default: true}
              - {id: gift_card, name: Gift card, cost: 1, when: {is_gift: true}}
              - {id: card, name: Card, cost: 0.2}
        rules:
          - when: {nps_tier: [promoter]}
            choose: {insert: gift_card}
          - choose: {insert: card}
        """))
    frame = pd.DataFrame({"nps_tier": ["promoter", "promoter", "passive"], "is_gift": [True, False, False]})
    assert catalog.rules_fired(frame).tolist() == [0, 0, 1]
    assert catalog.rules_choice(frame)["insert"].tolist() == [1, 0, 2]
    assert catalog.rules[1].line == 10
