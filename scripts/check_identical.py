"""Offloading never changes results, checked on the machine it runs on (the GPU's kernels are not the CPU's).

Loads a checkpoint (default: the shipped one) in every offloading mode, and in cached mode at the smallest
budget (the experts one step can need: one layer's, with the default prompt chunk) and at 25%, with every cache
policy and every prefetcher, and compares prompt logits and greedy tokens bit for bit against the resident
engine (all computing their experts as --expert-compute says). Prints one line per configuration (the largest
logit difference, whether the tokens match); exits 1 if any differs or fails. --time-budget skips the configurations that would not fit (listed as skipped).

  PYTHONPATH=. python scripts/check_identical.py --out $OUT/check_identical.json
  PYTHONPATH=. python scripts/check_identical.py --quick --out /tmp/check.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import numpy as np

import moejax
from moejax.checkpoint import load_config
from scripts.benchlib import Budget, environment, print_table, start_backend, write_json

PROMPTS = ["Once upon a time there was a little", "The cat sat on the mat and looked at the"]
# Every policy and every prefetcher at each budget (not every pair: each configuration compiles its own programs).
CACHED = (("lru", "none"), ("lfu", "none"), ("fifo", "none"), ("lifo", "none"), ("activation", "none"),
          ("lru", "lookahead"), ("lru", "trace"), ("activation", "trace+lookahead"))


def configurations(smallest: str, quick: bool) -> list[dict]:
    """Resident first (the reference), then the most telling (a time budget skips the last): LRU at the smallest
    budget, activation + trace+lookahead at 25%, on-demand, dense-offload, then the other cached ones. quick:
    the first three."""
    cached = lambda budget, policy, prefetch: dict(offload="cached", expert_budget=budget, cache_policy=policy,  # noqa: E731
                                                   prefetch=prefetch)
    first = [dict(offload="resident"), cached(smallest, "lru", "none"), cached("0.25", "activation", "trace+lookahead")]
    if quick:
        return first
    rest = [cached(budget, policy, prefetch) for budget in (smallest, "0.25") for policy, prefetch in CACHED]
    return first + [dict(offload="on-demand"), dict(offload="dense-offload")] + [c for c in rest if c not in first]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=str(moejax.SHIPPED_CHECKPOINT))
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="three configurations (CPU smoke run)")
    parser.add_argument("--expert-compute", default="auto", help="every configuration's (union, grouped; default auto)")
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds: configurations that would not fit are skipped")
    parser.add_argument("--out", default="check_identical.json")
    args = parser.parse_args()
    budget = Budget(args.time_budget)
    start_backend(smoke=args.quick)

    cfg = load_config(args.checkpoint)
    smallest = f"{cfg.num_experts * cfg.expert_bytes}B"  # in bytes: a fraction could round below one layer's experts
    result = {"environment": None, "checkpoint": args.checkpoint, "new_tokens": args.new_tokens,
              "expert_compute": args.expert_compute, "configs": []}
    rows, reference, need = result["configs"], None, 0.0
    for options in configurations(smallest, args.quick):
        if reference is not None and not budget.allows(need, str(options)):
            result.setdefault("skipped", []).append(options)
            continue
        start = time.monotonic()
        try:
            engine = moejax.load(args.checkpoint, expert_compute=args.expert_compute, **options)
            logits = [np.asarray(x) for x in engine.logits(PROMPTS)]
            tokens = engine.generate(PROMPTS, max_new_tokens=args.new_tokens, ignore_eos=True).tokens
            del engine
        except Exception as err:  # a configuration that fails is a finding: record it, check the others
            traceback.print_exc()
            rows.append({**options, "identical": False, "error": f"{type(err).__name__}: {err}"})
            print(rows[-1], flush=True)
            if reference is None:
                break
            continue
        need = time.monotonic() - start
        if reference is None:
            reference = logits, tokens
            result["environment"] = environment()
        pairs = list(zip(logits, reference[0], strict=True))
        same_logits = all(np.array_equal(a, b) for a, b in pairs)
        logits_diff = max(float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32)))) for a, b in pairs)
        same_tokens = tokens == reference[1]
        rows.append({**options, "identical": same_logits and same_tokens, "logits_max_abs_diff": logits_diff,
                     "tokens_identical": same_tokens, "seconds": round(need, 1)})
        print(rows[-1], flush=True)
        write_json(args.out, result)
    result["all_identical"] = bool(rows) and all(row["identical"] for row in rows)
    write_json(args.out, result)
    skipped = len(result.get("skipped", []))
    print(f"\n{sum(row['identical'] for row in rows)} of {len(rows)} configurations bit-identical to resident; "
          f"{skipped} skipped (time budget)")
    print_table(rows, [("offload", "mode", "s"), ("expert_budget", "budget", "s"), ("cache_policy", "policy", "s"),
                       ("prefetch", "prefetch", "s"), ("identical", "identical", ""), ("tokens_identical", "tokens", ""),
                       ("logits_max_abs_diff", "max |logit diff|", ".3g"), ("error", "error", ".60s")])
    return 0 if result["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
