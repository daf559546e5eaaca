"""A shop's history, read from a data directory and validated at the boundary."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pandas as pd

from insertrec.catalog import Catalog


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


ORDER_DTYPES = {"order_id": "str", "customer_id": "str", "order_ts": "datetime64[ns, UTC]",
                "order_value": "float64", "n_items": "float64", "channel": "str",
                "categories": "str", "is_gift": "bool", "returned_value": "float64", "region": "str"}
NPS_DTYPES = {"customer_id": "str", "response_ts": "datetime64[ns, UTC]", "score": "int64"}
EXPOSURE_DTYPES = {"order_id": "str", "slot": "str", "action_id": "str",
                   "propensity": "float64", "reward": "float64"}
INCIDENT_DTYPES = {"customer_id": "str", "order_id": "str", "type": "str", "ts": "datetime64[ns, UTC]"}
REJECTED_DTYPES = {"file": "str", "row": "Int64", "column": "str", "reason": "str", "value": "str"}


@dataclass
class Dataset:
    """Normalised tables of one data directory (see docs/ARCHITECTURE.md for the columns)."""

    orders: pd.DataFrame
    nps: pd.DataFrame = field(default_factory=lambda: _empty(NPS_DTYPES))
    exposures: pd.DataFrame = field(default_factory=lambda: _empty(EXPOSURE_DTYPES))
    incidents: pd.DataFrame = field(default_factory=lambda: _empty(INCIDENT_DTYPES))
    catalog: Catalog | None = None
    rejected: pd.DataFrame = field(default_factory=lambda: _empty(REJECTED_DTYPES))
    source: str = ""

    def fingerprint(self) -> str:
        """SHA-256 of the normalised content: two runs on the same history share it."""
        h = hashlib.sha256()
        for name in ("orders", "nps", "exposures", "incidents"):
            frame = getattr(self, name)
            h.update(name.encode())
            h.update(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
        if self.catalog is not None:
            h.update(self.catalog.sha256.encode())
        return h.hexdigest()
