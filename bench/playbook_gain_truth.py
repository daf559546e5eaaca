"""The doubt's evidence against the truth: the playbook's gain over the slot default, per slot.

`--pessimism auto` (the default) doubts a slot where the whole log's DR estimate of the playbook's
gain over the slot default, weighed against a small prior in its favour, is not positive
(`training._doubted_slots`, on `evaluation.playbook_gains`). This computes that estimate exactly as
training does (the whole log's cross-fitted judge, the paired 80% interval) and IPS beside it, and
the world's truth on the same logged orders: per order, the expected reward of the playbook's action
in the slot less the default's, the other slots as the logging policy drew them, averaged. So it
says whether a doubt that fires where the playbook truly pays is the estimator's bias or its noise,
and how often the 80% interval holds the truth; ``doubted`` is what training's rule makes of the
estimates (`training._doubted_slots`, on the log's reward sd).

The history is the closed loop's first log (`insertrec.closedloop`, 12 monthly rounds: the log the
first round trains on), where the world keeps every logged order's truth and the probability the
logging policy gave each box; with ``--rounds K``, the log round K + 1 trains on, after K months
decided by insertrec retrained each month (`closedloop.retrained`, `insertrec train`'s defaults), so
the doubt's evidence is judged on logs the model wrote as well as on the shop's own.

Usage:
  python bench/playbook_gain_truth.py --seeds 1 2 3 4 5 6 7
  python bench/playbook_gain_truth.py --worlds small_effects --sizes 5000 --seeds 1 2 3
  python bench/playbook_gain_truth.py --seeds 1 --rounds 6
Results go to bench/results/playbook_gain_truth.json (--json to change).
"""

from __future__ import annotations

import numpy as np
from quality import cell_parser, load_world, logged_history, run_cells


def run_cell(world_name: str, customers: int, seed: int, rounds: int = 0) -> dict:
    import pandas as pd

    from insertrec.closedloop import MONTH_DAYS, retrained
    from insertrec.encoding import FeatureEncoder
    from insertrec.evaluation import judge_for, playbook_gains, policy_probabilities
    from insertrec.ope import DEFAULT_ESTIMATORS, onehot
    from insertrec.policy import Policy
    from insertrec.training import TrainConfig, _doubted_slots

    world = load_world(world_name)
    config = TrainConfig(seed=seed)
    run, start = world.shop_run(customers, seed), world.days - 12 * MONTH_DAYS
    months = [run.advance(start)]
    learn = retrained(config)
    for k in range(rounds):
        months.append(run.advance(start + (k + 1) * MONTH_DAYS, learn(months[-1])))
    month = months[-1]
    _, feats, logged = logged_history(month.data, config)
    rules = Policy(month.data.catalog, epsilon=0.0)
    judge = judge_for(rules, feats, logged, FeatureEncoder().fit(feats), seed)
    dr = playbook_gains(rules, feats, judge, seed=seed)
    sub = feats.iloc[logged.rows]
    sizes, defaults = rules.space.sizes, rules.space.defaults
    playbook = policy_probabilities(rules, sub)
    default = onehot(np.tile(np.array(defaults), (len(sub), 1)), sizes)
    ips = [judge.judge_difference(playbook, default, seed, slot=s, level=0.8, estimator=DEFAULT_ESTIMATORS[0])
           for s in range(len(sizes))]

    # the truth on the same orders, found by order id in the stretch that decided each
    ids = np.concatenate([m.data.orders["order_id"].to_numpy()[m.rows] for m in months])
    at = pd.Index(ids).get_indexer(month.data.orders["order_id"].to_numpy()[logged.rows])
    assert (at >= 0).all(), "every logged order is one of the loop's"
    combos = world.combos()
    assert (np.ravel_multi_index(tuple(combos.T), sizes) == np.arange(len(combos))).all(), "boxes in C order"
    hidden = pd.concat([m.hidden for m in months], ignore_index=True).iloc[at]
    truth, drawn = world.expected_reward(hidden, combos), np.vstack([m.probs for m in months])[at]
    chosen = rules.decide_frame(sub, explore=False).greedy
    # what `--pessimism auto` makes of these estimates: training's own rule, on the log's reward sd
    doubted = _doubted_slots(rules, dr, float(np.std(logged.feedback.rewards)))
    out: dict = {"world": world_name, "customers": customers, "seed": seed, "rounds": rounds, "orders": len(at),
                 "doubted": list(doubted), "slots": {}}
    for s, slot in enumerate(rules.slot_names):
        gain = np.zeros(len(at))
        for a in np.unique(chosen[:, s]):
            rows = chosen[:, s] == a
            with_a, with_default = combos.copy(), combos.copy()
            with_a[:, s], with_default[:, s] = a, defaults[s]
            boxes = [np.ravel_multi_index(tuple(c.T), sizes) for c in (with_a, with_default)]
            gain[rows] = ((truth[rows][:, boxes[0]] - truth[rows][:, boxes[1]]) * drawn[rows]).sum(axis=1)
        out["slots"][slot] = {"truth": float(gain.mean()), "dr": dr[s].value, "dr_low": dr[s].low,
                              "dr_high": dr[s].high, "ips": ips[s].value,
                              "held": bool(dr[s].low <= gain.mean() <= dr[s].high)}
    print(f"{world_name} {customers} seed {seed}, after {rounds} rounds ({len(at)} orders): " + "; ".join(
        f"{slot} truth {v['truth']:+.2f}, DR {v['dr']:+.2f} [{v['dr_low']:+.2f}, {v['dr_high']:+.2f}], "
        f"IPS {v['ips']:+.2f}" for slot, v in out["slots"].items()) + f"; doubted {list(doubted)}", flush=True)
    return out


def main() -> None:
    ap = cell_parser(__doc__, "playbook_gain_truth.json")
    ap.add_argument("--rounds", type=int, default=0,
                    help="months of the loop decided by insertrec before the log is judged (0: the first log)")
    args = ap.parse_args()
    run_cells(args, lambda world, customers, seed: run_cell(world, customers, seed, args.rounds))


if __name__ == "__main__":
    main()
