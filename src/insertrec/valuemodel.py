"""What a whole box is worth: the net value of an order given its features and its actions.

The model is linear in parameters so that all combinations of all slots can
be scored for one order with a couple of small matrix products:

    q(x, a) = b(x) + sum_s [ phi(x) . W_s[a_s] + beta_s * 1{a_s = rule_s(x)} ]
                   + sum_{s<t} P_st[a_s, a_t]

- ``b(x) = phi(x) . w0`` is the order's baseline value (what it is worth with
  the slot defaults); it does not change which box is best, but off-policy
  evaluation needs it.
- ``W_s[a]`` is how much action ``a`` adds over the slot default, as a function
  of the customer (columns for defaults are zero by construction).
- ``beta_s`` is the value of following the marketer's playbook in slot ``s``.
  Its prior mean is a small positive ``rule_prior``: with little data the
  other terms shrink to zero and the playbook wins; with enough data the data
  decide, including that a rule is wrong.
- ``P_st`` are interactions between slots (a coupon next to a referral card
  may be worth less than each alone), so slots are chosen jointly.

The logging policy sends some actions to some customers far more often, so a
misspecified baseline would leak into the action effects. Two remedies, both
parameters: an offset for the baseline learned by gradient boosting (cross-
fitted, so the ridge sees honest residuals), and importance weights from the
logged propensities (clipped; they remove the leak but add variance, which on
the simulated worlds costs more than it gains, so they are off by default).
Two ridge strengths, one for the baseline and one
for everything about actions, are chosen together by K-fold CV: with little
or uninformative data the action terms shrink to zero and the playbook's
prior decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

_OFFSET_ROWS = 200_000  # rows the boosted baseline learns from at most: it is a nuisance, not the goal


@dataclass(frozen=True)
class ActionSpace:
    """The slots' sizes and defaults, and every joint combination as index rows."""

    sizes: tuple[int, ...]
    defaults: tuple[int, ...]

    @property
    def combos(self) -> np.ndarray:
        grids = np.meshgrid(*[np.arange(n) for n in self.sizes], indexing="ij")
        return np.stack([g.ravel() for g in grids], axis=1)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        k = len(self.sizes)
        return [(s, t) for s in range(k) for t in range(s + 1, k)]


class BoxGrid:
    """A fitted value model's box scores laid out on the grid of boxes, (n, *slot sizes).

    The same q(x, a) as the module docstring: one product with every slot's
    action weights side by side (actions of all slots in one flat row, catalog
    order), the playbook bonus, and the slot-pair terms summed once into a
    constant grid; a box's value is then a broadcast sum of its slots'
    scores, and ineligible actions enter as -inf so that no box holding one
    can win. Flattened in C order the grid is ``ActionSpace.combos`` order.
    This is the only implementation of box scoring: decisions and
    evaluation both go through it.
    """

    def __init__(self, model: ValueModel):
        sizes = model.space_.sizes
        k = len(sizes)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.columns = starts.astype(int)
        self.slices = [slice(int(c), int(c) + size) for c, size in zip(starts, sizes)]
        self.shapes = [tuple(sizes[s] if j == s else 1 for j in range(k)) for s in range(k)]
        self.weights = np.hstack(model.W_)                         # (n_features, n_actions)
        self.beta = np.asarray(model.beta_, dtype=float)
        self.pairs = np.zeros(sizes)
        for (s, t), table in model.P_.items():
            shape = [1] * k
            shape[s], shape[t] = sizes[s], sizes[t]
            self.pairs = self.pairs + table.reshape(shape)

    def per_action(self, phi: np.ndarray, rule_columns: np.ndarray) -> np.ndarray:
        """(n, n_actions): each action's value over its slot default, playbook bonus included."""
        out = phi @ self.weights
        out[np.arange(len(phi))[:, None], rule_columns] += self.beta
        return out

    def grid(self, phi: np.ndarray, rule_columns: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
        n = len(phi)
        per_action = self.per_action(phi, rule_columns)
        if eligible is not None:
            per_action = np.where(eligible, per_action, -np.inf)
        grid = self.pairs + per_action[:, self.slices[0]].reshape((n, *self.shapes[0]))
        for s in range(1, len(self.slices)):
            grid += per_action[:, self.slices[s]].reshape((n, *self.shapes[s]))
        return grid


class ValueModel:
    """Ridge value model of a whole box; see the module docstring.

    Parameters
    ----------
    alphas : baseline ridge strengths tried by cross-validation (relative to
        the number of training rows, so the choice carries across data sizes).
    action_alphas : the same for the action terms (effects, playbook, pairs).
    max_weight : clip for importance weights (normalised to mean 1); None
        fits unweighted.
    boosted_baseline : learn the baseline with gradient boosting as an offset
        (cross-fitted) in addition to the linear baseline block.
    rule_prior : prior mean of each playbook coefficient, in units of the
        reward's standard deviation.
    folds : cross-validation folds for ``alphas``.
    """

    def __init__(self, alphas: tuple[float, ...] = (1e-4, 1e-2, 1.0),
                 action_alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0),
                 max_weight: float | None = None, boosted_baseline: bool = True,
                 rule_prior: float = 0.01, folds: int = 3, random_state: int = 0):
        self.alphas = alphas
        self.action_alphas = action_alphas
        self.max_weight = max_weight
        self.boosted_baseline = boosted_baseline
        self.rule_prior = rule_prior
        self.folds = folds
        self.random_state = random_state

    # -- design ---------------------------------------------------------------
    def _design(self, phi: np.ndarray, actions: np.ndarray, rules: np.ndarray) -> np.ndarray:
        n, d = phi.shape
        blocks = [phi]
        for s, size in enumerate(self.space_.sizes):
            onehot = np.zeros((n, size))
            onehot[np.arange(n), actions[:, s]] = 1.0
            onehot = np.delete(onehot, self.space_.defaults[s], axis=1)
            blocks.append((phi[:, :, None] * onehot[:, None, :]).reshape(n, -1))
        blocks.append((actions == rules).astype(float))
        for s, t in self.space_.pairs:
            cell = np.zeros((n, self.space_.sizes[s] * self.space_.sizes[t]))
            cell[np.arange(n), actions[:, s] * self.space_.sizes[t] + actions[:, t]] = 1.0
            blocks.append(cell)
        return np.hstack(blocks)

    def _unpack(self, theta: np.ndarray) -> None:
        d = self.n_features_
        self.w0_ = theta[:d]
        i = d
        self.W_ = []
        for s, size in enumerate(self.space_.sizes):
            block = theta[i:i + d * (size - 1)].reshape(d, size - 1)
            self.W_.append(np.insert(block, self.space_.defaults[s], 0.0, axis=1))
            i += d * (size - 1)
        self.beta_ = theta[i:i + len(self.space_.sizes)]
        i += len(self.space_.sizes)
        self.P_ = {}
        for s, t in self.space_.pairs:
            m = self.space_.sizes[s] * self.space_.sizes[t]
            self.P_[(s, t)] = theta[i:i + m].reshape(self.space_.sizes[s], self.space_.sizes[t])
            i += m

    # -- fit ------------------------------------------------------------------
    def fit(self, phi: np.ndarray, actions: np.ndarray, rewards: np.ndarray, space: ActionSpace,
            rules: np.ndarray, pscore: np.ndarray | None = None) -> ValueModel:
        """Fit on logged orders.

        ``actions`` and ``rules`` are (n, n_slots) action indices (what the
        order received, and what the playbook would have given); ``pscore`` the
        joint logged propensity of the received box (None: unweighted).
        BLAS runs single-threaded here: on two shared cores a threaded solve
        of this size was measured 8x slower than a single-threaded one.
        """
        with threadpool_limits(1):
            return self._fit(phi, actions, rewards, space, rules, pscore)

    def _fit(self, phi: np.ndarray, actions: np.ndarray, rewards: np.ndarray, space: ActionSpace,
             rules: np.ndarray, pscore: np.ndarray | None) -> ValueModel:
        self.space_ = space
        self.n_features_ = phi.shape[1]
        rewards = np.asarray(rewards, dtype=float)
        if pscore is None or self.max_weight is None:
            w = np.ones(len(rewards))
        else:
            w = 1.0 / np.asarray(pscore, dtype=float)
            w = np.minimum(w / w.mean(), self.max_weight)
        self.reward_scale_ = float(rewards.std()) or 1.0
        n_params = self._design(phi[:1], actions[:1], rules[:1]).shape[1]
        prior = np.zeros(n_params)
        beta_at = phi.shape[1] * (1 + sum(s - 1 for s in space.sizes))
        prior[beta_at:beta_at + len(space.sizes)] = self.rule_prior * self.reward_scale_
        # Per-fold sufficient statistics, accumulated in chunks to bound memory;
        # the cross-validated error of any theta follows from them alone.
        fold = np.random.default_rng(self.random_state).integers(0, self.folds, len(rewards))
        self.offset_ = None
        if self.boosted_baseline:
            rewards = rewards - self._fit_offset(phi, rewards, fold)
        gram = np.zeros((self.folds, n_params, n_params))
        moment = np.zeros((self.folds, n_params))
        square = np.zeros(self.folds)
        for lo in range(0, len(rewards), 8192):
            sl = slice(lo, lo + 8192)
            Z = self._design(phi[sl], actions[sl], rules[sl])
            for f in range(self.folds):
                m = fold[sl] == f
                Zw = Z[m] * w[sl][m, None]
                gram[f] += Zw.T @ Z[m]
                moment[f] += Zw.T @ rewards[sl][m]
                square[f] += float(w[sl][m] @ rewards[sl][m] ** 2)
        n = len(rewards)
        is_action = np.arange(n_params) >= phi.shape[1]

        def solve(g: np.ndarray, m: np.ndarray, alphas: tuple[float, float], rows: float) -> np.ndarray:
            lam = rows * np.where(is_action, alphas[1], alphas[0])
            lam[0] = 0.0  # the intercept is not shrunk
            a = g.copy()
            a[np.diag_indices_from(a)] += lam + 1e-9
            return scipy.linalg.solve(a, m + lam * prior, assume_a="pos")

        grid = [(a, b) for a in self.alphas for b in self.action_alphas]
        errors = []
        for alphas in grid:
            err = 0.0
            for f in range(self.folds):
                theta = solve(gram.sum(0) - gram[f], moment.sum(0) - moment[f], alphas,
                              n * (self.folds - 1) / self.folds)
                err += square[f] - 2 * theta @ moment[f] + theta @ gram[f] @ theta
            errors.append(err)
        self.alpha_ = grid[int(np.argmin(errors))]
        self.theta_ = solve(gram.sum(0), moment.sum(0), self.alpha_, n)
        self._unpack(self.theta_)
        self._box_grid = None
        return self

    def _fit_offset(self, phi: np.ndarray, rewards: np.ndarray, fold: np.ndarray) -> np.ndarray:
        """Cross-fitted boosted baseline; keeps one fitted on all rows for `baseline`."""
        from sklearn.ensemble import HistGradientBoostingRegressor

        def model() -> HistGradientBoostingRegressor:
            return HistGradientBoostingRegressor(max_iter=150, learning_rate=0.08, max_leaf_nodes=15,
                                                 min_samples_leaf=40, random_state=self.random_state)

        rng = np.random.default_rng(self.random_state)
        cap = _OFFSET_ROWS
        out = np.empty(len(rewards))
        for f in range(self.folds):
            train = np.flatnonzero(fold != f)
            if len(train) > cap:
                train = rng.choice(train, cap, replace=False)
            out[fold == f] = model().fit(phi[train], rewards[train]).predict(phi[fold == f])
        rows = np.arange(len(rewards)) if len(rewards) <= cap else rng.choice(len(rewards), cap, replace=False)
        self.offset_ = model().fit(phi[rows], rewards[rows])
        return out

    # -- predict --------------------------------------------------------------
    @property
    def box_grid(self) -> BoxGrid:
        """The scorer of whole boxes, built once per fitted model."""
        if getattr(self, "_box_grid", None) is None:
            self._box_grid = BoxGrid(self)
        return self._box_grid

    def slot_scores(self, phi: np.ndarray, rules: np.ndarray) -> list[np.ndarray]:
        """Per slot, (n, n_actions): each action's value over the slot default."""
        grid = self.box_grid
        per_action = grid.per_action(phi, rules + grid.columns)
        return [per_action[:, sl] for sl in grid.slices]

    def combo_scores(self, phi: np.ndarray, rules: np.ndarray, combos: np.ndarray) -> np.ndarray:
        """(n, n_combos): value of each whole box over the all-default box, baseline excluded."""
        grid = self.box_grid
        flat = grid.grid(phi, rules + grid.columns).reshape(len(phi), -1)
        return flat[:, np.ravel_multi_index(tuple(combos.T), self.space_.sizes)]

    def baseline(self, phi: np.ndarray) -> np.ndarray:
        """Value of the order with the all-default box (for evaluation; decisions never need it)."""
        return phi @ self.w0_ + self._offset(phi)

    def _offset(self, phi: np.ndarray) -> np.ndarray | float:
        if self.offset_ is None:
            return 0.0
        with threadpool_limits(1):
            return self.offset_.predict(phi)

    def predict(self, phi: np.ndarray, actions: np.ndarray, rules: np.ndarray) -> np.ndarray:
        """Expected reward of the given boxes (n, n_slots) for the given orders."""
        return self._design(phi, actions, rules) @ self.theta_ + self._offset(phi)
