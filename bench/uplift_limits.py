"""What caps the uplift captured: the learners' form, their estimates' noise, or exploration.

For each world, history size and seed: one logged history; each learner
family (`insertrec.learners`) fitted on all its logged orders as the
tournament's final fit would be, once on the logged rewards and once on the
simulator's noise-free expected reward of each logged box (``world.json``'s
truth, which only a benchmark may read: the ceiling of the form on that
history). Every fit decides the same fresh orders, judged by their true
values: greedy, and with exploration at a few shares (as `Policy` serves it,
without training's playbook gate, which `bench/quality.py` measures).

With ``--blend-weights``, each weight's blend of the ridge box model and the
distilled boosted model fitted there (`insertrec.learners.blended`; both
families must be among ``--families``) is scored alike; with
``--evidence-blend``, also their blend at the weight
`blend_rules.blend_evidence` reads off the two fits; with
``--stacked-blend``, at the weight `blend_rules.stacked_weight` finds
on the latest orders (training's time split: the ridge and the boosted model
fitted on the earlier part as the tournament fits them, judged on the rest);
with ``--split-blends``, the three-way blend of the ridge, the boosted model and the split
box model (``blend3``, `blended`'s ``split``; the families ridge_box, boosted and split_box
must be among ``--families``); with ``--kept-boosted`` too, every blend again with that boosted fit in place of
the one on every order (training's final fit above `tournament.FINAL_ORDERS`); with
``--kept-split-shares``, three-way blends at the ridge's and split's shares given (and at
`learners.orders_shares`'s, as training serves it), the boosted part the tournament's fit.

Reported per cell: uplift captured = (v - all-default) / (oracle - all-default).
A form that captures much more on the noise-free reward than on the logged
one is capped by its estimates' variance at that size, not by its form.

Usage:
  python bench/uplift_limits.py --worlds default --sizes 30000 --seeds 1 2 3
Results go to bench/results/uplift_limits.json (--json to change).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from blend_rules import blend_evidence, stacked_weight
from quality import cell_parser, load_world, logged_history, run_cells

HERE = Path(__file__).resolve().parent
EPSILONS = (0.1, 0.05, 0.02)


def run_cell(world_name: str, customers: int, seed: int, eval_orders: int, families: list[str],
             blend_weights: list[float], rewards: list[str], evidence: bool = False, stacked: bool = False,
             kept: bool = False, split_blends: bool = False,
             split_shares: list[tuple[float, float]] | None = None) -> dict:
    from insertrec import features
    from insertrec.encoding import FeatureEncoder
    from insertrec.learners import BoostedLearner, BoxLearner, SplitLearner, blended, box_eligible, orders_shares
    from insertrec.ope import LoggedFeedback, expected_value, onehot
    from insertrec.policy import Policy
    from insertrec.tournament import CANDIDATE_ORDERS, fit_candidate
    from insertrec.training import TrainConfig

    world = load_world(world_name)
    generated = world.generate(customers=customers, seed=seed)
    data = generated.to_dataset()
    catalog, config = data.catalog, TrainConfig(seed=seed)
    params, feats, logged = logged_history(data, config)
    sub = feats.iloc[logged.rows]
    encoder = FeatureEncoder().fit(feats)
    policy = Policy(catalog, epsilon=0.0, version="uplift-limits")
    combos, sizes = policy.combos, policy.space.sizes

    # the noise-free reward: each logged order's expected value of the box it received
    position = dict(zip(data.orders["order_id"].astype(str), range(len(data.orders))))
    hidden = generated.hidden.iloc[[position[o] for o in sub["order_id"].astype(str)]].reset_index(drop=True)
    chosen = np.ravel_multi_index(tuple(logged.feedback.actions.T), sizes)
    f = logged.feedback
    noise_free = LoggedFeedback(world.expected_reward(hidden, combos)[np.arange(len(chosen)), chosen],
                                f.actions, f.pscores)

    evaluation = world.evaluation_set(eval_orders, seed=10_000 + seed)
    fresh = features.order_features(evaluation.data, params)
    fresh = fresh.set_index(fresh["order_id"].astype(str)).loc[list(map(str, evaluation.order_ids))]
    fresh = fresh.reset_index(drop=True)
    truth = world.expected_reward(evaluation.hidden, combos)
    oracle = float(np.where(box_eligible(catalog, fresh, combos), truth, -np.inf).max(axis=1).mean())
    control = float(expected_value(truth, onehot(np.tile(np.array(policy.space.defaults), (len(fresh), 1)),
                                                 sizes)).mean())

    def capture(value: float) -> float:
        return (value - control) / (oracle - control)

    learners = {"ridge_box": BoxLearner(), "spline_box": BoxLearner(knots=4), "boosted": BoostedLearner(),
                "split_box": SplitLearner()}
    out: dict = {"world": world_name, "customers": customers, "seed": seed, "logged_orders": len(logged),
                 "reward_sd": float(f.rewards.std()), "noise_free_reward_sd": float(noise_free.rewards.std()),
                 "families": {}}
    def score(name: str, reward: str, fitted: Policy, t: float) -> None:
        greedy = fitted.decide_frame(fresh).greedy
        row = {"greedy": capture(float(expected_value(truth, onehot(greedy, sizes)).mean()))}
        for eps in EPSILONS:
            served = fitted.replace(epsilon=eps)
            row[f"epsilon_{eps}"] = capture(float(expected_value(
                truth, served.probabilities(served.decide_frame(fresh))).mean()))
        alpha = getattr(fitted.value_model, "alpha_", None)
        row |= {"alpha": list(alpha) if alpha is not None else None, "fit_s": time.perf_counter() - t}
        out["families"].setdefault(name, {})[reward] = row
        print(f"{world_name} {customers} seed {seed} {name} on {reward} rewards: "
              + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith(("greedy", "epsilon"))),
              flush=True)

    for reward, feedback in (("logged", f), ("noise_free", noise_free)):
        if reward not in rewards:
            continue
        fits = {}
        for name in families:
            t = time.perf_counter()
            fits[name] = learners[name].fit(sub, feedback, encoder, policy, seed)
            score(name, reward, fits[name], t)
        for weight in blend_weights:
            t = time.perf_counter()
            score(f"blend_{weight:g}", reward, blended(fits["ridge_box"], fits["boosted"], weight), t)
        if split_blends:   # the incumbent's three parts, a third each
            t = time.perf_counter()
            score("blend3", reward, blended(fits["ridge_box"], fits["boosted"], split=fits["split_box"]), t)
        if split_shares:   # as training serves the incumbent above FINAL_ORDERS: the ridge and the split on
            # every order, the boosted part the tournament's fit (at most CANDIDATE_ORDERS of the earlier part)
            ts = sub["order_ts"].to_numpy()
            train_part = logged.subset(ts < np.quantile(ts, 1 - config.holdout_share))
            kept_boosted = fit_candidate(BoostedLearner(), feats, train_part, encoder, policy, seed)
            served = orders_shares(len(logged), min(len(train_part), CANDIDATE_ORDERS), len(logged))
            for ridge_share, split_share in [*split_shares, (served[0], served[2])]:
                score(f"kept_blend3_{ridge_share:.3g}_{split_share:.3g}", reward,
                      blended(fits["ridge_box"], kept_boosted, ridge_share, split=fits["split_box"],
                              split_weight=split_share), time.perf_counter())
        if evidence:   # the weight `blend_rules.blend_evidence` reads off the two fits
            t = time.perf_counter()
            found = blend_evidence(fits["ridge_box"].value_model, fits["boosted"].value_model,
                                   fits["boosted"].encoder.transform(sub))
            score("blend_evidence", reward, blended(fits["ridge_box"], fits["boosted"], found.weight), t)
            out["families"]["blend_evidence"][reward] |= {"weight": found.weight, **vars(found)}
        if stacked:   # the weight `blend_rules.stacked_weight` finds on the latest orders, as training splits them
            t = time.perf_counter()
            ts = sub["order_ts"].to_numpy()
            late = ts >= np.quantile(ts, 1 - config.holdout_share)
            train_part, holdout = logged.subset(~late), logged.subset(late)
            ridge = BoxLearner().fit(feats.iloc[train_part.rows], train_part.feedback, encoder, policy, seed)
            boosted = fit_candidate(BoostedLearner(), feats, train_part, encoder, policy, seed)
            weight = stacked_weight(ridge, boosted, feats.iloc[holdout.rows], holdout.feedback)
            score("blend_stacked", reward, blended(fits["ridge_box"], fits["boosted"], weight), t)
            out["families"]["blend_stacked"][reward]["weight"] = weight
            if kept:   # the boosted part the tournament's fit, as training serves it above FINAL_ORDERS
                for w in blend_weights:
                    score(f"kept_blend_{w:g}", reward, blended(fits["ridge_box"], boosted, w), time.perf_counter())
                t = time.perf_counter()
                found = blend_evidence(fits["ridge_box"].value_model, boosted.value_model,
                                       boosted.encoder.transform(feats.iloc[train_part.rows]))
                score("kept_blend_evidence", reward, blended(fits["ridge_box"], boosted, found.weight), t)
                out["families"]["kept_blend_evidence"][reward] |= {"weight": found.weight, **vars(found)}
                score("kept_blend_stacked", reward, blended(fits["ridge_box"], boosted, weight), time.perf_counter())
                out["families"]["kept_blend_stacked"][reward]["weight"] = weight
                w = orders_shares(len(logged), min(len(train_part), CANDIDATE_ORDERS))[0]   # as training serves it
                score("kept_blend_orders", reward, blended(fits["ridge_box"], boosted, w), time.perf_counter())
                out["families"]["kept_blend_orders"][reward]["weight"] = w
    return out


def main() -> None:
    ap = cell_parser(__doc__, "uplift_limits.json")
    ap.add_argument("--families", nargs="+", default=["ridge_box", "spline_box", "boosted"])
    ap.add_argument("--blend-weights", nargs="*", type=float, default=[],
                    help="the ridge's shares of the blends scored (needs ridge_box and boosted)")
    ap.add_argument("--evidence-blend", action="store_true",
                    help="also the blend at the weight `blend_rules.blend_evidence` reads off the fits")
    ap.add_argument("--stacked-blend", action="store_true",
                    help="also the blend at the weight `blend_rules.stacked_weight` finds on the time-split holdout")
    ap.add_argument("--kept-boosted", action="store_true",
                    help="with --stacked-blend: the blends again with the tournament's boosted fit (at most "
                         "CANDIDATE_ORDERS of the earlier part), as training serves the blend above FINAL_ORDERS")
    ap.add_argument("--split-blends", action="store_true",
                    help="also the three-way blend with the split box model (needs ridge_box, boosted, split_box)")
    ap.add_argument("--kept-split-shares", nargs="*", default=[], metavar="RIDGE,SPLIT",
                    type=lambda pair: tuple(float(x) for x in pair.split(",")),
                    help="the ridge's and the split's shares of three-way blends with the tournament's boosted "
                         "fit, the ridge and the split on every order (needs ridge_box and split_box); the "
                         "shares `learners.orders_shares` gives are scored too")
    ap.add_argument("--rewards", nargs="+", choices=["logged", "noise_free"], default=["logged", "noise_free"])
    ap.add_argument("--eval-orders", type=int, default=10_000)
    args = ap.parse_args()
    run_cells(args, lambda world, customers, seed: run_cell(world, customers, seed, args.eval_orders, args.families,
                                                            args.blend_weights, args.rewards, args.evidence_blend,
                                                            args.stacked_blend, args.kept_boosted,
                                                            args.split_blends, args.kept_split_shares))


if __name__ == "__main__":
    main()
