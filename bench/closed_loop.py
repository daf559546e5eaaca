"""The closed loop side by side: insertrec retrained monthly against Vowpal Wabbit learning online.

Both loops start from the same history (the same world, customers and seed:
the world's logging policy decides every order before the loop) and live the
same months (``insertrec.closedloop.closed_loop``); each month is judged by the
world's truth on the orders it decided. insertrec is ``insertrec train`` on all
the logs so far (default settings) with its own exploration. Vowpal Wabbit is
``--cb_explore_adf`` over the joint box (every eligible combination an action,
with slot tokens and their pairwise crosses, quadratic interactions with the
order's features), exploring by its own rule (epsilon 0.1 unless ``--vw``
says otherwise) and learning online from each logged order once its reward is
known (at the month's end, in time order), with the logged joint propensity.

Each round also reports the greedy policy's true value (``greedy``), the orders
with a known reward the learner was given (``logged``) and, with
``--judge-customers N``, the uplift captured on a twin shop of N customers
living the same months under the same policies (``judge``; see
``insertrec.closedloop``).

    nice -n 10 timeout 3000 python bench/closed_loop.py --world default --rounds 12 --customers 5000

Results go to ``bench/results/closed_loop.json`` (merged per world, written after every round).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import vowpalwabbit

from insertrec.closedloop import closed_loop, retrained
from insertrec.schema import FEATURES
from insertrec.training import TrainConfig
from insertrec.world import Month, World
from insertrec.world.simulation import Decide

RESULTS = Path(__file__).parent / "results" / "closed_loop.json"


def _shared(frame: pd.DataFrame) -> list[str]:
    """Each order's VW shared line from the shop's own features (the catalog's columns and ctx_*)."""
    cols = [c for c in frame.columns if c in FEATURES or c.startswith("ctx_")]
    parts = []
    for col in cols:
        v = frame[col]
        if pd.api.types.is_bool_dtype(v):
            parts.append(np.where(v.to_numpy(dtype=bool), f" {col}", ""))
        elif pd.api.types.is_numeric_dtype(v):
            x = np.sign(v.to_numpy(dtype=float)) * np.log1p(np.abs(v.to_numpy(dtype=float)))
            parts.append(np.where(np.isfinite(x), [f" {col}:{a:.4g}" for a in np.nan_to_num(x)], ""))
        else:
            parts.append(np.array([f" {col}={str(a).replace(' ', '_').replace(':', '_').replace('|', '_')}"
                                   for a in v.astype(str)], dtype=object))
    return ["shared |s" + "".join(row) for row in zip(*parts)] if parts else ["shared |s"] * len(frame)


class VWLoop:
    """Vowpal Wabbit's contextual bandit over the joint box, fed the loop's logs as they mature."""

    def __init__(self, world: World, args: str):
        self.catalog, self.combos = world.catalog, world.combos()
        ids = [s.action_ids for s in world.catalog.slots.values()]
        names = list(world.catalog.slots)
        self.action_lines = []
        for box in self.combos:
            toks = [f"{names[s]}={ids[s][a]}" for s, a in enumerate(box)]
            pairs = [f"{names[i]}_{names[j]}={ids[i][box[i]]}_{ids[j][box[j]]}"
                     for i in range(len(box)) for j in range(i + 1, len(box))]
            self.action_lines.append("|a " + " ".join(toks + pairs))
        self.vw = vowpalwabbit.Workspace(f"--cb_explore_adf -q sa --quiet {args}")
        self.known: dict[str, tuple[str, np.ndarray, int, float]] = {}    # order_id -> decided, not yet learned
        self.learned = 0

    def _eligible(self, frame: pd.DataFrame) -> np.ndarray:
        eligible = self.catalog.eligible(frame)
        ok = np.ones((len(frame), len(self.combos)), dtype=bool)
        for s, slot in enumerate(self.catalog.slots):
            ok &= eligible[slot][:, self.combos[:, s]]
        return ok

    def learn(self, month: Month) -> Decide:
        """Remember the month's decisions; learn every order whose reward is now known; deploy."""
        data = month.data
        order_ids = data.orders["order_id"].iloc[month.rows].to_numpy()
        ok = self._eligible(month.features)
        exp = data.exposures
        slots = list(self.catalog.slots)
        index = {s: {a: i for i, a in enumerate(self.catalog.slots[s].action_ids)} for s in slots}
        chosen = np.stack([exp[exp["slot"] == s].set_index("order_id")["action_id"].reindex(order_ids)
                           .map(index[s]).to_numpy() for s in slots], axis=1)
        box = np.ravel_multi_index(chosen.T, [len(self.catalog.slots[s].actions) for s in slots])
        for i, (oid, line) in enumerate(zip(order_ids, _shared(month.features))):
            self.known[oid] = (line, np.flatnonzero(ok[i]), int(box[i]), float(month.probs[i, box[i]]))
        reward = exp.drop_duplicates("order_id").set_index("order_id")["reward"]
        ready = [oid for oid in data.orders["order_id"] if oid in self.known and pd.notna(reward.get(oid))]
        for oid in ready:
            line, acts, b, p = self.known.pop(oid)
            lines = [line] + [(f"0:{-reward[oid]:.4f}:{p:.6f} " if a == b else "") + self.action_lines[a]
                              for a in acts]
            self.vw.learn(lines)
            self.learned += 1
        return self.decide

    def decide(self, frame: pd.DataFrame) -> np.ndarray:
        ok = self._eligible(frame)
        out = np.zeros((len(frame), len(self.combos)))
        for i, line in enumerate(_shared(frame)):
            acts = np.flatnonzero(ok[i])
            pmf = np.asarray(self.vw.predict([line] + [self.action_lines[a] for a in acts]), dtype=float)
            out[i, acts] = pmf / pmf.sum()
        return out


def _chosen(model: Path) -> dict:
    """What training chose for a round (from the model's ope.json and manifest): the tournament's winner,
    the gate's playbook and default slots, the doubted slots and the penalty's z there, and the exploration
    share served per slot."""
    ope = json.loads((model / "ope.json").read_text()) if (model / "ope.json").exists() else {}
    manifest = json.loads((model / "manifest.json").read_text()) if (model / "manifest.json").exists() else {}
    deciders = ope.get("slot_deciders", {})
    return {"winner": ope.get("tournament", {}).get("winner"), "playbook_slots": deciders.get("playbook_slots"),
            "default_slots": deciders.get("default_slots"),
            "doubted_slots": ope.get("pessimism", {}).get("doubted_slots"),
            "pessimism_z": ope.get("pessimism", {}).get("z"),
            "served_epsilon": manifest.get("served_epsilon")}


def _save(results_file: Path, key: str, entry: dict) -> None:
    """Merge this run's entry into the results (locked: the worlds may run side by side)."""
    results_file.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "insertrec-closed_loop.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        results[key] = entry
        results_file.write_text(json.dumps(results, indent=2, allow_nan=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=("default", "perturbed"), default="default")
    ap.add_argument("--perturb-seed", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--customers", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge-customers", type=int, default=0,
                    help="judge each round's policies also on a twin shop of this many customers (0: none)")
    ap.add_argument("--vw", default="--epsilon 0.1", help="Vowpal Wabbit's exploration and learning options")
    ap.add_argument("--pessimism", type=lambda v: v if v == "auto" else float(v), default=TrainConfig().pessimism,
                    help="insertrec's `train --pessimism` (default: train's own)")
    ap.add_argument("--epsilon", type=lambda v: v if v == "auto" else float(v), default=TrainConfig().epsilon,
                    help="insertrec's `train --epsilon` (default: train's own)")
    ap.add_argument("--json", type=Path, default=RESULTS, help="where the results are merged")
    ap.add_argument("--learners", default="vowpalwabbit,insertrec",
                    help="which loops to run, comma-separated (Vowpal Wabbit's does not depend on insertrec's code)")
    args = ap.parse_args()
    world = World.default() if args.world == "default" else World.default().perturbed(args.perturb_seed)
    key = f"{args.world}/{args.customers} customers/{args.rounds} rounds/seed {args.seed}" \
        + (f"/pessimism {args.pessimism}" if args.pessimism else "") \
        + (f"/epsilon {args.epsilon}" if args.epsilon != TrainConfig().epsilon else "")
    entry: dict = {"world": args.world, "customers": args.customers, "seed": args.seed, "rounds": args.rounds,
                   "judge_customers": args.judge_customers,
                   "vw_options": f"--cb_explore_adf -q sa {args.vw}", "pessimism": args.pessimism,
                   "epsilon": args.epsilon,
                   "insertrec": [], "vowpalwabbit": [], "insertrec_chosen": []}
    learners = {"vowpalwabbit": lambda: VWLoop(world, args.vw).learn,
                "insertrec": lambda: retrained(TrainConfig(pessimism=args.pessimism, epsilon=args.epsilon),
                                               lambda model: entry["insertrec_chosen"].append(_chosen(model)))}
    for name in args.learners.split(","):
        learner = learners[name]
        t0 = time.perf_counter()

        def note(row: dict, name: str = name, t0: float = t0) -> None:
            row["seconds"] = round(time.perf_counter() - t0, 1)
            entry[name].append(row)
            _save(args.json, key, entry)
            judged = (f" judge {row['judge_uplift_capture']:.3f} +- {row['judge_uplift_capture_se']:.3f}"
                      f" (greedy {row['judge_uplift_capture_greedy']:.3f})" if "judge_orders" in row else "")
            print(f"{name:>12} round {row['round']:>2.0f}: value {row['value_deployed']:.3f} "
                  f"(oracle {row['value_oracle']:.3f}, control {row['value_control']:.3f}, "
                  f"logging {row['value_logging']:.3f}) uplift {row['uplift_capture']:.3f} "
                  f"+- {row['uplift_capture_se']:.3f} (greedy {row['uplift_capture_greedy']:.3f}){judged} "
                  f"logged {row['logged_orders']:.0f} cum. regret {row['cumulative_regret']:.0f}  "
                  f"[{row['seconds']:.0f} s]", flush=True)

        closed_loop(world, args.rounds, learner(), customers=args.customers, seed=args.seed,
                    judge_customers=args.judge_customers, progress=note)
    ours, theirs = entry["insertrec"], entry["vowpalwabbit"]
    print(f"\n{'round':>5}  {'insertrec uplift':>16}  {'cum. regret':>11}  {'VW uplift':>9}  {'cum. regret':>11}")
    for a, b in zip(ours, theirs):
        print(f"{a['round']:>5.0f}  {a['uplift_capture']:>16.3f}  {a['cumulative_regret']:>11.0f}  "
              f"{b['uplift_capture']:>9.3f}  {b['cumulative_regret']:>11.0f}")
    last3 = ["uplift_capture", "uplift_capture_greedy"] + (
        ["judge_uplift_capture", "judge_uplift_capture_greedy"] if args.judge_customers else [])
    entry["summary"] = {
        name: {"last_uplift_capture": rows[-1]["uplift_capture"],
               **{f"last3_{key}": float(np.mean([r[key] for r in rows[-3:]])) for key in last3},
               "cumulative_regret": rows[-1]["cumulative_regret"]}
        for name, rows in (("insertrec", ours), ("vowpalwabbit", theirs)) if rows}
    if ours and theirs:
        entry["summary"]["insertrec_less_regret"] = ours[-1]["cumulative_regret"] < theirs[-1]["cumulative_regret"]
    assert all(math.isfinite(r["value_deployed"]) for r in ours + theirs)
    _save(args.json, key, entry)


if __name__ == "__main__":
    main()
