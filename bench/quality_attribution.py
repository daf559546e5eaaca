"""Where the uplift goes between the blend fitted on every logged order and the policy as deployed.

For each world, history size and seed: one logged history, trained as
`bench/quality.py` trains it (`insertrec train`, the whole pipeline), and the
pieces of that pipeline taken apart on the same fresh orders, judged by the
simulator's truth (uplift captured = (v - all-default) / (oracle - all-default)):

- ``deployed``: the trained policy with its exploration;
- ``greedy``: the same without exploration (`bench/quality.py`'s ``model_greedy``);
- ``greedy_ungated``: and without the holdout's playbook gate (no playbook or default slots);
- ``greedy_ungated_undoubted``: and without `--pessimism auto`'s doubted slots;
- ``direct_blend``: the incumbent (`learners.BlendLearner`: the ridge box model, the distilled
  boosted model and the split box model, `blended`), each part fitted here on every logged order
  (what `bench/uplift_limits.py --split-blends` scores),
  greedy, no gate, no doubt: equal to the line above unless the final fit differs;
- ``train_part_blend``: the same fitted on the training part only (the tournament's candidate).

Each line's difference with the one above is what that step costs. Per slot the run doubts,
``greedy_undoubted_<slot>``: the greedy policy with that slot alone undoubted (its penalty off, the
gate as trained), the truth of what the doubt keeps from going out there; and, under ``kept_out``,
what the model itself estimates it keeps out (the value model's gain of the undoubted choice over
the doubted one in that slot, per order), the share of orders whose action it changes, and the mean
of gain / standard error over the undoubted non-default choices. Beside them,
``deployed_no_penalty``: the deployed policy without `--pessimism auto`'s penalty in the slots it
doubts (z = 0; the doubted slots still explore at the floor alone), what the penalty costs as
deployed (bench/results/split100k.md section 4, doubt_cost.md). The
evaluation orders can be two sets (``--eval-orders``), to show how much the
choice of fresh orders moves the figures. ``--first-log``: the history is the one the closed loop's
first round trains on (`insertrec.closedloop`, 12 monthly rounds: the log before its first month;
`bench/closed_loop.py --world perturbed` is world ``perturbed@7`` here).

Usage:
  python bench/quality_attribution.py --seeds 1 3 --eval-orders 5000 10000
  python bench/quality_attribution.py --first-log --sizes 30000 --seeds 1 --eval-orders 4000
Results go to bench/results/quality_attribution.json (--json to change).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from quality import cell_parser, load_world, run_cells

HERE = Path(__file__).resolve().parent


def run_cell(world_name: str, customers: int, seed: int, eval_sizes: list[int], first_log: bool = False) -> dict:
    from insertrec.closedloop import MONTH_DAYS
    from insertrec.encoding import FeatureEncoder
    from insertrec.engine import Engine
    from insertrec.evaluation import logged_orders
    from insertrec.features import order_features, order_rewards
    from insertrec.learners import BlendLearner
    from insertrec.ope import expected_value, onehot
    from insertrec.simulation import fresh_orders
    from insertrec.training import TrainConfig, train

    world = load_world(world_name)
    data = world.shop_run(customers, seed).advance(world.days - 12 * MONTH_DAYS).data if first_log else \
        world.generate(customers=customers, seed=seed).to_dataset()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train(data, Path(tmp) / "model", TrainConfig(seed=seed))
        engine = Engine.load(Path(tmp) / "model")
        ope = json.loads((Path(tmp) / "model" / "ope.json").read_text())
    train_s = time.perf_counter() - t
    deployed = engine.policy

    feats = order_features(data, engine.params)
    costs = {a.id: a.cost for slot in deployed.catalog.slots.values() for a in slot.actions}
    logged = logged_orders(data, feats, order_rewards(data, horizon_days=60, costs=costs), deployed.catalog)
    encoder = FeatureEncoder().fit(feats)
    template = deployed.replace(epsilon=0.0, playbook_slots=(), default_slots=(), pessimism=0.0,
                                doubted_slots=None)

    def blend_on(part) -> object:
        return BlendLearner().fit(feats.iloc[part.rows], part.feedback, encoder, template, seed)

    ts = feats["order_ts"].iloc[logged.rows]
    split = ts.quantile(0.8)
    greedy = deployed.replace(epsilon=0.0)
    ungated = greedy.replace(playbook_slots=(), default_slots=())
    policies = {"deployed": deployed, "greedy": greedy, "greedy_ungated": ungated,
                "greedy_ungated_undoubted": ungated.replace(pessimism=0.0, doubted_slots=None),
                "direct_blend": blend_on(logged),
                "train_part_blend": blend_on(logged.subset((ts < split).to_numpy())),
                "deployed_no_penalty": deployed.replace(pessimism=0.0)}
    doubted = deployed.doubted_slots or ()
    undoubted = {slot: greedy.replace(doubted_slots=tuple(d for d in doubted if d != slot)) for slot in doubted}
    policies |= {f"greedy_undoubted_{slot}": p for slot, p in undoubted.items()}

    out: dict = {"world": world_name, "customers": customers, "seed": seed, "first_log": first_log,
                 "logged_orders": len(logged),
                 "train_s": train_s, "winner": ope["tournament"]["winner"],
                 "slot_deciders": ope.get("slot_deciders"), "doubted_slots": ope["pessimism"]["doubted_slots"],
                 "pessimism_z": ope["pessimism"]["z"],
                 "eval": {}}
    for n in eval_sizes:
        fresh = fresh_orders(engine, world, evaluation=world.evaluation_set(n, seed=10_000 + seed))
        truth, sizes = fresh.truth, deployed.space.sizes
        control = float(expected_value(truth, onehot(np.tile(np.array(deployed.space.defaults), (len(truth), 1)),
                                                     sizes)).mean())
        oracle = float(np.where(fresh.eligible, truth, -np.inf).max(axis=1).mean())
        row, chosen = {}, {}
        for name, p in policies.items():
            batch = p.decide_frame(fresh.features)
            v = float(expected_value(truth, p.probabilities(batch)).mean())
            row[name], chosen[name] = (v - control) / (oracle - control), batch.greedy
        out["eval"][str(n)] = row | {"kept_out": {
            slot: _kept_out(greedy, slot, fresh.features, chosen["greedy"], chosen[f"greedy_undoubted_{slot}"])
            for slot in undoubted}}
        print(f"{world_name} {customers} seed {seed} eval {n} (winner {out['winner']}, doubted {list(doubted)}, "
              f"z {out['pessimism_z']:g}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        for slot, kept in out["eval"][str(n)]["kept_out"].items():
            print(f"  {slot}: the model estimates the doubt keeps out {kept['estimate']:+.3f} per order "
                  f"(changes {kept['share_changed']:.0%} of the orders; undoubted choices' gain / se "
                  f"{kept['gain_over_se']:.2f})", flush=True)
    return out


def _kept_out(doubted, slot: str, feats, doubted_boxes: np.ndarray, undoubted_boxes: np.ndarray) -> dict[str, float]:
    """What the value model itself estimates the doubt keeps out in ``slot``: the mean gain (over the
    slot default, per order) of the undoubted policy's action there less the doubted one's (their
    greedy boxes, ``undoubted_boxes`` and ``doubted_boxes``), the share of orders whose action
    differs, and the mean gain / standard error of the undoubted policy's non-default actions there
    (the se its `--pessimism` penalty is a share of)."""
    from insertrec.valuemodel import BoxGrid

    s = doubted.slot_names.index(slot)
    a, b = doubted_boxes[:, s], undoubted_boxes[:, s]
    rules = doubted.catalog.assess(feats)[1]
    phi, model = doubted.encoder.transform(feats), doubted.value_model
    columns = rules + model.box_grid.columns
    gains = model.box_grid.per_action(phi, columns)[:, model.box_grid.slices[s]]
    se = gains - BoxGrid(model, 1.0).per_action(phi, columns)[:, model.box_grid.slices[s]]
    rows, moved = np.arange(len(a)), b != doubted.space.defaults[s]
    ratio = gains[rows, b] / np.where(se[rows, b] > 0, se[rows, b], np.inf)
    return {"estimate": float((gains[rows, b] - gains[rows, a]).mean()), "share_changed": float((a != b).mean()),
            "gain_over_se": float(ratio[moved].mean()) if moved.any() else 0.0}


def main() -> None:
    ap = cell_parser(__doc__, "quality_attribution.json")
    ap.add_argument("--eval-orders", nargs="+", type=int, default=[5000, 10_000])
    ap.add_argument("--first-log", action="store_true",
                    help="the history the closed loop's first round trains on (12 monthly rounds)")
    args = ap.parse_args()
    run_cells(args, lambda world, customers, seed: run_cell(world, customers, seed, args.eval_orders,
                                                           args.first_log))


if __name__ == "__main__":
    main()
