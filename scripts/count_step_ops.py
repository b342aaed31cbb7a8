"""How many operations a decode step program asks the device for: per layer body and per step, per card.

A batch-1 decode step on the GPU pays several microseconds per kernel (launch and tail) whatever it reads, so the
number of kernels in the step program's layer loop, times the layers, is a floor of its time next to the bytes it
reads. This script builds a random-weight engine of each card (tiny widths: the op structure does not depend on
them), runs one prefill and one decode step so that the engine compiles its decode program exactly as it runs it,
and counts, in that program:

  - the optimized HLO (`compiled.as_text()`, this machine's backend): the top-level instructions of each
    computation that become work on the device (fusions, custom calls, copies, dynamic-update-slices, sorts, ...;
    parameters, tuples, get-tuple-elements, constants and bitcasts are free), per while loop body (the layer scans
    and any loop inside them), and per step (each body times its known trip count);
  - the StableHLO lowered for `--platform` (default cuda; no GPU needed) before XLA's optimisation: ops in the whole
    module and inside each layer loop's body.

The CPU backend fuses differently from the GPU's, so the optimized counts are indicative, not the GPU's kernel count
(the lead's profile, scripts/probe_engine.py --profile, gives that); both show what the engine asks for.

  PYTHONPATH=. python scripts/count_step_ops.py                      # the four cards, resident and cached:0.25
  PYTHONPATH=. python scripts/count_step_ops.py --cards deepseek-v2-lite --configs resident --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time

CARDS = "deepseek-v2-lite,qwen3-30b-a3b,mixtral-8x7b,gpt-oss-20b"
# HLO opcodes that make no device work of their own.
FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id", "replica-id",
        "opt-barrier"}
CONTROL = {"while", "conditional", "call"}


def parse_hlo(text: str) -> dict[str, list[tuple[str, str]]]:
    """Optimized HLO text -> {computation name: [(opcode, the instruction's line)]} ('ENTRY' for the entry)."""
    computations: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = "ENTRY" if header.group(1) else header.group(2)
            computations[current] = []
            continue
        if current is None or line.strip() == "}":
            continue
        instruction = re.match(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$", line)
        if instruction:
            computations[current].append((_opcode(instruction.group(1)), line))
    return computations


def _opcode(rest: str) -> str:
    """The opcode of an instruction's right-hand side 'TYPE opcode(operands), attributes' (TYPE may be a tuple)."""
    depth, i = 0, 0
    while i < len(rest):
        c = rest[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == " " and depth == 0:
            break
        i += 1
    return re.match(r"\s*([\w\-]+)", rest[i:]).group(1)


def _copies(instructions: list[tuple[str, str]]) -> list[str]:
    """The shapes the copies among a computation's instructions make (a copy of a whole KV cache or slab in a layer
    loop costs its bytes at every layer)."""
    return [re.match(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\S+)", line).group(1) for op, line in instructions
            if op == "copy"]


def _trip_count(line: str):
    found = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    return int(found.group(1)) if found else None


def count_hlo(text: str) -> dict:
    """Device ops of a compiled program: {'entry': ops outside loops, 'loops': [{'depth', 'trip_count', 'ops',
    'by_opcode'}], 'per_step': entry + each loop's ops times its trip count (a loop of unknown trip count once)}."""
    computations = parse_hlo(text)
    loops = []

    def walk(name: str, depth: int, repeats: int) -> int:
        """The device ops of computation `name` run once, its loops' bodies included (times their trip counts)."""
        ops = [(op, line) for op, line in computations.get(name, []) if op not in FREE]
        own = collections.Counter(op for op, _ in ops if op not in CONTROL)
        total = sum(own.values())
        for op, line in ops:
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                trips = _trip_count(line)
                index = len(loops)
                loops.append(None)
                body_ops = walk(body, depth + 1, repeats * (trips or 1))
                loops[index] = {"depth": depth + 1, "trip_count": trips, "ops": loop_own[body],
                                "ops_with_inner_loops": body_ops, "by_opcode": dict(loop_opcodes[body].most_common()),
                                "copies": _copies(computations[body])}
                total += body_ops * (trips or 1)
            elif op in ("conditional", "call"):
                branches = re.findall(r"(?:branch_computations=\{|true_computation=|false_computation=|to_apply=)"
                                      r"%?([\w.\-]+)", line)
                branches += re.findall(r",\s*%([\w.\-]+)", line.split("branch_computations={", 1)[-1].split("}")[0]) \
                    if "branch_computations" in line else []
                total += max((walk(b, depth, repeats) for b in set(branches)), default=0)
        loop_own[name] = sum(own.values())
        loop_opcodes[name] = own
        return total

    loop_own: dict[str, int] = {}
    loop_opcodes: dict[str, collections.Counter] = {}
    per_step = walk("ENTRY", 0, 1)
    return {"entry": loop_own["ENTRY"], "entry_by_opcode": dict(loop_opcodes["ENTRY"].most_common()), "loops": loops,
            "per_step": per_step}


def count_stablehlo(text: str) -> dict:
    """Ops of a lowered StableHLO module, each `func.call` counted as the ops of its callee (inlined): {'module':
    the whole step, 'loop_bodies': each `stablehlo.while` of the entry function (the layer scans), by total}.
    Constants and returns are not counted."""
    funcs: dict[str, list[str]] = {}
    name, depth = None, 0
    for line in text.splitlines():
        header = re.search(r"func\.func\s+(?:public\s+|private\s+)?@([\w.\-]+)\(", line)
        if header and name is None:
            name, depth = header.group(1), 0
            funcs[name] = []
        if name is not None:
            funcs[name].append(line)
            depth += line.count("{") - line.count("}")
            if depth <= 0 and "}" in line:
                name = None
    skip = {"stablehlo.constant", "stablehlo.return", "func.return", "func.func"}
    memo: dict[str, int] = {}

    def ops(lines: list[str]) -> int:
        total = 0
        for line in lines:
            call = re.search(r"\bcall @([\w.\-]+)", line)
            if call:
                total += inlined(call.group(1))
                continue
            op = re.search(r"\b((?:stablehlo|chlo|mhlo)\.[\w.]+)", line)
            total += bool(op) and op.group(1) not in skip
        return total

    def inlined(func: str) -> int:
        if func not in memo:
            memo[func] = ops(funcs.get(func, [])[1:])
        return memo[func]

    entry = "main" if "main" in funcs else next(iter(funcs))
    bodies, loop, depth = [], None, 0
    for line in funcs[entry][1:]:
        if loop is None and "stablehlo.while" in line:
            loop, depth = [], 0
        if loop is not None:
            loop.append(line)
            depth += line.count("{") - line.count("}")
            if depth <= 0 and "}" in line and len(loop) > 1:
                bodies.append(ops(loop[1:]))
                loop = None
    return {"module": inlined(entry), "loop_bodies": bodies}


def build(card: str, layers: int | None, config: str):
    """A random-weight engine of the card at tiny widths, for `config` 'mode[:budget[:policy]]'."""
    import jax

    from moejax.cards import load_card
    from scripts.benchlib import build_random_engine, random_dense_params, random_expert_stacks, tiny_widths

    cfg = tiny_widths(load_card(card, num_layers=layers))
    mode, *rest = config.split(":")
    options = {"expert_budget": rest[0]} if rest else {}
    if len(rest) > 1:
        options["cache_policy"] = rest[1]
    stacks = random_expert_stacks(cfg)
    if mode != "resident":
        from moejax.offload.expert_stacks import host_sharding

        stacks = list(random_expert_stacks(cfg, sharding=host_sharding(jax.devices()[0])))
    return cfg, build_random_engine(cfg, mode, random_dense_params(cfg), stacks, max_seq_len=64)


def count(card: str, layers: int | None, config: str, platform: str) -> dict:
    """One row: the decode program's op counts for a card and configuration."""
    import jax

    start = time.perf_counter()
    cfg, engine = build(card, layers, config)
    recorded = {}
    decode = engine.step_programs["decode"]

    class Recorder:
        def lower(self, *args, **static):
            recorded.update(args=args, static=static)
            return decode.lower(*args, **static)

    engine.step_programs = {**engine.step_programs, "decode": Recorder()}
    engine.prefill(0, [1, 2, 3])
    jax.block_until_ready(engine.decode())
    (compiled,) = [c for key, c in engine._compiled.items() if key[0] == "decode"]
    hlo = count_hlo(compiled.as_text())
    row = {"card": card, "layers": cfg.num_layers, "moe_layers": len(cfg.moe_layer_ids), "config": config,
           "hlo_backend": jax.default_backend(), **{f"hlo_{k}": v for k, v in hlo.items()}}
    main_loops = [loop for loop in hlo["loops"] if loop["depth"] == 1 and (loop["trip_count"] or 0) > 1]
    # the body of the longest layer scan (none when every scan has one layer: XLA inlines those, e.g. `--layers 1`)
    row["hlo_ops_per_layer"] = max((loop["ops"] for loop in main_loops), default=None)
    row["hlo_per_step_per_layer"] = round(hlo["per_step"] / cfg.num_layers, 1)
    try:
        traced = decode.trace(*recorded["args"], **recorded["static"])
        lowered = traced.lower(lowering_platforms=(platform,))
        stable = count_stablehlo(lowered.as_text())
        row.update({f"stablehlo_{platform}_{k}": v for k, v in stable.items()})
    except Exception as err:  # a platform this jax cannot lower for: report it, keep the HLO counts
        row[f"stablehlo_{platform}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", default=CARDS)
    parser.add_argument("--layers", type=int, help="the first N layers of each card (default: all)")
    parser.add_argument("--configs", default="resident,cached:0.25", help="mode[:budget[:policy]],...")
    parser.add_argument("--platform", default="cuda", help="platform the StableHLO is lowered for")
    parser.add_argument("--json", help="write the rows here (JSON)")
    args = parser.parse_args(argv)
    from scripts.benchlib import start_backend, write_json

    start_backend()
    rows = []
    for card in args.cards.split(","):
        for config in args.configs.split(","):
            row = count(card, args.layers, config, args.platform)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("hlo_loops")
                              and not k.endswith("by_opcode")}), flush=True)
            if args.json:
                write_json(args.json, {"argv": sys.argv, "rows": rows})
    print()
    header = f"{'card':<18} {'config':<14} {'layers':>6} {'ops/layer':>9} {'entry':>6} {'ops/step':>8} {'/layers':>7} " \
             f"{'shlo/loop':>10} {'shlo total':>10}"
    print(header)
    for row in rows:
        stable = row.get(f"stablehlo_{args.platform}_loop_bodies") or []
        print(f"{row['card']:<18} {row['config']:<14} {row['layers']:>6} {row['hlo_ops_per_layer'] or '-':>9} "
              f"{row['hlo_entry']:>6} {row['hlo_per_step']:>8} {row['hlo_per_step_per_layer']:>7} {max(stable, default='-'):>10} "
              f"{row.get(f'stablehlo_{args.platform}_module', '-'):>10}")


if __name__ == "__main__":
    main()
