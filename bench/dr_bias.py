"""How far the holdout DR estimate is from the simulator's truth, and why.

For the default world, the perturbed one (``World.default().perturbed(seed=2026)``) and the
changed worlds of bench/worlds/ over several generation seeds, trains exactly as tests/test_quality.py does
(30k customers, cutoff at the 0.8 quantile of order_ts, the last fifth the
holdout), then on the holdout orders reports:

  - truth: the learned policy's true value on the same orders (world.expected_reward
    averaged under the policy's probabilities), and the logging policy's;
  - IPS, SNIPS and DR as the library's `Judge.judge` computes them (IPS and SNIPS with
    weights clipped at JOINT_CLIP, DR at DR_CLIP), their errors in %, the ESS;
  - DR's error split into the direct-method part (mean q_target - truth) and the
    correction part (mean w (r - q_logged)), the correction split into what it is
    expected to be given q (known here: the truth of every box, the logging
    policy's probabilities) and reward noise; and the clip's share of the weight mass
    (1 - sum min(w, c) / sum w) and the clip's bias given q,
    -mean_x sum_a pi (1 - min(1, c mu / pi)) (T - q);
  - the lifts (DR of the policy over DR of the playbook, and over the mean logged reward)
    minus the same lifts in truth, in points (#11.6: within 3), and the half-width of the
    lift's paired 95% interval;
  - the same for DR with the slates' pseudo-inverse weight (`ope.DRPI`, what `evaluate` reports;
    columns drpi_*), with the half-widths of its lifts' intervals (what decides whether
    `evaluate` prints them) and its weights' effective sample.

Trained models and the arrays the estimators need (the judge's q included, as
the code of the run that built them fitted it) are cached per (world, seed)
under /tmp/dr_cache (override with --cache; use a fresh one after changing the
judge or training), so estimator variants are tried without retraining.

Usage: python bench/dr_bias.py [--seeds 4242 1 2 3] [--worlds default perturbed small_effects ...]
                               [--json bench/results/dr_bias.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

CUSTOMERS = 30_000


def _world(kind: str):
    from quality import load_world  # bench/quality.py: default, perturbed, or bench/worlds/<kind>.json
    return load_world(kind)


def build(kind: str, seed: int, cache: Path) -> dict[str, np.ndarray]:
    """The holdout's arrays for (world, seed): trained once, then read from the cache."""
    path = cache / f"{kind}_{seed}"
    arrays = path / "arrays.npz"
    if arrays.exists():
        with np.load(arrays) as z:
            return {k: z[k] for k in z.files}
    from insertrec.engine import Engine
    from insertrec.evaluation import judge_for, logged_orders, policy_probabilities, rules_actions
    from insertrec.features import order_features, order_rewards
    from insertrec.policy import Policy
    from insertrec.training import TrainConfig, train

    path.mkdir(parents=True, exist_ok=True)
    world = _world(kind)
    t0 = time.perf_counter()
    generated = world.generate(customers=CUSTOMERS, seed=seed)
    cutoff = generated.orders["order_ts"].quantile(0.8)
    if not (path / "model").exists():
        train(generated.to_dataset(), path / "model", TrainConfig(cutoff=cutoff.isoformat()))
    engine = Engine.load(path / "model")
    data = generated.to_dataset()
    feats = order_features(data, engine.params)
    costs = {a.id: a.cost for slot in engine.catalog.slots.values() for a in slot.actions}
    logged = logged_orders(data, feats, order_rewards(data, horizon_days=60, costs=costs), engine.catalog)
    late = logged.subset((feats["order_ts"].iloc[logged.rows] >= cutoff).to_numpy())
    sub = feats.iloc[late.rows]
    policy = engine.policy
    probs = policy_probabilities(policy, sub)
    playbook = policy_probabilities(Policy(policy.catalog, epsilon=0.0), sub)
    logging = policy_probabilities(Policy(policy.catalog, epsilon=world.epsilon), sub)
    combos = policy.combos
    truth = world.expected_reward(generated.hidden.iloc[late.rows].reset_index(drop=True), combos)
    judge = judge_for(policy, feats, late, policy.encoder)
    f = late.feedback
    out = {"rewards": f.rewards, "actions": f.actions, "pscores": f.pscores,
           "phi": policy.encoder.transform(sub), "rules": rules_actions(policy.catalog, sub),
           "truth": truth, "q_baseline": judge.q_baseline, "q_boxes": judge.q_boxes,
           "q_logged": judge.q_logged, "sizes": np.asarray(policy.space.sizes),
           "defaults": np.asarray(policy.space.defaults)}
    for name, p in (("pi", probs), ("playbook", playbook), ("mu", logging)):
        for s, ps in enumerate(p):
            out[f"{name}{s}"] = ps
    np.savez(arrays, **out)
    print(f"  built {kind} seed {seed}: {len(f.rewards)} holdout orders, {time.perf_counter() - t0:.0f} s",
          flush=True)
    return out


def probs_of(a: dict[str, np.ndarray], name: str) -> list[np.ndarray]:
    return [a[f"{name}{s}"] for s in range(len(a["sizes"]))]


def joint(probs: list[np.ndarray]) -> np.ndarray:
    """(n, n_boxes) product-form probabilities in ActionSpace.combos (C) order."""
    out = probs[0]
    for p in probs[1:]:
        out = (out[:, :, None] * p[:, None, :]).reshape(len(out), -1)
    return out


def diagnose(a: dict[str, np.ndarray], name: str = "pi", clip: float | None = None) -> dict[str, float]:
    """The library's estimates of policy ``name`` and DR's error decomposed (see the module docstring);
    ``clip`` is DR's (default: the library's DR_CLIP; IPS and SNIPS keep JOINT_CLIP). Also the lifts
    `evaluate` reports (DR of ``name`` over DR of the playbook, and over the mean logged reward) against
    the same lifts in truth, in points."""
    from insertrec.ope import DR, DR_CLIP, IPS, SNIPS, LoggedFeedback, estimate
    clip = DR_CLIP if clip is None else clip
    estimators = (IPS(), SNIPS(), DR(clip=clip))
    f = LoggedFeedback(a["rewards"], a["actions"], a["pscores"])
    probs = probs_of(a, name)
    n = len(f.rewards)
    pj, mj = joint(probs), joint(probs_of(a, "mu"))
    truth_v = float((pj * a["truth"]).sum(1).mean())
    box = np.ravel_multi_index(tuple(f.actions.T), tuple(a["sizes"]))
    q_all = a["q_baseline"][:, None] + a["q_boxes"]
    q_target = (pj * q_all).sum(1)
    w_exact = f.weights(probs, clip=None)
    w = np.minimum(w_exact, clip)
    est = estimate(f, probs, a["q_logged"], q_target, estimators=estimators)
    rules = probs_of(a, "playbook")
    rules_dr = estimate(f, rules, a["q_logged"], (joint(rules) * q_all).sum(1), estimators=estimators).dr.value
    rules_truth = float((joint(rules) * a["truth"]).sum(1).mean())
    logging_truth = float((mj * a["truth"]).sum(1).mean())
    resid = f.rewards - a["q_logged"]
    t_logged = a["truth"][np.arange(n), box]
    ratio = np.divide(pj, mj, out=np.zeros_like(pj), where=mj > 0)
    kept = np.minimum(1.0, np.divide(clip, ratio, out=np.ones_like(ratio), where=ratio > 0))
    clip_bias = float(-(pj * (1 - kept) * (a["truth"] - q_all)).sum(1).mean())
    pct = lambda v: 100.0 * (v - truth_v) / abs(truth_v)
    return {
        "n": n, "truth": truth_v, "logging_truth": logging_truth, "rules_truth": rules_truth,
        "mean_reward": float(f.rewards.mean()), "mean_truth_logged_box": float(t_logged.mean()),
        "ips": est.ips.value, "snips": est.snips.value, "dr": est.dr.value, "rules_dr": rules_dr,
        "ips_pct": pct(est.ips.value), "snips_pct": pct(est.snips.value), "dr_pct": pct(est.dr.value),
        "lift_rules_err": 100.0 * (est.dr.value / rules_dr - truth_v / rules_truth),
        "lift_rules_hw": 100.0 * _half(estimators[2].difference(f, probs, q_target, rules, (joint(rules) * q_all).sum(1),
                                                                 a["q_logged"])) / abs(rules_dr),
        "lift_logging_err": 100.0 * (est.dr.value / float(f.rewards.mean()) - truth_v / logging_truth),
        "rules_dr_pct": 100.0 * (rules_dr - rules_truth) / abs(rules_truth),
        "logging_pct": 100.0 * (float(f.rewards.mean()) - logging_truth) / abs(logging_truth),
        "dr_low": est.dr.low, "dr_high": est.dr.high, "ess": est.ess,
        "dm_pct": pct(float(q_target.mean())),
        "corr_pct": 100.0 * float((w * resid).mean()) / abs(truth_v),
        "corr_expected_pct": 100.0 * float((mj * np.minimum(ratio, clip) * (a["truth"] - q_all)).sum(1).mean())
        / abs(truth_v),
        "corr_noise_pct": 100.0 * float((w * (f.rewards - t_logged)).mean()) / abs(truth_v),
        "clip_bias_pct": 100.0 * clip_bias / abs(truth_v),
        "clipped_mass_pct": 100.0 * (1.0 - float(w.sum() / w_exact.sum())),
        "mean_w_exact": float(w_exact.mean()), "mean_w": float(w.mean()),
        "pscore_check": float(np.abs(mj[np.arange(n), box] - f.pscores.prod(1)).max()),
        **pseudo_inverse(a, f, probs, rules, q_all, truth_v, rules_truth, logging_truth),
    }


def _half(e) -> float:
    return (e.high - e.low) / 2


def pseudo_inverse(a: dict[str, np.ndarray], f, probs: list[np.ndarray], rules: list[np.ndarray],
                   q_all: np.ndarray, truth_v: float, rules_truth: float, logging_truth: float) -> dict[str, float]:
    """DR with the slates' pseudo-inverse weight (`ope.DRPI`): its value and lifts against the truth, the
    half-widths of its paired 95% intervals of the lifts (points), and its weights' effective sample."""
    from insertrec.ope import DRPI, Bootstrap, effective_sample_size
    est, boot = DRPI(), Bootstrap(len(f.rewards))
    q_pi, q_rules = (joint(probs) * q_all).sum(1), (joint(rules) * q_all).sum(1)
    value = est.estimate(f, probs, a["q_logged"], q_pi, bootstrap=boot)
    rules_v = est.estimate(f, rules, a["q_logged"], q_rules, bootstrap=boot)
    diff = est.difference(f, probs, q_pi, rules, q_rules, a["q_logged"], bootstrap=boot)
    terms = est.terms(est.weigh(f, probs, None), f.rewards, a["q_logged"], q_pi)[:, 0] - f.rewards
    reps = boot.sums(terms[:, None])[:, 0] / boot.totals
    mean_r = float(f.rewards.mean())
    return {
        "drpi": value.value, "drpi_pct": 100.0 * (value.value - truth_v) / abs(truth_v),
        "drpi_rules_pct": 100.0 * (rules_v.value - rules_truth) / abs(rules_truth),
        "drpi_lift_rules_err": 100.0 * (value.value / rules_v.value - truth_v / rules_truth),
        "drpi_lift_logging_err": 100.0 * (value.value / mean_r - truth_v / logging_truth),
        "drpi_lift_rules_hw": 100.0 * _half(diff) / abs(rules_v.value),
        "drpi_lift_logging_hw": 100.0 * float(np.diff(np.quantile(reps, [0.025, 0.975]))[0]) / 2 / abs(mean_r),
        "drpi_ess": effective_sample_size(est.weigh(f, probs, None)),
        "drpi_negative_share": 100.0 * float((est.weigh(f, probs, None) < 0).mean()),
    }


COLUMNS = [("truth", "{:8.3f}"), ("ips_pct", "{:7.1f}"), ("snips_pct", "{:7.1f}"), ("dr_pct", "{:7.1f}"),
           ("rules_dr_pct", "{:7.1f}"), ("logging_pct", "{:7.1f}"), ("lift_rules_err", "{:7.1f}"),
           ("lift_logging_err", "{:7.1f}"), ("lift_rules_hw", "{:7.1f}"),
           ("ess", "{:7.0f}"), ("dm_pct", "{:7.1f}"), ("corr_pct", "{:7.1f}"), ("corr_expected_pct", "{:7.1f}"),
           ("corr_noise_pct", "{:7.1f}"), ("clip_bias_pct", "{:7.1f}"), ("clipped_mass_pct", "{:7.1f}"),
           ("drpi_pct", "{:7.1f}"), ("drpi_rules_pct", "{:7.1f}"), ("drpi_lift_rules_err", "{:7.1f}"),
           ("drpi_lift_logging_err", "{:7.1f}"), ("drpi_lift_rules_hw", "{:7.1f}"),
           ("drpi_lift_logging_hw", "{:7.1f}"), ("drpi_ess", "{:7.0f}")]


def table(rows: list[tuple[str, int, dict]]) -> str:
    head = f"{'world':10s} {'seed':>5s} " + " ".join(f"{c[:8]:>8s}" if i == 0 else f"{c.replace('_pct', '')[:7]:>7s}"
                                                    for i, (c, _) in enumerate(COLUMNS))
    lines = [head]
    for kind, seed, d in rows:
        lines.append(f"{kind:10s} {seed:5d} " + " ".join(fmt.format(d[c]) for c, fmt in COLUMNS))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[4242, 1, 2, 3])
    ap.add_argument("--worlds", nargs="+", default=["default", "perturbed"])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/dr_cache"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with threadpool_limits(1):
        for kind in args.worlds:
            for seed in args.seeds:
                rows.append((kind, seed, diagnose(build(kind, seed, args.cache))))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([{"world": k, "seed": s, **d} for k, s, d in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
