"""What the API accepts and answers, as Pydantic models (and thus as its OpenAPI schema).

Input is checked here, once, at the edge: an order that passes is one the
engine can decide (ids without control characters, finite non-negative
amounts, a timestamp pandas can hold, categories that survive the
pipe-separated form of the training data), so nothing a caller sends can
surface as a 500 further in.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from insertrec.schema import context_problems

__all__ = [
    "MAX_BATCH",
    "OUTCOME",
    "Alternative",
    "BatchIn",
    "BatchItemOut",
    "BatchOut",
    "DecisionOut",
    "ErrorDetail",
    "ErrorOut",
    "NpsAnswer",
    "OrderIn",
    "OutcomeIn",
    "OutcomeOut",
    "ReadyOut",
    "Redeemed",
    "ReloadOut",
    "Reordered",
    "Returned",
    "SegmentOut",
    "SegmentsOut",
    "SlotOut",
    "first_error",
    "parse_batch"
]

Id = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
Category = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^|\x00-\x1f\x7f]+$")]
# Strict: JSON true is not the number 1, nor "7" the score 7.
Amount = Annotated[float, Strict(), Field(ge=0, le=1e9)]
Score = Annotated[int, Strict(), Field(ge=0, le=10)]


def _ctx_value(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
        return float(value)
    if isinstance(value, str) and len(value) <= 256:
        return value
    raise ValueError("extra fields must be a string (at most 256 characters), a finite number, "
                     "a boolean or null")


CtxValue = Annotated[Any, PlainValidator(_ctx_value), WithJsonSchema(
    {"anyOf": [{"type": "string", "maxLength": 256}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]})]

_EARLIEST = datetime(1678, 1, 1, tzinfo=UTC)   # what pandas' nanosecond timestamps can hold
_LATEST = datetime(2261, 12, 31, tzinfo=UTC)
MAX_BATCH = 1000


def _text_only(value: Any) -> Any:
    """Timestamps are ISO 8601 text, as documented; a bare number is not silently read as epoch seconds."""
    if value is not None and not isinstance(value, (str, datetime)):
        raise ValueError("expected an ISO 8601 timestamp string")
    return value


Timestamp = Annotated[datetime, BeforeValidator(_text_only)]


def _utc(ts: datetime | None) -> datetime | None:
    """Naive timestamps are UTC (as in the data files); the range is what training can read back."""
    if ts is None:
        return None
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    if not _EARLIEST <= ts <= _LATEST:
        raise ValueError("must be between the years 1678 and 2261")
    return ts


class OrderIn(BaseModel):
    """One order, as the `orders` table's columns; ``ctx_*`` fields (at most 32, named ctx_ and
    letters, digits or '_', 64 characters in all) are passed to the model as they are."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, str_max_length=256,
                              json_schema_extra={"examples": [{
                                  "order_id": "A-1001", "customer_id": "C-42", "order_value": 58.9,
                                  "channel": "web", "categories": ["apparel"], "is_gift": False}]})
    __pydantic_extra__: dict[str, CtxValue] = Field(init=False)

    order_id: Id
    customer_id: Id
    order_value: Amount
    order_ts: Timestamp | None = Field(None, description="ISO 8601, years 1678 to 2261; default: now. "
                                                         "Naive means UTC.")
    n_items: Annotated[float, Strict(), Field(gt=0, le=1e6)] | None = None
    channel: Label | None = None
    categories: Annotated[list[Category], Field(max_length=50)] | None = None
    is_gift: Annotated[bool, Strict()] | None = None
    returned_value: Amount | None = None
    region: Label | None = None
    nps_score: Score | None = Field(None, description="a fresher NPS answer than the service knows")

    _utc = field_validator("order_ts")(_utc)

    @model_validator(mode="after")
    def _bounded_context(self) -> OrderIn:
        """ctx_* names become model features: malformed or too many is refused, naming the field."""
        problems = context_problems(self.__pydantic_extra__ or {})
        if problems:
            name, reason = problems[0]
            raise PydanticCustomError("context_field", "{reason}", {"field": name, "reason": reason})
        return self

    def fingerprint(self) -> str:
        """SHA-256 of the order as validated, keys sorted: the same for a retry of the request
        (whatever its key order or spacing), different for another order under the same id."""
        return hashlib.sha256(orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()

    def record(self, now: datetime) -> dict[str, Any]:
        """The order as the engine and the decision log take it: `orders` columns, ctx_* included."""
        out: dict[str, Any] = {"order_id": self.order_id, "customer_id": self.customer_id,
                               "order_ts": (self.order_ts or now).isoformat(),
                               "order_value": self.order_value}
        for name in ("n_items", "channel", "is_gift", "returned_value", "region"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.categories is not None:
            out["categories"] = "|".join(self.categories)
        if self.__pydantic_extra__:
            out.update((k, v) for k, v in self.__pydantic_extra__.items() if k.startswith("ctx_"))
        return out


class BatchIn(BaseModel):
    """Up to 1,000 orders; each is validated and decided on its own."""

    orders: Annotated[list[OrderIn], Field(min_length=1, max_length=MAX_BATCH)]


class _BatchEnvelope(BaseModel):
    orders: Annotated[list[Any], Field(min_length=1, max_length=MAX_BATCH)]


class Alternative(BaseModel):
    action_id: str
    score: float


class SlotOut(BaseModel):
    action_id: str
    propensity: float = Field(description="probability the serving policy gave this action")
    pick_note: str = Field(description="what the packer reads")
    reasons: list[str]
    alternatives: list[Alternative] = Field(description="eligible actions, best first")


class DecisionOut(BaseModel):
    decision_id: str
    order_id: str
    model_version: str
    policy: Literal["model", "explore", "rules", "fallback"]
    segment: str | None
    expected_uplift: float | None
    slots: dict[str, SlotOut]


class ErrorDetail(BaseModel):
    field: str | None = Field(description="dotted path of the offending field, if any")
    reason: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class BatchItemOut(BaseModel):
    index: int
    order_id: str | None
    status: int = Field(description="200, or the status this order alone would have got")
    decision: DecisionOut | None = None
    error: ErrorDetail | None = None


class BatchOut(BaseModel):
    results: list[BatchItemOut]


class _OutcomeBase(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    order_id: Id = Field(description="the decided order this outcome is about")
    ts: Timestamp | None = Field(None, description="when it happened, ISO 8601, years 1678 to 2261 "
                                                   "(default: now)")
    outcome_id: Id | None = Field(None, description="the caller's key: a retry with the same key is "
                                                   "stored once (default: derived from the body)")

    _utc = field_validator("ts")(_utc)


class Redeemed(_OutcomeBase):
    type: Literal["redeemed"]
    action_id: Id | None = Field(None, description="the coupon redeemed")


class Reordered(_OutcomeBase):
    type: Literal["reordered"]


class Returned(_OutcomeBase):
    type: Literal["returned"]
    returned_value: Amount = Field(description="the order's returned value so far")


class NpsAnswer(_OutcomeBase):
    type: Literal["nps"]
    score: Score


OutcomeIn = Annotated[Redeemed | Reordered | Returned | NpsAnswer, Field(discriminator="type")]
OUTCOME: TypeAdapter[Redeemed | Reordered | Returned | NpsAnswer] = TypeAdapter(OutcomeIn)


class OutcomeOut(BaseModel):
    outcome_id: str
    order_id: str
    type: str
    recorded: bool = Field(description="false if this outcome had been stored before")


class ReadyOut(BaseModel):
    status: Literal["ready", "degraded", "unavailable"]
    model_version: str | None
    reason: str | None = None


class ReloadOut(BaseModel):
    status: Literal["reloading"]
    generation: int


class SegmentOut(BaseModel):
    segment: str
    customers: int


class SegmentsOut(BaseModel):
    model_version: str
    segments: list[SegmentOut]


def first_error(err: ValidationError, prefix: tuple[str | int, ...] = (), tagged: bool = False) -> ErrorDetail:
    """The first problem of a validation error as (dotted field path, reason).

    ``tagged``: the model is a union discriminated by ``type``, whose errors
    carry the tag as the first element of their path.
    """
    e = err.errors(include_url=False, include_input=False)[0]
    kind, loc = e["type"], e["loc"]
    if kind == "json_invalid":
        return ErrorDetail(field=None, reason=f"body is not valid JSON ({e['ctx'].get('error', 'parse error')})")
    if kind == "context_field":
        loc, reason = (*loc, e["ctx"]["field"]), e["ctx"]["reason"]
    elif kind.startswith("union_tag"):
        loc, reason = ("type",), "expected one of 'redeemed', 'reordered', 'returned', 'nps'"
    else:
        loc = loc[1:] if tagged else loc
        reason = _REASONS.get(kind, e["msg"].removeprefix("Value error, "))
    return ErrorDetail(field=".".join(str(p) for p in prefix + tuple(loc)) or None, reason=reason)


def parse_batch(body: bytes) -> list[Any]:
    """The batch's orders, unvalidated: each is validated alone so one bad order (even one
    that is not an object) does not refuse the other 999."""
    return _BatchEnvelope.model_validate_json(body).orders


_REASONS = {"string_pattern_mismatch": "contains a character not allowed here "
                                       "(control characters; '|' inside a category)"}
