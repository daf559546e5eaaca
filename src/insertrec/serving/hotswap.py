"""The engine a worker decides with, and how it is replaced without failing a request.

A request reads `ModelHolder.current` once and decides with that `Loaded`
to the end, so a swap (one reference assignment) never changes an engine
under a request in flight. A new engine is loaded completely in a
background thread before it is swapped in; if it fails to load, the worker
keeps what it had (or the catalog's rules) and reports degraded with the
reason. A model that fails *at decision time* is answered for by the rules
in ``fallback`` (see `Loaded.decider`).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from insertrec.catalog import Catalog
from insertrec.decide import Decider
from insertrec.engine import Engine
from insertrec.errors import InsertrecError
from insertrec.registry import resolve_model
from insertrec.serving.decisionlog import limited_actions

__all__ = ["Loaded", "ModelHolder"]

_log = logging.getLogger("insertrec.serving")


@dataclass(frozen=True)
class Loaded:
    """What a worker serves: the model (None when it could not load), the rules on its catalog, why.

    Without a configured model, ``engine`` is the rules engine itself: the
    playbook is then the policy (labelled ``rules``), not a fallback.
    """

    engine: Engine | None
    fallback: Engine
    reason: str | None = None   # set when degraded: what failed
    generation: int = 0

    @property
    def status(self) -> str:
        return "degraded" if self.reason else "ready"

    @property
    def version(self) -> str:
        return (self.engine or self.fallback).version

    @cached_property
    def decider(self) -> Decider:
        """Where this worker's boxes are decided: the model, and the rules answering for it."""
        return Decider(self.engine, self.fallback)

    @cached_property
    def rules(self) -> Decider:
        """The catalog's rules alone, labelled fallback: what answers while the decision log is down."""
        return Decider(None, self.fallback)

    @cached_property
    def limited(self) -> frozenset[str]:
        """Actions whose use is counted in the log: stock or budget, never a slot's default."""
        return frozenset(limited_actions(self.fallback.catalog))

    @cached_property
    def counted(self) -> frozenset[str]:
        """Actions a counter or the customer's history limits (stock, budget, contact cap), never a
        slot's default: what a decision made without the log (spooled) may not give."""
        return self.limited | {a.id for slot in self.fallback.catalog.slots.values() for a in slot.actions
                               if a.cap is not None and not a.default}

    @cached_property
    def segment_sizes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in (self.engine.segments if self.engine is not None else {}).values():
            counts[name] = counts.get(name, 0) + 1
        return counts

    @cached_property
    def as_of_ns(self) -> int:
        """Events from this instant on are not in the model's customer snapshot."""
        snapshot = self.engine.snapshot if self.engine is not None else None
        as_of = snapshot.as_of if snapshot is not None else None
        return int(as_of.value) if as_of is not None else -(2**63)


class ModelHolder:
    """Holds the current `Loaded` of one worker and replaces it on request.

    Parameters
    ----------
    model : model directory or ``models:/NAME@ALIAS`` (None: rules only).
    catalog : catalog.yaml to fall back on when no model loads (default: the
        one inside the model directory, when that file is intact).
    on_swap : called (in the loading thread) with each new `Loaded`, e.g. to
        align stock counters with its catalog.
    """

    def __init__(self, model: str | None, catalog: str | None = None,
                 on_swap: Callable[[Loaded], None] | None = None):
        self.model, self.catalog = model, catalog
        self.on_swap = on_swap
        self.current: Loaded | None = None
        self._lock = threading.Lock()

    def load(self, generation: int = 0) -> Loaded:
        """Load now (blocking) and swap in; raises InsertrecError only if there is nothing to serve."""
        with self._lock:
            loaded = self._build(generation)
            if self.on_swap is not None:
                self.on_swap(loaded)
            self.current = loaded
        _settle_heap()
        if loaded.reason:
            _log.warning("serving degraded", extra={"event": "model_degraded", "reason": loaded.reason,
                                                    "model_version": loaded.version})
        else:
            _log.info("model loaded", extra={"event": "model_loaded", "model_version": loaded.version})
        return loaded

    def reload_in_background(self, generation: int) -> threading.Thread:
        """Start loading; requests keep using the current engine until the new one is complete."""
        thread = threading.Thread(target=self._reload_quietly, args=(generation,), name="model-reload",
                                  daemon=True)
        thread.start()
        return thread

    def _reload_quietly(self, generation: int) -> None:
        try:
            self.load(generation)
        except Exception as exc:
            _log.error("reload failed", extra={"event": "reload_failed", "reason": _reason(exc)})

    def _build(self, generation: int) -> Loaded:
        previous = self.current
        if self.model is None:
            rules = Engine.rules_only(self._catalog(None))
            return Loaded(rules, rules, None, generation)
        try:
            engine = Engine.load(resolve_model(self.model))
            return Loaded(engine, Engine.rules_only(engine.catalog), None, generation)
        except Exception as exc:
            reason = f"model {self.model!r} failed to load: {_reason(exc)}"
        if previous is not None and previous.engine is not None:
            return Loaded(previous.engine, previous.fallback,
                          f"{reason}; still serving the previous model {previous.version}", generation)
        if previous is not None:
            return Loaded(None, previous.fallback, reason, generation)
        return Loaded(None, Engine.rules_only(self._catalog(reason)), reason, generation)

    def _catalog(self, failure: str | None) -> Catalog:
        candidates = [Path(self.catalog)] if self.catalog else []
        if self.model is not None and not self.model.startswith("models:/"):
            candidates.append(Path(self.model) / "catalog.yaml")
        for path in candidates:
            if path.is_file():
                return Catalog.load(path)
        what = failure or "no model given"
        raise InsertrecError(f"cannot serve: {what}, and no catalog to answer from "
                             "(set INSERTREC_CATALOG to the catalog.yaml to fall back on)")


def _settle_heap() -> None:
    """Collect what a replaced engine left behind, then exempt everything loaded from the cyclic GC.

    A worker holds a few hundred thousand long-lived objects (model, snapshot,
    libraries); every full collection walked them all, stalling requests for
    150 ms (measured on the demo model, the service's worst tail). Frozen,
    they are skipped. Unfreezing first lets this one collection free a
    replaced model's reference cycles.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _reason(exc: BaseException) -> str:
    """One line for logs and /readyz: the user-facing message, or only the type of a bug."""
    if isinstance(exc, InsertrecError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return type(exc).__name__
