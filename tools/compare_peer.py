#!/usr/bin/env python3
"""Starling beside llama.cpp on the same files, the two engines' runs interleaved.

This machine's speed drifts by up to a third within minutes, so two benchmarks run one
after the other (each the median of its own reps) can each land in a different phase. Here
every file gets --pairs pairs of runs, back to back, the engine going first
alternating from pair to pair; each figure's ratio is taken within a pair and the table
gives the median of those ratios beside the range, and each engine's median tok/s. Each
run is the documented command itself (--reps 3 by default: a run's first rep is cold, so
its median leaves that out).

  PEER=/root/.cache/starling-peer/venv/bin/python   # ../shared/peer/setup.sh prints it
  python3 tools/compare_peer.py --pairs 3 \\
      --peer "$PEER ../shared/peer/llamacpp_bench.py" \\
      models/SmolLM2-135M-Instruct.Q4_1.gguf models/requant/*.gguf

Starling runs `target/release/starling bench --model M --threads T --reps R --concurrency ""
--json`; the peer command gets `--model M --threads T --reps R` and must print one JSON
object as its last line with the same keys (llamacpp_bench.py does). Prints a Markdown
table; --raw FILE also writes every run's JSON, one line each.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

# Figure, its label, and the bar of issue 21 (Starling / llama.cpp).
FIGURES = [
    ("prefill_tok_s", "prefill 512", 1.3),
    ("decode_tok_s_ctx8", "decode @8", 1.2),
    ("decode_tok_s_ctx512", "decode @512", 1.2),
    ("batched_decode_tok_s", "16 sequences", 1.5),
]


def run(cmd):
    """One benchmark run's JSON (its last line of output)."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines:
        sys.exit(f"no output from {shlex.join(cmd)}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--peer", required=True, help="the peer's benchmark command, e.g. \"$PEER llamacpp_bench.py\"")
    ap.add_argument("--starling", default="target/release/starling")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="reps of each run (its figures are their medians)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--raw", help="append every run's JSON to this file")
    a = ap.parse_args()
    if a.pairs < 1 or a.reps < 1:
        sys.exit("--pairs and --reps must be at least 1")
    for m in a.models:
        if not os.path.isfile(m):
            sys.exit(f"no such model file: {m}")
    common = ["--threads", str(a.threads), "--reps", str(a.reps)]
    raw = open(a.raw, "a") if a.raw else None
    rows = []
    for model in a.models:
        ours = [a.starling, "bench", "--model", model, *common, "--concurrency", "", "--json"]
        peer = [*shlex.split(a.peer), "--model", model, *common]
        pairs = []
        for p in range(a.pairs):
            first, second = (ours, peer) if p % 2 == 0 else (peer, ours)
            x, y = run(first), run(second)
            s, l = (x, y) if p % 2 == 0 else (y, x)
            pairs.append((s, l))
            if raw:
                print(json.dumps({"model": model, "pair": p, "starling": s, "peer": l}), file=raw, flush=True)
            print(f"{model}: pair {p + 1} of {a.pairs} done", file=sys.stderr)
        rows.append((model, pairs))
    print("| file | " + " | ".join(label for _, label, _ in FIGURES) + " | peak RSS MiB |")
    print("| --- " * (len(FIGURES) + 2) + "|")
    for model, pairs in rows:
        cells = []
        for key, _, bar in FIGURES:
            s = statistics.median(p[0][key] for p in pairs)
            l = statistics.median(p[1][key] for p in pairs)
            ratios = sorted(p[0][key] / p[1][key] for p in pairs)
            mid = statistics.median(ratios)
            mark = "" if mid >= bar else " ✗"
            cells.append(f"{s:.0f} / {l:.0f}, {mid:.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f}){mark}")
        rss = max(p[0]["peak_rss_bytes"] for p in pairs) / 2**20
        print(f"| {os.path.basename(model)} | " + " | ".join(cells) + f" | {rss:.0f} |")


if __name__ == "__main__":
    main()
