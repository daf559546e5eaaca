"""The simulated shop whose truth is known: a generic interpreter of ``world.json``.

Every later claim about decision quality is measured against this world, and
it must hold on worlds the engine has never seen. So nothing here knows which
action suits whom: that knowledge lives only in ``world.json`` (the packaged
``default_world.json`` or any other), and :meth:`World.perturbed` re-deals it.

The model (all symbols are fields of ``world.json``)
----------------------------------------------------
Customers arrive uniformly over ``days``. Each draws a ``customer_types`` entry
(by ``weight``) and, from it, latent traits: ``price_sensitivity``, ``eco``,
``return_proneness`` (Beta), a category affinity (Dirichlet), channel
probabilities (Dirichlet around the type's), ``ctx`` demographics, a log-mean
order value (``mu`` + Normal(``between_sd``)), an initial latent satisfaction
(Normal, NPS scale 0..10) and whether they ever answer surveys. ``signals``
emit noisy observable columns of a trait (``ctx_packaging_pref`` of ``eco``).

The hidden state ``h`` of an order is: the traits, the latent satisfaction and
the true tier it implies (``satisfaction.promoter_min``/``passive_min``), the
journey stage and a recent incident (as ``observed`` defines them), the
order's channel and gift flag, the order-value law and the category affinity.
A *term* is a linear function of ``h`` (see ``effects._doc``); with ``x(h)``
the design row of ``h`` and ``w`` a term's coefficients, its value is
``x(h) . w``. For a combination ``a`` of one action per slot:

* ``p(h,a) = sigmoid(intensity[type] + repurchase(h) + sum_slots logit[a_s](h)
  + sum_pairs interaction(h))``: probability that the next order comes within
  ``horizon_days``;
* ``rr(h,a) = sum_c affinity_c * sigmoid(logit(return_rate_c) + returns(h) +
  sum_slots return_logit[a_s](h))``: expected share of the next order's value
  returned (a guide read at home shapes the next purchase);
* ``reward(h,a) = p * E[V] * (1 - rr) * (1 - discount(a)) - cost(a)``, with
  ``E[V] = exp(mu + sigma^2 / 2)`` the next order's expected value,
  ``discount(a) = 1 - prod_slots (1 - reward.discount[a_s])`` (paid only by
  a customer who comes back: a coupon to someone who would come anyway only
  costs margin) and ``cost(a)`` the catalog's unit costs.

This is exactly what :meth:`World.expected_reward` computes, so the oracle
(the best eligible combination per order) is known.

Dynamics. Orders are simulated in vectorized rounds (every customer's k-th
order at once). At each order the shop's systems compute the observed features
(the columns of ``schema.FEATURES`` the catalog tests, with the ``observed``
windows), the logging policy picks each slot's action (the catalog's rules with
probability ``1 - epsilon``, else uniform among eligible actions; the exact
propensity is logged), then the next order comes within the horizon with
probability ``p(h,a)`` (``1 + (horizon - 1) * U**repeat_timing.shape`` days
later), or later with the type's ``later_return`` probability (horizon +
Exponential(``later_mean_days``)), or never. The next order's value is drawn
from the customer's law, the coupon discount is taken off it, its returns are
Binomial(n_items, rr)/n_items of the paid value with rr from its realized main
category. An incident (at most one)
may hit the order; latent satisfaction then moves by the actions'
``satisfaction`` terms and the incident's hit, an NPS answer may follow
(``nps``), and satisfaction reverts toward the type's mean.
The logged reward of an order is the next order's paid value net of returns if
it came within the horizon, else 0, minus the action costs: an unbiased draw
of ``reward(h,a)``. It counts the next order only (the SPEC's derived reward
counts every order in the horizon; the logged one overrides it), and for the
last orders it may count a next order past the end of the data.

The shop's features are computed inside the simulation by ``insertrec.features``
itself on the history simulated so far (so the logged propensities are exact
from the engine's point of view too). :meth:`World.evaluation_set` gives fresh
orders, the history before them and their hidden state, for ``simulate``;
:meth:`World.perturbed` re-deals the truth so that quality is measured on
worlds the engine has not seen; :meth:`World.shop_run` continues a history
stretch by stretch with the policy the caller deploys deciding (the closed
loop: the world draws the outcomes, the caller only sees the logged tables).

Modules: :mod:`~insertrec.world.spec` reads world.json (every refusal names the
field), :mod:`~insertrec.world.truth` holds the truth (population, response
model, dynamics), :mod:`~insertrec.world.simulation` the simulator run and what
it writes, and :mod:`~insertrec.world.model` the :class:`World` that ties them.
"""

from insertrec.world.model import World
from insertrec.world.simulation import EvaluationSet, Month, ShopRun, WorldData
from insertrec.world.spec import WorldError
from insertrec.world.truth import EFFECT_KINDS, TIERS, TRAITS

__all__ = ["EFFECT_KINDS", "TIERS", "TRAITS", "EvaluationSet", "Month", "ShopRun", "World", "WorldData",
           "WorldError"]
