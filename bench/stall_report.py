"""What the servers were doing when the open-loop client saw a slow request (issue #12).

Lines up each slow request of a bench/load_api.py result (``open_loop.<arm>.slow``, or
``...windows[].slow``) with the events bench/stallprobe recorded in that arm's processes (see its
docstring) over the request's lifetime, from its scheduled send to its answer. Per arm it
prints, and with ``--out`` writes as JSON: how many slow requests each kind of event overlapped,
how many it was the largest overlap of (its "primary" cause), and the longest events of each
kind; a slow request that overlaps nothing the probe records is "unattributed" (the client, the
kernel, or uvicorn between its callbacks).

Usage: python bench/stall_report.py RESULT.json PROBE_DIR [--out attribution.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

# The kinds that can stall a request, in the order a tie is broken (the nested first: a
# collection or a writer's turn runs inside a blocked loop, a commit inside a turn's callback).
CAUSES = ("gc", "turn", "checkpoint_truncate", "checkpoint_restart", "commit", "tail", "read", "decide", "cpu_wait",
          "loop_lag", "checkpoint_passive")


def kind_of(event: dict[str, Any]) -> str:
    """An event's kind; a checkpoint's with its mode (``checkpoint_passive``, ``_restart``, ``_truncate``)."""
    if event["kind"] == "checkpoint":
        return "checkpoint_" + event["sql"].split("(")[1].rstrip(")").lower()
    return str(event["kind"])


def windows_of(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for arm, found in result["open_loop"].items():
        if isinstance(found, dict) and "p99_ms" in found:
            out[arm] = found.get("windows", [found])
    return out


def attribute(result: dict[str, Any], probe: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for arm, windows in windows_of(result).items():
        events = [json.loads(line) for path in probe.glob(f"{arm}.*.jsonl") for line in path.open()]
        events = [e for e in events if e["kind"] != "request"]
        overlapped: Counter = Counter()
        primary: Counter = Counter()
        overlap_ms: dict[str, list[float]] = defaultdict(list)
        slow = [request for window in windows for request in window.get("slow", [])]
        for request in slow:
            begin = request["scheduled_unix_s"]
            end = begin + request["ms"] / 1e3
            by_kind: dict[str, float] = {}
            for event in events:
                overlap = min(end, event["t"] + event["ms"] / 1e3) - max(begin, event["t"])
                if overlap > 0:
                    kind = kind_of(event)
                    by_kind[kind] = max(by_kind.get(kind, 0.0), overlap * 1e3)
            for kind, ms in by_kind.items():
                overlapped[kind] += 1
                overlap_ms[kind].append(ms)
            if by_kind:
                primary[max(by_kind, key=lambda k: (by_kind[k], -CAUSES.index(k)))] += 1
            else:
                primary["unattributed"] += 1
        in_windows = [e for e in events if any(w["window_unix_s"][0] <= e["t"] <= w["window_unix_s"][1]
                                              for w in windows)]
        longest = {kind: sorted((e for e in in_windows if kind_of(e) == kind), key=lambda e: -e["ms"])[:3]
                   for kind in sorted({kind_of(e) for e in in_windows})}
        report[arm] = {
            "windows": len(windows), "p99_ms": [w["p99_ms"] for w in windows], "max_ms": [w["max_ms"] for w in windows],
            "slow_requests": len(slow), "primary": dict(primary.most_common()),
            "overlapped": {k: {"requests": n, "median_overlap_ms": round(statistics.median(overlap_ms[k]), 1)}
                           for k, n in overlapped.most_common()},
            "events_in_windows": dict(Counter(kind_of(e) for e in in_windows).most_common()),
            "longest": {k: [{key: e[key] for key in ("t", "ms", "pid", "thread") if key in e}
                            | ({"stacks": e["stacks"][:2]} if e.get("stacks") else {})
                            | {key: e[key] for key in ("sql", "group", "size", "generation", "waited_ms") if key in e}
                            for e in es] for k, es in longest.items()}}
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result")
    ap.add_argument("probe")
    ap.add_argument("--out")
    args = ap.parse_args()
    report = attribute(json.loads(Path(args.result).read_text()), Path(args.probe))
    for arm, found in report.items():
        print(f"{arm}: p99 {found['p99_ms']} ms, max {found['max_ms']} ms, {found['slow_requests']} requests over "
              f"10 ms; primary cause {found['primary']}")
        print("    overlapped: " + ", ".join(f"{k} {v['requests']} (median {v['median_overlap_ms']} ms)"
                                             for k, v in found["overlapped"].items()))
        print("    events in the windows: " + ", ".join(f"{k} {n}" for k, n in found["events_in_windows"].items()))
        for kind, events in found["longest"].items():
            print(f"    longest {kind}: " + ", ".join(f"{e['ms']:.1f} ms" for e in events))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
