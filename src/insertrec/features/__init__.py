"""Point-in-time features of orders, customer state for serving, and rewards.

Every number here describes a customer *as the shop knew them when the order
was placed*. A feature that peeks past that instant (a later NPS answer, a
return not yet made, the order itself) silently inflates every offline
estimate, so all paths share one definition of "before":

- an order's prior orders are the customer's orders with an earlier
  ``(order_ts, order_id)``; two orders at the same instant are ordered by id.
  For orders scored from a :class:`Snapshot`, every order in the snapshot is prior;
- an NPS answer or an incident is known only when its timestamp is strictly
  before the order's;
- a prior order's ``returned_value`` is known once the order is
  ``return_window_days`` old;
- a window of ``D`` days includes an event exactly ``D`` days old.

The offline frame (:func:`order_features`), the batch path
(:func:`features_for_orders`) and the customer frame (:func:`customer_frame`)
are one vectorised computation over a *ledger* of orders sorted by customer
and time, plus per-customer totals of the orders too old to matter for any
window (a snapshot's base). :class:`CustomerState` is the same arithmetic for
one customer in plain Python, for the service's budget of a fraction of a
millisecond per request.

One module per concept: :mod:`~insertrec.features.params` (what fixes the
columns), :mod:`~insertrec.features.columns` (input columns as arrays),
:mod:`~insertrec.features.ledger` (the per-customer event ledger),
:mod:`~insertrec.features.history` (offline point-in-time history),
:mod:`~insertrec.features.snapshot` (state after a history, batch path),
:mod:`~insertrec.features.online` (one customer, plain Python) and
:mod:`~insertrec.features.rewards` (what an order was worth).
"""

from insertrec.features.columns import DAY_NS
from insertrec.features.history import order_features
from insertrec.features.online import CustomerState
from insertrec.features.params import FeatureParams
from insertrec.features.rewards import order_rewards
from insertrec.features.snapshot import CUSTOMER_COLUMNS, Snapshot, customer_frame, features_for_orders

__all__ = [
    "CUSTOMER_COLUMNS",
    "DAY_NS",
    "CustomerState",
    "FeatureParams",
    "Snapshot",
    "customer_frame",
    "features_for_orders",
    "order_features",
    "order_rewards",
]
