"""What the deployed policy's gate and pessimism cost on one default-world history: the policy
`insertrec train --pessimism auto` serves, scored by the simulator's truth on `bench/quality.py`'s
fresh orders (5,000, evaluation seed 10,000 + seed) as served, without the playbook gate, without
the pessimism, and without either (bench/results/split100k.md §4).

Usage:
  python bench/deployed_parts.py SEED [--customers 100000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from quality import load_world


def main() -> None:
    from insertrec.engine import Engine
    from insertrec.simulation import fresh_orders, policy_values
    from insertrec.training import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed", type=int)
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--json")
    args = ap.parse_args()
    world = load_world("default")
    data = world.generate(customers=args.customers, seed=args.seed).to_dataset()
    with tempfile.TemporaryDirectory() as tmp:
        train(data, Path(tmp) / "model", TrainConfig(seed=args.seed, pessimism="auto"))
        engine = Engine.load(Path(tmp) / "model")
        ope = json.loads((Path(tmp) / "model" / "ope.json").read_text())
    policy = engine.policy
    out: dict = {"seed": args.seed, "customers": args.customers, "slot_deciders": ope.get("slot_deciders"),
                 "pessimism": ope.get("pessimism")}
    fresh = fresh_orders(engine, world, evaluation=world.evaluation_set(5000, seed=10_000 + args.seed))
    variants = {"served": policy,
                "no gate": policy.replace(playbook_slots=(), default_slots=()),
                "no pessimism": policy.replace(pessimism=0.0),
                "neither": policy.replace(playbook_slots=(), default_slots=(), pessimism=0.0)}
    for name, variant in variants.items():
        v = {k: float(x.mean()) for k, x in policy_values(variant, fresh).items()}
        span = v["value_oracle"] - v["value_control"]
        out[name] = {"deployed": (v["value_model"] - v["value_control"]) / span,
                     "greedy": (v["value_model_greedy"] - v["value_control"]) / span}
        print(name, out[name], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
