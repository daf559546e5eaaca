"""Decision quality side by side with the peers, judged by the simulator's truth.

For each world (the default, a perturbed one, and the changed worlds of
bench/worlds/*.json, which only the simulator reads), history size and seed:
one logged history is generated, every learner is fitted on exactly that
history, and every policy decides exactly the same fresh orders, whose every
box's true value the world knows. Policies:

- insertrec as deployed (`insertrec train` on the whole history, exploration
  included) and greedy;
- Vowpal Wabbit `--cb_explore_adf` over the joint box: each eligible
  combination an action with slot-id features and their pairwise crosses, the
  logged joint propensity in the label, quadratic interactions with the
  order's features (insertrec's encoding, so both see the same inputs); a
  small grid chosen on a time split of the log (fitted on the first 80%, the
  best DR lower bound on the latest 20%, judged with insertrec's cross-fitted
  judge), then refitted on all of it; as deployed (its own epsilon) and greedy;
- a gradient-boosted direct model of the reward over features x box (greedy;
  `insertrec.learners.BoostedDirect`, the one the training tournament also fields);
- the rules, the logging policy, the all-default box and the oracle.

Each cell also records insertrec's learner tournament (ope.json's ``tournament``).
Reported per cell (mean and sd over seeds): value per order, lift vs rules,
vs all-default and vs the better of the two ("safe": #11.2 asks for at least
both), and uplift captured = (v - control) / (oracle - control).

Usage:
  python bench/quality.py --quick          # 1 seed, 5k + 30k customers, 1 VW setting, 5,000 fresh orders
  python bench/quality.py --seeds 1 2 3 --sizes 5000 30000 100000 --eval-orders 20000
Results go to bench/results/quality.json (--json to change).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

HERE = Path(__file__).resolve().parent
CHANGED_WORLDS = ("small_effects", "playbook_wrong", "coupons_waste")
VW_GRID = [f"--cb_type {t} --learning_rate {lr}" for t in ("mtr", "dr", "ips") for lr in (0.1, 0.5, 2.0)]
VW_QUICK = ["--cb_type mtr --learning_rate 0.5"]   # one setting: no selection fit
VW_EPSILON = 0.05   # VW's default exploration for cb_explore_adf


def load_world(name: str):
    """``default``, ``perturbed`` (the default world perturbed with seed 2026), ``perturbed@SEED``
    (with that seed: `bench/closed_loop.py --world perturbed` perturbs with 7), or bench/worlds/<name>.json."""
    from insertrec.world import World
    if name == "default":
        return World.default()
    if name.partition("@")[0] == "perturbed":
        return World.default().perturbed(seed=int(name.partition("@")[2] or 2026))
    return World.load(HERE / "worlds" / f"{name}.json")


def logged_history(data, config):
    """``(params, feats, logged)``: the feature parameters, every order's features and the logged
    orders with complete rewards of ``data``, as `insertrec train` computes them with ``config``
    (a `TrainConfig`: its windows and reward horizon, the catalog's costs)."""
    from insertrec import features
    from insertrec.evaluation import logged_orders
    catalog = data.catalog
    params = features.FeatureParams.fit(data, catalog=catalog, nps_ttl_days=config.nps_ttl_days,
                                        lapse_days=config.lapse_days)
    costs = {a.id: a.cost for slot in catalog.slots.values() for a in slot.actions}
    feats = features.order_features(data, params)
    rewards = features.order_rewards(data, horizon_days=config.horizon_days, costs=costs)
    return params, feats, logged_orders(data, feats, rewards, catalog)


def cell_parser(description: str | None, results_name: str) -> argparse.ArgumentParser:
    """The arguments every per-cell quality bench shares: which worlds, sizes and seeds, and where to write."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", nargs="+", default=["default"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[30000])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--json", default=str(HERE / "results" / results_name))
    return ap


def run_cells(args: argparse.Namespace, run: Callable[[str, int, int], dict]) -> None:
    """``run(world, customers, seed)`` for every cell on one thread, the results file rewritten after each."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cells = []
    with threadpool_limits(1):
        for world in args.worlds:
            for customers in args.sizes:
                for seed in args.seeds:
                    cells.append(run(world, customers, seed))
                    Path(args.json).write_text(json.dumps({"args": vars(args), "cells": cells}, indent=1))


# --------------------------------------------------------------------------- Vowpal Wabbit

class JointBoxVW:
    """VW's contextual bandit over every eligible joint box, insertrec's features as context.

    Namespace ``a`` holds the slot ids and is crossed with the order's features
    (``-q xa``); namespace ``b`` holds the slot-pair crosses, uncrossed (crossing
    them too doubled VW's time, ~2 ms per order with ~90 eligible boxes).
    """

    def __init__(self, combos: np.ndarray, args: str):
        self.combos, self.args = combos, args
        names = "pic"
        self._lines = np.array([
            "|a " + " ".join(f"{names[s]}{a}" for s, a in enumerate(c))
            + " |b " + " ".join(f"{names[s]}{names[t]}{c[s]}_{c[t]}" for s in range(len(c))
                                for t in range(s + 1, len(c)))
            for c in combos], dtype=object)

    @staticmethod
    def _shared(phi: np.ndarray) -> list[str]:
        return ["shared |x " + " ".join(f"f{j}:{v:.5g}" for j, v in zip(np.flatnonzero(row), row[row != 0]))
                for row in phi]

    def _workspace(self):
        from vowpalwabbit import Workspace
        return Workspace(f"--cb_explore_adf -q xa --epsilon {VW_EPSILON} --quiet --random_seed 0 {self.args}")

    def fit(self, phi: np.ndarray, eligible: np.ndarray, chosen: np.ndarray, rewards: np.ndarray,
            pscores: np.ndarray) -> JointBoxVW:
        """``chosen``: logged combo index per order; ``pscores``: its joint logged propensity."""
        self.scale_ = float(rewards.std()) or 1.0
        self.vw_ = self._workspace()
        for shared, ok, c, r, p in zip(self._shared(phi), eligible, chosen, rewards, pscores):
            idx = np.flatnonzero(ok)
            lines = self._lines[idx].copy()
            at = int(np.searchsorted(idx, c))
            lines[at] = f"0:{-r / self.scale_:.6g}:{p:.6g} {lines[at]}"
            self.vw_.learn([shared, *lines])
        return self

    def pmf(self, phi: np.ndarray, eligible: np.ndarray) -> np.ndarray:
        """(n, n_combos) the deployed policy's probabilities (0 off the eligible boxes)."""
        out = np.zeros(eligible.shape)
        for i, (shared, ok) in enumerate(zip(self._shared(phi), eligible)):
            idx = np.flatnonzero(ok)
            out[i, idx] = self.vw_.predict([shared, *self._lines[idx]])
        return out


# --------------------------------------------------------------------------- one cell

def _select_vw(grid: list[str], combos, phi, ok, chosen, rewards, pscores, logged, feats, policy, encoder,
               seed: int) -> tuple[str, list[dict]]:
    """The VW settings whose greedy policy has the best DR lower bound (one-sided 90%) against the
    logging policy on the latest fifth of the log (the orders are in time order)."""
    from insertrec.evaluation import judge_for
    from insertrec.ope import onehot
    late = np.arange(len(chosen)) >= 0.8 * len(chosen)
    judge = judge_for(policy, feats, logged.subset(late), encoder, seed)
    tried = []
    for args in grid:
        vw = JointBoxVW(combos, args).fit(phi[~late], ok[~late], chosen[~late], rewards[~late], pscores[~late])
        greedy = combos[vw.pmf(phi[late], ok[late]).argmax(axis=1)]
        est = judge.judge_difference(onehot(greedy, policy.space.sizes),
                                     onehot(logged.feedback.actions[late], policy.space.sizes), seed, level=0.8)
        tried.append({"args": args, "dr_vs_logged": est.value, "low": est.low})
        vw.vw_.finish()
    return max(tried, key=lambda t: t["low"])["args"], tried


def run_cell(world_name: str, customers: int, seed: int, eval_orders: int, vw_grid: list[str],
             evaluation_cache: dict, pessimism: float | str | None = None) -> dict:
    from insertrec.encoding import FeatureEncoder
    from insertrec.engine import Engine
    from insertrec.evaluation import logged_orders
    from insertrec.features import order_features, order_rewards
    from insertrec.learners import BoostedDirect, box_eligible
    from insertrec.simulation import fresh_orders, policy_values
    from insertrec.training import TrainConfig, train

    world = load_world(world_name)
    timings = {}
    t = time.perf_counter()
    generated = world.generate(customers=customers, seed=seed)
    data = generated.to_dataset()
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(seed=seed) if pessimism is None else TrainConfig(seed=seed, pessimism=pessimism)
        train(data, Path(tmp) / "model", config)
        engine = Engine.load(Path(tmp) / "model")
        tournament = json.loads((Path(tmp) / "model" / "ope.json").read_text()).get("tournament")
    timings["insertrec_train_s"] = time.perf_counter() - t
    policy = engine.policy
    combos, sizes = policy.combos, policy.space.sizes
    key = (world_name, seed)
    if key not in evaluation_cache:
        evaluation_cache[key] = world.evaluation_set(eval_orders, seed=10_000 + seed)
    fresh = fresh_orders(engine, world, evaluation=evaluation_cache[key])
    values = policy_values(policy, fresh)

    # the peers learn from the very same logged orders, through the same features
    t = time.perf_counter()
    feats = order_features(data, engine.params)
    costs = {a.id: a.cost for slot in policy.catalog.slots.values() for a in slot.actions}
    logged = logged_orders(data, feats, order_rewards(data, horizon_days=60, costs=costs), policy.catalog)
    sub = feats.iloc[logged.rows]
    order = np.argsort(sub["order_ts"].to_numpy(), kind="stable")    # VW learns online, in time order
    logged = logged.subset(order)
    sub = feats.iloc[logged.rows]
    encoder = FeatureEncoder().fit(feats)   # insertrec's base encoding (train fits it so)
    phi = encoder.transform(sub)
    f = logged.feedback
    chosen = np.ravel_multi_index(tuple(f.actions.T), sizes)
    ok = box_eligible(policy.catalog, sub, combos)
    ok[np.arange(len(ok)), chosen] = True          # what was logged was possible then
    phi_eval = encoder.transform(fresh.features)
    truth = fresh.truth

    boosted = BoostedDirect(policy.space, seed).fit(phi, f.actions, f.rewards)
    values["value_boosted"] = truth[np.arange(len(truth)), boosted.best(phi_eval, fresh.eligible)]
    timings["boosted_s"] = time.perf_counter() - t

    t = time.perf_counter()
    best_args, tried = vw_grid[0], []
    if len(vw_grid) > 1:
        best_args, tried = _select_vw(vw_grid, combos, phi, ok, chosen, f.rewards, f.pscores.prod(axis=1),
                                      logged, feats, policy, encoder, seed)
    vw = JointBoxVW(combos, best_args).fit(phi, ok, chosen, f.rewards, f.pscores.prod(axis=1))
    pmf = vw.pmf(phi_eval, fresh.eligible)
    vw.vw_.finish()
    values["value_vw"] = (pmf * truth).sum(axis=1)
    values["value_vw_greedy"] = truth[np.arange(len(truth)), pmf.argmax(axis=1)]
    timings["vw_s"] = time.perf_counter() - t
    means = {k: float(v.mean()) for k, v in values.items()}
    control, oracle, rules = means["value_control"], means["value_oracle"], means["value_rules"]
    report = {}
    for k, v in means.items():
        name = k.removeprefix("value_")
        report[name] = {"value": v, "lift_vs_rules": v / rules - 1, "lift_vs_default": v / control - 1,
                        "lift_vs_safe": v / max(rules, control) - 1,   # #11.2: never below either
                        "uplift_captured": (v - control) / (oracle - control)}
    return {"world": world_name, "customers": customers, "seed": seed, "logged_orders": len(logged),
            "eval_orders": len(truth), "policies": report, "vw_selected": best_args, "vw_grid": tried,
            "tournament": tournament, "served_epsilon": engine.manifest.get("served_epsilon"), "timings_s": timings}


def aggregate(cells: list[dict]) -> list[dict]:
    """Mean and sd over seeds of every figure, per (world, customers)."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["world"], c["customers"]), []).append(c)
    out = []
    for (world, customers), cs in groups.items():
        row = {"world": world, "customers": customers, "seeds": [c["seed"] for c in cs], "policies": {}}
        for name in cs[0]["policies"]:
            row["policies"][name] = {
                k: {"mean": float(np.mean([c["policies"][name][k] for c in cs])),
                    "sd": float(np.std([c["policies"][name][k] for c in cs], ddof=1)) if len(cs) > 1 else None}
                for k in cs[0]["policies"][name]}
        out.append(row)
    return out


SHOWN = ("model", "model_greedy", "vw", "vw_greedy", "boosted", "rules", "logging", "control", "oracle")


def _cell(figure: dict) -> str:
    return f"{figure['mean']:6.3f}" + (f"±{figure['sd']:.3f}" if figure["sd"] is not None else "      ")


def print_table(rows: list[dict]) -> None:
    print(f"{'world':>15} {'cust':>7} | " + " ".join(f"{s:>13}" for s in SHOWN))
    for r in rows:
        p = r["policies"]

        def cell(name: str, key: str, p: dict = p) -> str:
            return _cell(p[name][key])
        print(f"{r['world']:>15} {r['customers']:>7} | value   " + " ".join(f"{cell(s, 'value'):>13}" for s in SHOWN))
        print(f"{'':>23} | capture " + " ".join(f"{cell(s, 'uplift_captured'):>13}" for s in SHOWN))
        print(f"{'':>23} | vs rules" + " ".join(f"{cell(s, 'lift_vs_rules'):>13}" for s in SHOWN))
        print(f"{'':>23} | vs dflt " + " ".join(f"{cell(s, 'lift_vs_default'):>13}" for s in SHOWN))
        print(f"{'':>23} | vs safe " + " ".join(f"{cell(s, 'lift_vs_safe'):>13}" for s in SHOWN))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 5k + 30k customers, one VW setting, 5,000 fresh orders")
    ap.add_argument("--worlds", nargs="+", default=["default", "perturbed", *CHANGED_WORLDS])
    ap.add_argument("--sizes", nargs="+", type=int, default=[5000, 30000])
    ap.add_argument("--large", action="store_true", help="also 100,000 customers")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--eval-orders", type=int, default=10_000)
    ap.add_argument("--json", default=str(HERE / "results" / "quality.json"))
    ap.add_argument("--pessimism", type=lambda v: v if v == "auto" else float(v), default=None,
                    help="insertrec's `train --pessimism` (default: train's own)")
    args = ap.parse_args()
    seeds, grid, eval_orders = args.seeds, VW_GRID, args.eval_orders
    if args.quick:
        seeds, grid, eval_orders = seeds[:1], VW_QUICK, min(eval_orders, 5000)
    sizes = [*args.sizes, *([100_000] if args.large else [])]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cells, cache = [], {}
    with threadpool_limits(1):
        for world in args.worlds:
            for customers in sizes:
                for seed in seeds:
                    t = time.perf_counter()
                    cell = run_cell(world, customers, seed, eval_orders, grid, cache, args.pessimism)
                    cells.append(cell)
                    p = cell["policies"]
                    winner = (cell["tournament"] or {}).get("winner", "-")
                    print(f"{world} {customers} seed {seed} ({time.perf_counter() - t:.0f} s, learner {winner}): "
                          "capture " + ", ".join(f"{k} {p[k]['uplift_captured']:.3f}" for k in SHOWN)
                          + f"; model vs the better of rules and all-default {p['model']['lift_vs_safe']:+.2%} "
                          f"(greedy {p['model_greedy']['lift_vs_safe']:+.2%}); exploration served "
                          f"{cell['served_epsilon']}", flush=True)
                    Path(args.json).write_text(json.dumps({"args": vars(args), "cells": cells,
                                                           "table": aggregate(cells)}, indent=1))
    rows = aggregate(cells)
    print_table(rows)
    Path(args.json).write_text(json.dumps({"args": vars(args), "cells": cells, "table": rows}, indent=1))


if __name__ == "__main__":
    main()
