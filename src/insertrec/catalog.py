"""The marketer's catalog (catalog.yaml): slots, actions, eligibility, contact caps, rules.

The module has three parts, in this order:

1. YAML with line numbers: the file is read with a loader that remembers the
   line of every key and list item, so that every refusal is a
   ``CatalogError`` naming the line and the field (``slots.insert.actions[2].cost``).
   Indices in field paths count from 0, as in the rules' indices.
2. The condition language of ``when``, evaluated vectorised on a frame of
   order features (``mask``) or on one order's feature row given as a dict
   (``compile``: a closure over the condition's constants, built once, the
   HTTP fast path). Both follow the same rules, value by value.
3. The catalog model: ``Cap``, ``Action``, ``Slot``, ``Rule``, ``Catalog``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, reduce
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, NoReturn, TypeVar

import numpy as np
import pandas as pd
import yaml

from insertrec.errors import CatalogError
from insertrec.schema import CATEGORY_VALUES, FEATURES, SLOTS, is_feature_name

__all__ = ["Action", "Assessment", "Cap", "Catalog", "Check", "Condition", "Membership", "Range", "Rule", "Slot"]

# ---------------------------------------------------------------------------
# 1. YAML with line numbers
# ---------------------------------------------------------------------------

Check = Callable[[Mapping[str, Any]], bool]  # a compiled condition: one order's feature row (a dict) -> holds?
_T = TypeVar("_T")

_BOOL_TAG = "tag:yaml.org,2002:bool"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Map(dict[str, Any]):
    """A YAML mapping that remembers its own line and the line of each key."""

    line: int
    key_lines: dict[str, int]


class _Seq(list[Any]):
    """A YAML list that remembers its own line and the line of each item."""

    line: int
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that keeps line numbers and refuses duplicate keys.

    YAML 1.1 reads yes/no/on/off as booleans, so ``region: [NO, SE]`` would
    test Norway as ``False``; here only true/false are booleans.
    """

    # types-PyYAML declares this an instance attribute; PyYAML reads and copies it on the class, as here.
    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {  # type: ignore[misc]
        first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, text: str, file: str):
        super().__init__(text)
        self.file = file

    def construct_line_map(self, node: yaml.MappingNode) -> _Map:
        # Keys merged in with `<<: *anchor` may be overridden; the mapping's own keys may not repeat.
        own = sum(1 for key_node, _ in node.value if key_node.tag != _MERGE_TAG)
        self.flatten_mapping(node)
        merged = len(node.value) - own
        data, own_keys = _Map(), set()
        data.line, data.key_lines = node.start_mark.line + 1, {}
        for i, (key_node, value_node) in enumerate(node.value):
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise CatalogError(f"keys must be text, got {key!r}", line=line, file=self.file)
            if i >= merged:
                if key in own_keys:
                    raise CatalogError(f"duplicate key {key!r}", field=key, line=line, file=self.file)
                own_keys.add(key)
            data[key] = self.construct_object(value_node, deep=True)
            data.key_lines[key] = line
        return data

    def construct_line_seq(self, node: yaml.SequenceNode) -> _Seq:
        data = _Seq(self.construct_object(item, deep=True) for item in node.value)
        data.line = node.start_mark.line + 1
        data.item_lines = [item.start_mark.line + 1 for item in node.value]
        return data


_LineLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))
_LineLoader.add_constructor("tag:yaml.org,2002:map", _LineLoader.construct_line_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _LineLoader.construct_line_seq)


def _read_yaml(text: str, file: str) -> Any:
    loader = _LineLoader(text, file)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        reason = err.problem or err.context or "syntax error"
        if err.context and err.context_mark and mark and err.context_mark.line != mark.line:
            # e.g. an unclosed bracket is noticed at the end of the file; say where it opened
            reason += f" ({err.context} started on line {err.context_mark.line + 1})"
        raise CatalogError(f"not valid YAML: {reason}", line=mark.line + 1 if mark else None,
                           file=file) from None
    except yaml.YAMLError as err:
        raise CatalogError(f"not valid YAML: {err}", file=file) from None
    finally:
        loader.dispose()


class _Refused(Exception):
    """A value was refused and its problem recorded; unwinds to the nearest ``_At.attempt``."""


@dataclass(frozen=True)
class _At:
    """Where a value sits in catalog.yaml (dotted field, line): the address of a refusal.

    Every address of one parse shares ``problems``, so that a catalog with
    several mistakes is refused once with all of them: ``fail`` records a
    problem and abandons the value at hand, ``attempt`` goes on with the next
    one, and ``refuse_if_any`` abandons a value when any of its parts failed.
    """

    file: str
    field: str
    line: int | None
    problems: list[CatalogError] = dataclasses.field(default_factory=list, compare=False, repr=False)

    def note(self, reason: str) -> None:
        """Record a problem without abandoning the value (it is still refused in the end)."""
        self.problems.append(CatalogError(reason, field=self.field or None, line=self.line, file=self.file))

    def fail(self, reason: str) -> NoReturn:
        self.note(reason)
        raise _Refused

    def attempt(self, parse: Callable[..., _T], *args: Any) -> _T | None:
        """``parse(*args)``, or None when it failed (its problems recorded)."""
        try:
            return parse(*args)
        except _Refused:
            return None

    def refuse_if_any(self, since: int) -> None:
        """Abandon the value at hand if problems were recorded since there were ``since``."""
        if len(self.problems) > since:
            raise _Refused

    def key(self, mapping: _Map, key: str) -> _At:
        """The address of ``mapping[key]``; a missing key points at the mapping itself."""
        return _At(self.file, f"{self.field}.{key}" if self.field else key,
                   mapping.key_lines.get(key, mapping.line), self.problems)

    def item(self, seq: _Seq, index: int) -> _At:
        return _At(self.file, f"{self.field}[{index}]", seq.item_lines[index], self.problems)


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _mapping(value: Any, at: _At, allowed: tuple[str, ...] | None = None,
             required: tuple[str, ...] = ()) -> _Map:
    if not isinstance(value, _Map):
        at.fail(f"expected a mapping (key: value), got {_describe(value)}")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                at.key(value, key).note(f"unknown key {key!r}; expected one of {', '.join(allowed)}")
    missing = [key for key in required if key not in value]
    for key in missing:
        at.key(value, key).note(f"missing {key!r}")
    if missing:
        raise _Refused
    return value


def _sequence(value: Any, at: _At) -> _Seq:
    if not isinstance(value, _Seq):
        at.fail(f"expected a list, got {_describe(value)}")
    return value


def _text(value: Any, at: _At) -> str:
    if not isinstance(value, str) or not value.strip():
        at.fail(f"expected a non-empty text, got {_describe(value)}")
    return value


def _amount(value: Any, at: _At, *, whole: bool = False) -> Any:
    """A cost, stock or budget: a finite number, zero or more (stock: whole units)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        at.fail(f"expected a number, got {_describe(value)}")
    if not math.isfinite(value) or value < 0:
        at.fail(f"must be zero or more, got {value!r}")
    if whole and not isinstance(value, int):
        at.fail(f"expected a whole number, got {value!r}")
    return value if whole else float(value)


def _positive_int(value: Any, at: _At) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        at.fail(f"expected a whole number of at least 1, got {_describe(value)}")
    return value


def _flag(value: Any, at: _At) -> bool:
    if not isinstance(value, bool):
        at.fail(f"expected true or false, got {_describe(value)}")
    return value


# ---------------------------------------------------------------------------
# 2. The condition language
# ---------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    return (value is None or value is pd.NA or value is pd.NaT
            or (isinstance(value, (float, np.floating)) and math.isnan(value)))


def _number(value: Any) -> float:
    """A value as a number for min/max and caps; text is never a number, missing is NaN."""
    if isinstance(value, (int, float, np.number, np.bool_)):  # bool is an int; NaN stays NaN
        return float(value)
    return math.nan


def _numbers(column: pd.Series) -> np.ndarray:
    """``_number`` over a column, vectorised for the typed columns the feature builder produces."""
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=float, na_value=np.nan)
    if column.dtype == object:  # mixed types: a value's own type decides, as in `compile`
        return np.fromiter((_number(v) for v in column), dtype=float, count=len(column))
    return np.full(len(column), np.nan)


@dataclass(frozen=True)
class Membership:
    """``feature: [a, b]`` (or a single value, or ``{in: ...}``); ``{not: ...}`` negates.

    For a pipe-separated set feature (``categories``) it holds when the order
    has any of the values. A missing value is in no list, so ``not`` holds for it.
    """

    feature: str
    values: tuple[Any, ...]
    negate: bool = False

    @cached_property
    def _lookup(self) -> frozenset[Any]:
        return frozenset(self.values)

    @cached_property
    def _is_set(self) -> bool:
        return FEATURES.get(self.feature) == "set"

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        column = frame.get(self.feature)
        if column is None:
            hit = np.zeros(len(frame), dtype=bool)
        elif self._is_set:
            padded = "|" + column.astype("string") + "|"
            hit = reduce(np.logical_or,
                         (padded.str.contains(f"|{v}|", regex=False).to_numpy(dtype=bool, na_value=False)
                          for v in self.values))
        else:
            hit = column.isin(list(self.values)).to_numpy(dtype=bool, na_value=False)
        return ~hit if self.negate else hit

    def compile(self) -> Check:
        feature, lookup, negate = self.feature, self._lookup, self.negate
        if self._is_set:
            def holds_set(row: Mapping[str, Any]) -> bool:
                value = row.get(feature)
                if isinstance(value, str):
                    members = value.split("|")
                elif isinstance(value, (list, tuple, set, frozenset)):  # the HTTP API sends a list
                    members = [str(v) for v in value]
                else:
                    members = [] if _is_missing(value) else str(value).split("|")
                return lookup.isdisjoint(members) == negate
            return holds_set

        def holds(row: Mapping[str, Any]) -> bool:
            try:  # missing values (None, NaN, NA) are in no list of values
                hit = row.get(feature) in lookup
            except TypeError:  # unhashable (a list), or NA compared on a hash collision
                hit = False
            return hit != negate
        return holds

    def features(self) -> frozenset[str]:
        return frozenset((self.feature,))


@dataclass(frozen=True)
class Range:
    """``feature: {min: x, max: y}``, inclusive; an unknown value is within no range."""

    feature: str
    low: float | None = None
    high: float | None = None

    def _within(self, x: Any) -> Any:
        ok = x == x  # NaN is not a number we know
        if self.low is not None:
            ok = ok & (x >= self.low)
        if self.high is not None:
            ok = ok & (x <= self.high)
        return ok

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        column = frame.get(self.feature)
        if column is None:
            return np.zeros(len(frame), dtype=bool)
        return self._within(_numbers(column))

    def compile(self) -> Check:
        feature = self.feature
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        return lambda row: low <= _number(row.get(feature)) <= high  # NaN is within nothing

    def features(self) -> frozenset[str]:
        return frozenset((self.feature,))


@dataclass(frozen=True)
class Condition:
    """A parsed ``when``: all clauses hold (or, for an ``any:`` group, at least one).

    Clauses are ``Membership``, ``Range`` or nested ``Condition`` groups. The
    empty condition always holds.
    """

    clauses: tuple[Membership | Range | Condition, ...] = ()
    any_of: bool = False

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        """One bool per row of ``frame``; columns the frame lacks count as missing values."""
        if not self.clauses:
            return np.full(len(frame), not self.any_of)
        combine = np.logical_or if self.any_of else np.logical_and
        return reduce(combine, (clause.mask(frame) for clause in self.clauses))

    def compile(self) -> Check:
        """``mask`` for one order's feature row, as a closure built once per catalog for the
        per-request path (no frame is built)."""
        checks, any_of = tuple(clause.compile() for clause in self.clauses), self.any_of
        if len(checks) == 1:  # all-of or any-of one clause is the clause
            return checks[0]
        if not checks:
            return lambda row: not any_of

        def holds(row: Mapping[str, Any]) -> bool:
            for check in checks:  # a plain loop: this is the per-request hot path
                if check(row) == any_of:
                    return any_of
            return not any_of
        return holds

    def features(self) -> frozenset[str]:
        """Every feature the condition reads, so the feature builder knows what to produce."""
        return frozenset().union(*(clause.features() for clause in self.clauses))

    def to_dict(self) -> dict[str, Any]:
        """The condition in catalog.yaml's own shape (reads back to an equal condition)."""
        if self.any_of:
            return Condition((self,)).to_dict()
        out: dict[str, Any] = {}
        for clause in self.clauses:
            if isinstance(clause, Condition):
                out["any" if clause.any_of else "all"] = [
                    (sub if isinstance(sub, Condition) else Condition((sub,))).to_dict() for sub in clause.clauses]
                continue
            test = out.setdefault(clause.feature, {})
            if isinstance(clause, Range):
                test.update({k: v for k, v in (("min", clause.low), ("max", clause.high)) if v is not None})
            else:
                test["not" if clause.negate else "in"] = list(clause.values)
        return {k: v["in"] if isinstance(v, dict) and list(v) == ["in"] else v for k, v in out.items()}


_GROUPS = {"any": True, "all": False}
_TEST_KEYS = ("in", "not", "min", "max")


def _kind(feature: str) -> str | None:
    """schema's kind of a valid feature name; None for the shop's own ``ctx_*`` columns."""
    if feature in FEATURES:
        return FEATURES[feature]
    return None if feature.startswith("ctx_") else "number"  # shares and per-action history


def _value(value: Any, at: _At, feature: str) -> Any:
    """One value a feature is compared with, checked against the feature's kind."""
    if not isinstance(value, (str, int, float)):
        at.fail(f"expected text, a number or true/false, got {_describe(value)}")
    if isinstance(value, float) and math.isnan(value):
        at.fail("NaN equals nothing; use min/max or not")
    kind = _kind(feature)
    if kind == "bool" and not isinstance(value, bool):
        at.fail(f"{feature} is true or false, got {value!r}")
    if kind == "number" and isinstance(value, (bool, str)):
        at.fail(f"{feature} is a number, got {value!r}")
    if kind in ("category", "set"):
        if isinstance(value, bool):
            at.fail(f"{feature} holds text, got {value!r}")
        value = str(value)  # `region: [75]` must match the text column "75"
        if kind == "set" and ("|" in value or not value):
            at.fail(f"a {feature} member cannot be empty or contain '|', got {value!r}")
        allowed = CATEGORY_VALUES.get(feature)
        if allowed is not None and value not in allowed:
            at.fail(f"{value!r} is not a {feature}; expected one of {', '.join(allowed)}")
    return value


def _values(value: Any, at: _At, feature: str) -> tuple[Any, ...]:
    if isinstance(value, _Seq):
        if not value:
            at.fail("an empty list matches nothing")
        before = len(at.problems)
        found = [at.attempt(_value, v, at.item(value, i), feature) for i, v in enumerate(value)]
        at.refuse_if_any(before)
    else:
        found = [_value(value, at, feature)]
    return tuple(dict.fromkeys(found))


def _bound(tests: _Map, key: str, at: _At) -> float | None:
    if key not in tests:
        return None
    value = tests[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        at.key(tests, key).fail(f"expected a number, got {_describe(value)}")
    return float(value)


def _parse_test(feature: str, value: Any, at: _At, action_ids: frozenset[str]) -> list[Membership | Range]:
    if not is_feature_name(feature, action_ids):
        close = difflib.get_close_matches(feature, FEATURES, n=1)
        at.fail(f"unknown feature {feature!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if not isinstance(value, _Map):
        return [Membership(feature, _values(value, at, feature))]
    tests = _mapping(value, at, allowed=_TEST_KEYS)
    if not tests:
        at.fail(f"empty test; use one of {', '.join(_TEST_KEYS)}")
    clauses: list[Membership | Range] = []
    if "min" in tests or "max" in tests:
        kind = _kind(feature)
        if kind not in ("number", None):
            at.fail(f"min/max need a number; {feature} is a {kind}")
        low, high = _bound(tests, "min", at), _bound(tests, "max", at)
        if low is not None and high is not None and low > high:
            at.fail(f"min {low:g} is above max {high:g}")
        clauses.append(Range(feature, low, high))
    for key, negate in (("in", False), ("not", True)):
        if key in tests:
            clauses.append(Membership(feature, _values(tests[key], at.key(tests, key), feature), negate))
    return clauses


def _parse_condition(value: Any, at: _At, action_ids: frozenset[str]) -> Condition:
    """A ``when`` mapping: feature tests and ``any:``/``all:`` groups of sub-conditions."""
    when = _mapping(value, at)
    before = len(at.problems)
    clauses: list[Membership | Range | Condition] = []
    for key, test in when.items():
        key_at = at.key(when, key)
        clauses.extend(key_at.attempt(_parse_clause, key, test, key_at, action_ids) or ())
    at.refuse_if_any(before)
    return Condition(tuple(clauses))


def _parse_clause(key: str, test: Any, at: _At, action_ids: frozenset[str]) -> Sequence[Membership | Range | Condition]:
    """One entry of a ``when``: an ``any:``/``all:`` group or a feature's test."""
    if key not in _GROUPS:
        return _parse_test(key, test, at, action_ids)
    items = _sequence(test, at)
    if not items:
        at.fail(f"{key} needs at least one condition")
    before = len(at.problems)
    subs = [at.attempt(_parse_condition, item, at.item(items, i), action_ids) for i, item in enumerate(items)]
    at.refuse_if_any(before)
    return [Condition(tuple(sub for sub in subs if sub is not None), any_of=_GROUPS[key])]


# ---------------------------------------------------------------------------
# 3. The catalog model
# ---------------------------------------------------------------------------

_CAP_FEATURE = "received_{id}_{days}d"  # schema.ACTION_FEATURE_PATTERNS
_CAP_FEATURE_RE = re.compile(r"^received_(?P<id>.+)_(?P<days>\d+)d$")
# An id ending in `_<n>d` would make `received_<id>` read as a cap window of another id.
_ID_RE = re.compile(r"^(?!.*_\d+d$)[A-Za-z0-9][A-Za-z0-9_-]*$")
_ACTION_KEYS = ("id", "name", "cost", "stock", "budget", "when", "max_per_customer", "default", "note")


@dataclass(frozen=True)
class Cap:
    """At most ``count`` of an action per customer in any ``days``-day window."""

    count: int
    days: int


@dataclass(frozen=True)
class Action:
    """One thing a slot can hold. ``stock`` and ``budget`` are what the catalog declares;
    their consumption is tracked by whoever hands the action out."""

    id: str
    name: str
    cost: float
    stock: int | None = None
    budget: float | None = None
    when: Condition = field(default_factory=Condition)
    cap: Cap | None = None
    default: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        if not self.note:
            object.__setattr__(self, "note", self.name)

    @cached_property
    def cap_feature(self) -> str | None:
        """The feature counting this action for the customer over the cap's window."""
        return None if self.cap is None else _CAP_FEATURE.format(id=self.id, days=self.cap.days)

    def eligible(self, frame: pd.DataFrame) -> np.ndarray:
        """Per row: ``when`` holds and the contact cap is not reached; the default always is."""
        if self.default:
            return np.ones(len(frame), dtype=bool)
        ok = self.when.mask(frame)
        if self.cap is not None:
            column = frame.get(self.cap_feature)
            if column is not None:
                ok = ok & (np.nan_to_num(_numbers(column), nan=0.0) < self.cap.count)
        return ok

    def compile(self) -> Check:
        """``eligible`` for one order given as a dict, as a closure."""
        if self.default:
            return lambda row: True
        when = self.when.compile()
        cap, feature = self.cap, self.cap_feature
        if cap is None or feature is None:   # feature is None exactly when cap is
            return when
        count = cap.count

        def eligible(row: Mapping[str, Any]) -> bool:
            return not _number(row.get(feature)) >= count and when(row)  # NaN: never received
        return eligible

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "cost": self.cost}
        if self.default:
            out["default"] = True
        if self.stock is not None:
            out["stock"] = self.stock
        if self.budget is not None:
            out["budget"] = self.budget
        if self.when.clauses:
            out["when"] = self.when.to_dict()
        if self.cap is not None:
            out["max_per_customer"] = {"count": self.cap.count, "days": self.cap.days}
        out["note"] = self.note
        return out


@dataclass(frozen=True)
class Slot:
    """A place in the parcel (packaging, insert, coupon) and its actions, in catalog order."""

    name: str
    actions: tuple[Action, ...]

    @cached_property
    def default_index(self) -> int:
        return next(i for i, action in enumerate(self.actions) if action.default)

    @cached_property
    def action_ids(self) -> tuple[str, ...]:
        return tuple(action.id for action in self.actions)

    @cached_property
    def _index(self) -> dict[str, int]:
        return {action_id: i for i, action_id in enumerate(self.action_ids)}

    def index_of(self, action_id: str) -> int:
        try:
            return self._index[action_id]
        except KeyError:
            raise CatalogError(f"no action {action_id!r} in slot {self.name!r}; it has "
                               f"{', '.join(self.action_ids)}", field=f"slots.{self.name}") from None

    @cached_property
    def costs(self) -> np.ndarray:
        costs = np.array([action.cost for action in self.actions], dtype=float)
        costs.flags.writeable = False
        return costs


class Assessment(NamedTuple):
    """One or many orders against the catalog: what each may get and what the playbook picks."""

    eligible: np.ndarray   # bool, flat in ``Catalog.columns`` layout: (n_actions,) or (n_orders, n_actions)
    playbook: np.ndarray   # int, the playbook's action index per slot: (n_slots,) or (n_orders, n_slots)


class _Compiled(NamedTuple):
    actions: tuple[Check, ...]   # per action (flat), its eligibility check
    rules: tuple[Check, ...]     # per rule, its condition


@dataclass(frozen=True)
class Rule:
    """One playbook entry: when ``when`` holds, choose ``choose[slot]`` (an action id)."""

    when: Condition
    choose: dict[str, str]
    line: int


@dataclass(frozen=True)
class Catalog:
    """The parsed catalog; ``text`` and ``sha256`` pin exactly which file a model used."""

    slots: dict[str, Slot]
    rules: tuple[Rule, ...]
    text: str
    sha256: str
    file: str = "catalog.yaml"

    @classmethod
    def from_yaml(cls, text: str, file: str = "catalog.yaml") -> Catalog:
        slots, rules = _parse_catalog(_read_yaml(text, file), file)
        return cls(slots, rules, text, hashlib.sha256(text.encode("utf-8")).hexdigest(), file)

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CatalogError(f"not UTF-8 text ({err.reason} at byte {err.start})", file=str(path)) from None
        except OSError as err:
            raise CatalogError(f"cannot read: {err.strerror or err}", file=str(path)) from None
        return cls.from_yaml(text, file=str(path))

    @cached_property
    def _actions(self) -> dict[str, tuple[str, Action]]:
        return {a.id: (slot.name, a) for slot in self.slots.values() for a in slot.actions}

    def action(self, action_id: str) -> tuple[str, Action]:
        """The slot name and the action for an id (ids are unique across the catalog)."""
        try:
            return self._actions[action_id]
        except KeyError:
            raise CatalogError(f"no action {action_id!r} in the catalog", file=self.file) from None

    @property
    def action_ids(self) -> frozenset[str]:
        return frozenset(self._actions)

    def cap_windows(self) -> dict[str, tuple[int, ...]]:
        """Action id -> the windows (days) over which features must count what a customer received:
        its contact cap and any ``received_<id>_<D>d`` a condition tests."""
        windows: dict[str, set[int]] = defaultdict(set)
        conditions = [rule.when for rule in self.rules]
        for _, action in self._actions.values():
            conditions.append(action.when)
            if action.cap is not None:
                windows[action.id].add(action.cap.days)
        for feature in frozenset().union(*(c.features() for c in conditions)):
            m = _CAP_FEATURE_RE.match(feature)
            if m and m["id"] in self._actions:
                windows[m["id"]].add(int(m["days"]))
        return {action_id: tuple(sorted(days)) for action_id, days in windows.items()}

    def to_dict(self) -> dict[str, Any]:
        """The catalog as plain data in catalog.yaml's shape (JSON/YAML serialisable)."""
        return {
            "slots": {name: {"actions": [a.to_dict() for a in slot.actions]}
                      for name, slot in self.slots.items()},
            "rules": [({"when": r.when.to_dict()} if r.when.clauses else {}) | {"choose": dict(r.choose)}
                      for r in self.rules],
        }

    # -- eligibility and the playbook ----------------------------------------------
    # Actions are laid out flat, slot by slot in catalog order (``columns``):
    # ``assess`` and ``assess_one`` give every action's eligibility in that
    # layout together with the playbook's choice, each condition evaluated once.

    @cached_property
    def columns(self) -> tuple[int, ...]:
        """Per slot, the flat index of its first action (slots in catalog order)."""
        sizes = [len(slot.actions) for slot in self.slots.values()]
        return tuple(int(c) for c in np.cumsum([0, *sizes[:-1]]))

    @cached_property
    def _flat_actions(self) -> tuple[Action, ...]:
        return tuple(a for slot in self.slots.values() for a in slot.actions)

    @cached_property
    def _rule_picks(self) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        """Per rule, (slot position, flat column, index in slot) of each action it chooses."""
        names = list(self.slots)
        return tuple(tuple((names.index(slot), self.columns[names.index(slot)] + self.slots[slot].index_of(a),
                            self.slots[slot].index_of(a)) for slot, a in rule.choose.items())
                     for rule in self.rules)

    @cached_property
    def _compiled(self) -> _Compiled:
        """Per action its eligibility check, per rule its condition: compiled once, used per request."""
        return _Compiled(tuple(a.compile() for a in self._flat_actions), tuple(r.when.compile() for r in self.rules))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}  # closures do not pickle

    def _by_slot(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.slots, np.split(flat, self.columns[1:], axis=-1)))

    def assess(self, frame: pd.DataFrame) -> Assessment:
        """Every order's eligibility, bool (n_orders, n_actions) flat in ``columns`` layout, and the
        playbook's choice, int (n_orders, n_slots) action index per slot (see ``rules_choice``)."""
        ok = np.column_stack([a.eligible(frame) for a in self._flat_actions])
        fired = self.rules_fired(frame)
        choice = np.tile(np.array([slot.default_index for slot in self.slots.values()]), (len(frame), 1))
        for r, picks in enumerate(self._rule_picks):
            rows = fired == r
            if rows.any():
                for s, column, index in picks:
                    choice[rows & ok[:, column], s] = index
        return Assessment(ok, choice)

    def assess_one(self, row: Mapping[str, Any]) -> Assessment:
        """``assess`` for one order's feature row: bool (n_actions,) and int (n_slots,)."""
        ok, choice = self._assess_row(row)
        return Assessment(np.array(ok, dtype=bool), np.array(choice))

    def assess_many(self, rows: Sequence[Mapping[str, Any]]) -> Assessment:
        """`assess_one` of each feature row, stacked ((n, n_actions), (n, n_slots)): the service's
        micro-batches, without building a frame for a handful of orders."""
        assessed = [self._assess_row(row) for row in rows]
        return Assessment(np.array([ok for ok, _ in assessed], dtype=bool).reshape(len(rows), len(self._flat_actions)),
                          np.array([choice for _, choice in assessed], dtype=np.intp).reshape(len(rows), len(self.slots)))

    def _assess_row(self, row: Mapping[str, Any]) -> tuple[list[bool], list[int]]:
        compiled = self._compiled
        ok = [check(row) for check in compiled.actions]
        choice = [slot.default_index for slot in self.slots.values()]
        for when, picks in zip(compiled.rules, self._rule_picks):
            if when(row):
                for s, column, index in picks:
                    if ok[column]:
                        choice[s] = index
                break
        return ok, choice

    def eligible(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Slot -> bool (n_orders, n_actions): ``when`` and contact cap; the default always."""
        return self._by_slot(np.column_stack([a.eligible(frame) for a in self._flat_actions]))

    def rules_fired(self, frame: pd.DataFrame) -> np.ndarray:
        """Per order the index in ``rules`` of the first rule whose ``when`` holds, -1 for none."""
        if not self.rules:
            return np.full(len(frame), -1)
        hits = np.column_stack([rule.when.mask(frame) for rule in self.rules])
        return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)

    def rules_choice(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Slot -> action index per order from the playbook; anything the fired rule does not
        name, or names but is not eligible for the order, is the slot default."""
        choice = self.assess(frame).playbook
        return {name: choice[:, s] for s, name in enumerate(self.slots)}


def _declared_ids(slots: _Map) -> dict[str, tuple[str, ...]]:
    """Each slot's action ids as written, read ahead so conditions may name ``received_<id>`` of
    any action and rules are checked against a slot refused for another reason; malformed
    entries are skipped here and refused by the full parse."""
    return {name: tuple(item["id"] for item in slot["actions"]
                        if isinstance(item, dict) and isinstance(item.get("id"), str))
            for name, slot in slots.items() if isinstance(slot, dict) and isinstance(slot.get("actions"), list)}


def _parse_action(value: Any, at: _At, action_ids: frozenset[str], seen: dict[str, _At]) -> Action:
    m = _mapping(value, at, allowed=_ACTION_KEYS)   # required keys checked below, with the rest
    before = len(at.problems)
    id_at = at.key(m, "id")

    def required(key: str) -> Any:
        if key not in m:
            at.key(m, key).fail(f"missing {key!r}")
        return m[key]

    def identifier() -> str:
        action_id = _text(required("id"), id_at)
        if not _ID_RE.match(action_id):
            id_at.fail(f"invalid id {action_id!r}: use letters, digits, '_' and '-', "
                       "not ending in _<number>d")
        if action_id in seen:
            first = seen[action_id]
            id_at.fail(f"duplicate action id {action_id!r} (first at {first.field}, line {first.line})")
        seen[action_id] = id_at
        return action_id

    def cap() -> Cap | None:
        if "max_per_customer" not in m:
            return None
        cap_at = at.key(m, "max_per_customer")
        spec = _mapping(m["max_per_customer"], cap_at, allowed=("count", "days"), required=("count", "days"))
        count = cap_at.attempt(lambda: _positive_int(spec["count"], cap_at.key(spec, "count")))
        days = cap_at.attempt(lambda: _positive_int(spec["days"], cap_at.key(spec, "days")))
        if count is None or days is None:
            raise _Refused
        return Cap(count, days)

    def optional(key: str, parse: Callable[[Any, _At], _T]) -> Callable[[], _T | None]:
        return lambda: parse(m[key], at.key(m, key)) if key in m else None

    action_id = at.attempt(identifier)
    default = at.attempt(lambda: _flag(m.get("default", False), at.key(m, "default")))
    when = at.attempt(lambda: Condition() if m.get("when") is None
                      else _parse_condition(m["when"], at.key(m, "when"), action_ids))
    limit = at.attempt(cap)
    name = at.attempt(lambda: _text(required("name"), at.key(m, "name")))
    cost = at.attempt(lambda: _amount(required("cost"), at.key(m, "cost")))
    stock = at.attempt(optional("stock", lambda v, a: _amount(v, a, whole=True)))
    budget = at.attempt(optional("budget", _amount))
    note = at.attempt(optional("note", _text))
    if default and ((when is not None and when.clauses) or limit is not None):
        at.key(m, "when" if when is not None and when.clauses else "max_per_customer").note(
            "the default action is always eligible; it cannot have when or max_per_customer")
    at.refuse_if_any(before)
    assert action_id is not None and when is not None and name is not None and cost is not None
    return Action(id=action_id, name=name, cost=cost, stock=stock, budget=budget, when=when, cap=limit,
                  default=bool(default), note=note or "")


def _parse_slot(name: str, value: Any, at: _At, action_ids: frozenset[str], seen: dict[str, _At]) -> Slot:
    if name not in SLOTS:
        at.fail(f"unknown slot {name!r}; expected one of {', '.join(SLOTS)}")
    m = _mapping(value, at, allowed=("actions",), required=("actions",))
    actions_at = at.key(m, "actions")
    items = _sequence(m["actions"], actions_at)
    if not items:
        actions_at.fail("a slot needs at least one action")
    before = len(at.problems)
    parsed = [actions_at.attempt(_parse_action, item, actions_at.item(items, i), action_ids, seen)
              for i, item in enumerate(items)]
    # read off the items as written, so that an action refused for another reason still counts
    defaults = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("default") is True]
    if not defaults:
        actions_at.fail("no action has 'default: true'; a slot needs exactly one control action")
    first = items[defaults[0]].get("id")
    first = repr(first) if isinstance(first, str) else f"actions[{defaults[0]}]"
    for second in defaults[1:]:
        actions_at.item(items, second).key(items[second], "default").note(
            f"a second default; {first} is already this slot's default")
    at.refuse_if_any(before)
    return Slot(name, tuple(action for action in parsed if action is not None))


def _parse_rule(value: Any, at: _At, declared: dict[str, tuple[str, ...]], action_ids: frozenset[str]) -> Rule:
    """One playbook entry; ``declared`` is each slot's action ids as written, so that a rule is
    checked even against a slot refused for some other reason."""
    m = _mapping(value, at, allowed=("when", "choose"), required=("choose",))
    before = len(at.problems)
    when = at.attempt(lambda: Condition() if m.get("when") is None
                      else _parse_condition(m["when"], at.key(m, "when"), action_ids))
    choose_at = at.key(m, "choose")
    spec = _mapping(m["choose"], choose_at)
    if not spec:
        choose_at.fail("choose names no slot")

    def pick(slot_name: str, action_id: Any) -> str:
        slot_at = choose_at.key(spec, slot_name)
        if slot_name not in declared:
            slot_at.fail(f"unknown slot {slot_name!r}; this catalog has {', '.join(declared)}")
        action_id = _text(action_id, slot_at)
        if action_id not in declared[slot_name]:
            slot_at.fail(f"{action_id!r} is not an action of slot {slot_name!r}; it has "
                         f"{', '.join(declared[slot_name])}")
        return action_id

    choose = {name: choose_at.attempt(pick, name, a) for name, a in spec.items()}
    at.refuse_if_any(before)
    assert when is not None
    return Rule(when, {k: v for k, v in choose.items() if v is not None}, m.line)


def _parse_catalog(data: Any, file: str) -> tuple[dict[str, Slot], tuple[Rule, ...]]:
    """Slots and rules, or one CatalogError listing every problem found (line and field of each)."""
    root = _At(file, "", None)
    try:
        return _parse_catalog_at(data, root)
    except _Refused:
        pass
    raise CatalogError.of(root.problems)


def _parse_catalog_at(data: Any, root: _At) -> tuple[dict[str, Slot], tuple[Rule, ...]]:
    if data is None:
        root.fail("the catalog is empty")
    top = _mapping(data, root, allowed=("slots", "rules"), required=("slots",))
    slots_at = root.key(top, "slots")
    slot_specs = _mapping(top["slots"], slots_at)
    if not slot_specs:
        slots_at.fail(f"no slots; expected some of {', '.join(SLOTS)}")
    declared = _declared_ids(slot_specs)
    action_ids = frozenset(a for ids in declared.values() for a in ids)
    seen: dict[str, _At] = {}
    parsed = {name: slots_at.attempt(_parse_slot, name, spec, slots_at.key(slot_specs, name), action_ids, seen)
              for name, spec in slot_specs.items()}
    slots = {name: slot for name, slot in parsed.items() if slot is not None}
    rules: list[Rule | None] = []
    if top.get("rules") is not None:
        rules_at = root.key(top, "rules")
        items = rules_at.attempt(lambda: _sequence(top["rules"], rules_at)) or _Seq()
        rules = [rules_at.attempt(_parse_rule, item, rules_at.item(items, i), declared, action_ids)
                 for i, item in enumerate(items)]
    root.refuse_if_any(0)
    return slots, tuple(rule for rule in rules if rule is not None)
