"""SiDA's approximate mode on a real model: perplexity with the predictor's experts in place of the routers'
(`moejax.predictors.approximate`), at several expert budgets, against exact routing; and the share of the
expert memory each prompt never needs. Per task (the prompts' `task` labels), eMoE's sensitivity: the
perplexity change when that task's routing is replaced by the prediction; the tasks within --tolerance may
skip exact routing. CPU is fine: the figures do not depend on the machine.

    PYTHONPATH=. python scripts/eval_predicted_routing.py --predictor DIR --prompts tasks.jsonl \
        --sequences 160:200,360:400 --budgets 1,0.5,0.25,0.2 [--checkpoint moejax/assets/tiny-moe] --out out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import moejax
from moejax.outputs import atomic_file
from moejax.predictors import store
from moejax.predictors.approximate import PredictedRouting, perplexity
from moejax.tools.lab import parse_range
from moejax.tools.tracing import prepare_prompts, read_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictor", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="JSONL prompts, as `moejax trace` reads")
    parser.add_argument("--sequences", help="prompts A:B only (several ranges: A:B,C:D)")
    parser.add_argument("--checkpoint", type=Path, default=moejax.SHIPPED_CHECKPOINT)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--budgets", default="1,0.5,0.25,0.2")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest relative perplexity change of a task that may skip exact routing")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    predictor = store.load(args.predictor)
    engine = moejax.load(args.checkpoint, slots=1, max_seq_len=args.max_prompt_tokens + 1)
    prompts = read_prompts(args.prompts)
    if args.sequences is not None:
        prompts = [prompts[i] for part in args.sequences.split(",")
                   for i in range(*parse_range(part, len(prompts), "--sequences"))]
    prepared = [(ids, task) for ids, task in prepare_prompts(engine, prompts, args.prompts, 1, args.max_prompt_tokens)
                if len(ids) > 1]
    texts = [ids for ids, _ in prepared]
    exact = perplexity(engine, texts)
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        routing = PredictedRouting(predictor, engine.cfg.top_k, budget)
        value = perplexity(engine, texts, routing)
        rows.append({"budget": budget, "perplexity": value, "change": value / exact - 1,
                     "memory_saved": sum(routing.saved) / len(routing.saved)})
        print(json.dumps(rows[-1]), flush=True)
    tasks = {}
    for task in sorted({t for _, t in prepared if t is not None}):
        mine = [ids for ids, t in prepared if t == task]
        exact_task = perplexity(engine, mine)
        change = perplexity(engine, mine, PredictedRouting(predictor, engine.cfg.top_k)) / exact_task - 1
        tasks[task] = {"exact_perplexity": exact_task, "change": change, "skips_exact": change <= args.tolerance}
        print(json.dumps({task: tasks[task]}), flush=True)
    result = {"checkpoint": str(args.checkpoint), "predictor": str(args.predictor), "prompts": len(texts),
              "tokens": sum(len(t) for t in texts), "exact_perplexity": exact, "predicted": rows,
              "tasks": tasks, "tolerance": args.tolerance}
    with atomic_file(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(f"exact perplexity {exact:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
