"""The MoE block as separate pure functions: router, one expert's FFN, and the expert accumulation.

Expert weights are always arguments, never module parameters, so a runtime can hand the
expert computation whichever experts it has on the device. One expert's weights are a dict
of arrays whose names give its kind (see `expert_ffn`): gated {'gate': [D, F], 'up': [D, F],
'down': [F, D]} (decoder families) or plain {'up': [D, F], 'down': [F, D]}, optionally with
'up_bias' [F] and 'down_bias' [D] (Switch Transformers, NLLB-MoE) and, when gated, 'gate_bias' [F]
(gpt-oss); a layer's stacked experts have a leading [E] axis on each. The activation `act` is a name
of `layers.ACTIVATIONS` or a `ClampedSwiGLU` (gpt-oss), which combines gate and up itself.

Determinism across execution strategies: every expert processes all N tokens of the call
(rows it was not chosen for get weight 0), and contributions are added into a float32
accumulator in increasing expert-id order. Splitting a layer's experts into waves, choosing
them on the host or gathering them on the device therefore yields the same sums.

A step's expert compute (`routed_experts`): 'union' (`experts_from_slab`: every row through every
expert the step uses), 'grouped' (`grouped_experts`: dropless dynamic gating, each expert on exactly
its rows, in fixed-size blocks) or 'capacity' (`capacity_experts`: every expert padded to a static
capacity, the pairs past it dropped; approximate) or 'inplace' (`kernels.slab_experts.inplace_experts`:
union's products from Pallas kernels that read the chosen experts in the slab, no gathered copy; float
slabs only). Grouped, capacity and inplace add each row's experts in the same order as union.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from moejax.models.capacity import queue_positions
from moejax.models.layers import ACTIVATIONS
from moejax.models.quantized import dequantized

# How a step computes its routed experts (see `routed_experts`); 'auto' picks by the call's rows.
EXPERT_COMPUTES = ("auto", "union", "grouped", "ragged", "capacity", "inplace", "grouped-inplace")
INPLACE_COMPUTES = ("inplace", "grouped-inplace")  # the computes of `kernels.slab_experts` (float slabs)
# Provisional, chosen on the CPU for logic only (not speed): 'auto' computes 'grouped' from this many token
# rows up, in blocks of GROUPED_BLOCK_ROWS rows. To be set from scripts/bench_gating.py on the GPU.
GROUPED_FROM_ROWS = 64
GROUPED_BLOCK_ROWS = 64
# Where the in-place kernels run (one GPU, float experts of fitting shapes), 'auto' computes calls of up to this
# many rows (a decode step's) 'inplace': one row block of the kernels (BENCHMARKS.md, "The in-place expert kernels").
INPLACE_MAX_ROWS = 16
# Static capacity gating's default capacity factor (C = ceil(factor x N x k / E) token slots per expert).
CAPACITY_FACTOR = 2.0


def router_scores(router_logits, scoring_func: str = "softmax"):
    """Each expert's score: router_logits [N, E] -> float32 [N, E], softmax over experts or a sigmoid each."""
    logits = router_logits.astype(jnp.float32)
    if scoring_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    raise ValueError(f"scoring_func {scoring_func!r} is not one of softmax, sigmoid")


def route(router_logits, top_k: int, normalize: bool, *, scoring_func: str = "softmax", topk_method: str = "greedy",
          n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0, softmax_after_topk: bool = False,
          correction_bias=None):
    """The router: router_logits [N, E] -> (weights [N, k] f32, ids [N, k] int32).

    Scores are `router_scores`; the experts are chosen on the scores plus `correction_bias` [E] (when given:
    DeepSeek-V3's e_score_correction_bias, for selection only). 'greedy' takes the k best of all experts; the
    group methods split the E experts into n_group groups of consecutive ids, keep the topk_group best groups
    (scored by their best expert, 'group_limited_greedy' (DeepSeek-V2), or by the sum of their best two,
    'noaux_tc' (DeepSeek-V3, GLM-4.5)) and take the k best experts inside them. The weights are the chosen
    experts' scores without the bias, divided by their sum when `normalize`, times routed_scaling_factor.

    softmax_after_topk (gpt-oss): the k best logits, then a softmax over those k only (in exact arithmetic the
    renormalised softmax over all experts; rounded as gpt-oss rounds it).
    """
    if softmax_after_topk:
        top, ids = jax.lax.top_k(router_logits.astype(jnp.float32), top_k)
        return jax.nn.softmax(top, axis=-1), ids.astype(jnp.int32)
    scores = router_scores(router_logits, scoring_func)
    choice = scores if correction_bias is None else scores + correction_bias.astype(jnp.float32)
    if topk_method != "greedy" and n_group > 1:
        choice = _keep_best_groups(choice, topk_method, n_group, topk_group)
    elif topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ValueError(f"topk_method {topk_method!r} is not one of greedy, group_limited_greedy, noaux_tc")
    if correction_bias is None:
        weights, ids = jax.lax.top_k(choice, top_k)
    else:
        _, ids = jax.lax.top_k(choice, top_k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    if routed_scaling_factor != 1.0:
        weights = weights * jnp.float32(routed_scaling_factor)
    return weights, ids.astype(jnp.int32)


def _keep_best_groups(choice, topk_method: str, n_group: int, topk_group: int):
    """choice [N, E] with every expert outside the topk_group best of n_group groups set to -inf."""
    N, E = choice.shape
    grouped = choice.reshape(N, n_group, E // n_group)
    if topk_method == "group_limited_greedy":
        group_scores = jnp.max(grouped, axis=-1)
    elif topk_method == "noaux_tc":
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    else:
        raise ValueError(f"topk_method {topk_method!r} is not one of greedy, group_limited_greedy, noaux_tc")
    _, best = jax.lax.top_k(group_scores, topk_group)
    kept = jnp.any(best[:, :, None] == jnp.arange(n_group)[None, None, :], axis=1)  # [N, n_group]
    return jnp.where(kept[:, :, None], grouped, -jnp.inf).reshape(N, E)


def forced_weights(router_logits, ids, scoring_func: str = "softmax", routed_scaling_factor: float = 1.0):
    """The weights [N, k] f32 of experts chosen elsewhere (ids [N, k]): their router scores, renormalised, times
    routed_scaling_factor (replayed routing, see `engine.decoder_programs.forward`)."""
    weights = jnp.take_along_axis(router_scores(router_logits, scoring_func), ids, axis=-1)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * jnp.float32(routed_scaling_factor) if routed_scaling_factor != 1.0 else weights


@dataclasses.dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation of the gate and up projections: the gate clamped above at `limit`, up
    clamped to [-limit, limit], then (up + 1) * gate * sigmoid(alpha * gate). Hashable, so it can stand
    where an activation name does in a static argument."""

    alpha: float
    limit: float

    def __call__(self, gate, up):
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))


def gated_activation(gate, up, act):
    """The hidden units of a gated FFN from its gate and up projections: act(gate) * up, or a ClampedSwiGLU's."""
    if isinstance(act, ClampedSwiGLU):
        return act(gate, up)
    return ACTIVATIONS[act](gate) * up


def _biased(h, bias):
    """h [..., n] plus bias [n] (one expert) or [U, n] (U experts, h [U, rows, n]); h itself when bias is None."""
    if bias is None:
        return h
    return h + (bias[:, None, :] if h.ndim == 3 else bias)


def expert_ffn(x, expert: dict, act="silu"):
    """One expert on all rows: x [N, D] -> [N, D] in x's dtype.

    Gated (has 'gate'): gated_activation(x @ gate + gate_bias, x @ up + up_bias) @ down + down_bias.
    Plain: act(x @ up + up_bias) @ down + down_bias. Each bias only where the expert has it.
    """
    up = _biased(x @ expert["up"], expert.get("up_bias"))
    if "gate" in expert:
        hidden = gated_activation(_biased(x @ expert["gate"], expert.get("gate_bias")), up, act)
    else:
        hidden = ACTIVATIONS[act](up)
    return _biased(hidden @ expert["down"], expert.get("down_bias"))


def accumulate_experts(x, topk_ids, topk_weights, expert_ids, experts: Sequence[dict], acc, act="silu"):
    """Adds the weighted outputs of the given experts into `acc`.

    x [N, D]; topk_ids [N, k] int32; topk_weights [N, k] f32; expert_ids [n] int32, the global id
    of each entry of `experts` (dicts) in increasing order (ids that no token chose, such as a padding
    id -1, contribute zeros); acc [N, D] f32. Returns the new acc.
    """
    for i, expert in enumerate(experts):
        chosen = topk_ids == expert_ids[i]
        weight = jnp.sum(jnp.where(chosen, topk_weights, 0.0), axis=-1)
        acc = acc + weight[:, None] * expert_ffn(x, expert, act).astype(jnp.float32)
    return acc


def stacked_expert(stacked: dict, index):
    """Expert `index` (static int or traced scalar) of a layer's stacked weights."""
    return {name: weights[index] for name, weights in stacked.items()}


def expert_list(experts) -> list[dict]:
    """A layer's experts as per-expert dicts, from a stacked dict ([E, ...] per weight) or a sequence."""
    if isinstance(experts, dict):
        return [stacked_expert(experts, e) for e in range(experts["down"].shape[0])]
    return list(experts)


def device_routed_experts(x, topk_ids, topk_weights, experts, act="silu"):
    """The routed-expert output [N, D] f32 with routing resolved on the device (no host round trip).

    `experts`: the layer's experts, a sequence of per-expert dicts (separate buffers: each is read in
    place) or a stacked dict. When fewer (token, expert) pairs exist than experts (decode), a loop
    over the distinct chosen ids runs each through `lax.switch`, so only the chosen experts' weights
    are read and none is copied; otherwise every expert runs on every row. Both add in increasing
    expert order, like `accumulate_experts` over the chosen experts. Ids >= E (pairs the router
    dropped) carry weight 0 and contribute zeros.
    """
    experts = expert_list(experts)
    num_experts, n_pairs = len(experts), topk_ids.size
    acc = jnp.zeros(x.shape, jnp.float32)
    if n_pairs >= num_experts:
        return accumulate_experts(x, topk_ids, topk_weights, jnp.arange(num_experts), experts, acc, act)
    # Unused slots get id E, whose branch adds zeros without reading any weights.
    ids = jnp.unique(topk_ids, size=n_pairs, fill_value=num_experts)
    branches = [functools.partial(_expert_f32, expert=expert, act=act) for expert in experts]
    branches.append(lambda rows: jnp.zeros(rows.shape, jnp.float32))
    for slot in range(n_pairs):
        weight = jnp.sum(jnp.where(topk_ids == ids[slot], topk_weights, 0.0), axis=-1)
        acc = acc + weight[:, None] * jax.lax.switch(ids[slot], branches, x)
    return acc


def _expert_f32(x, expert: dict, act: str):
    return expert_ffn(x, expert, act).astype(jnp.float32)


def batched_expert_ffn(x, experts: dict, act="silu"):
    """U experts at once: x [N, D] (every expert on all rows) or [U, N, D] (each expert on its own rows),
    experts {name: [U, ...]} (the per-expert weights of `expert_ffn`, stacked) -> [U, N, D] in x's dtype.
    Each expert's product has the same shape whatever U is, so a row's result does not depend on how many
    experts ran beside it."""
    xs = x if x.ndim == 3 else jnp.broadcast_to(x, (experts["down"].shape[0],) + x.shape)
    up = _biased(jnp.einsum("und,udf->unf", xs, experts["up"]), experts.get("up_bias"))
    if "gate" in experts:
        gate = _biased(jnp.einsum("und,udf->unf", xs, experts["gate"]), experts.get("gate_bias"))
        hidden = gated_activation(gate, up, act)
    else:
        hidden = ACTIVATIONS[act](up)
    return _biased(jnp.einsum("unf,ufd->und", hidden, experts["down"]), experts.get("down_bias"))


def gathered(slab: dict, slots) -> dict:
    """The experts at `slots` int32 [U] of a slab {name: [S, ...]} as one copy {name: [U, ...]} (slot -1: slot 0's),
    compact experts (int8 / int4 codes with scales, `models.quantized`) dequantized to float weights."""
    return dequantized({name: jnp.take(weights, jnp.maximum(slots, 0), axis=0) for name, weights in slab.items()})


def experts_from_slab(x, topk_ids, topk_weights, distinct, slots, slab: dict, act="silu"):
    """The routed-expert output [N, D] f32, reading only the chosen experts' weights out of a slab.

    x [N, D]; topk_ids [N, k] int32; topk_weights [N, k] f32; distinct int32 [U]: the distinct chosen
    experts, increasing (entries not chosen by any row, such as padding, contribute zeros); slots
    int32 [U]: where each sits in `slab` ({name: [S, ...]}; -1: anywhere, its weight is 0).
    The chosen experts' weights are gathered (one copy, [U, ...]), run on all rows, and each row's
    contributions are added into a float32 accumulator in increasing expert order, one after another:
    a row's sum does not depend on the other rows' experts, on U or on the slots, so every offload mode,
    budget and policy gives the same bits.
    """
    return add_expert_outputs(batched_expert_ffn(x, gathered(slab, slots), act), topk_ids, topk_weights, distinct)


def add_expert_outputs(outputs, topk_ids, topk_weights, distinct):
    """Each row's weighted sum of its experts' outputs, in increasing expert order: outputs [U, N, D] (expert
    `distinct[u]` on every row), topk_ids [N, k], topk_weights [N, k], distinct int32 [U] -> [N, D] f32."""
    # Each row's weight for each expert [N, U], in one operation (a row chooses an expert at most once, so the sum
    # over its k choices has one term and is exact); then the adds, one expert after another.
    weights = jnp.sum(jnp.where(topk_ids[:, :, None] == distinct[None, None, :], topk_weights[:, :, None], 0.0), axis=1)
    acc = jnp.zeros(outputs.shape[1:], jnp.float32)
    for u in range(distinct.shape[0]):
        weight = weights[:, u, None]
        # where: a slot of padding may hold anything (never NaN into a row that did not choose it)
        acc = acc + jnp.where(weight != 0, weight * outputs[u].astype(jnp.float32), 0.0)
    return acc


def resolve_expert_compute(expert_compute: str, rows: int, inplace: bool = False) -> str:
    """The expert compute a call of `rows` token rows runs: 'auto' is 'grouped' from GROUPED_FROM_ROWS rows up
    (union would compute U x rows expert rows where the tokens need rows x k); below, a step is bound by reading
    the experts: 'inplace' (no gathered copy) for up to INPLACE_MAX_ROWS rows where the kernels run (`inplace`),
    else 'union' (each chosen expert gathered once)."""
    if expert_compute != "auto":
        return expert_compute
    if rows >= GROUPED_FROM_ROWS:
        return "grouped"
    return "inplace" if inplace and rows <= INPLACE_MAX_ROWS else "union"


def routed_experts(how: str, x, topk_ids, topk_weights, distinct, slots, slab: dict, act="silu", *,
                   valid_rows=None, capacity: int | None = None, block_rows: int = GROUPED_BLOCK_ROWS):
    """The routed-expert output [N, D] f32 of a call, computed `how` ('union', 'grouped', 'ragged', 'capacity',
    'inplace' or 'grouped-inplace'; see `experts_from_slab`, `grouped_experts`, `ragged_experts`, `capacity_experts`,
    `kernels.slab_experts.inplace_experts` and `grouped_inplace_experts` for the arguments). All but capacity are
    exact and add each row's experts alike; capacity computes
    `capacity` token slots per expert and leaves out the pairs past them (approximate)."""
    if how == "union":
        return experts_from_slab(x, topk_ids, topk_weights, distinct, slots, slab, act)
    if how == "grouped":
        return grouped_experts(x, topk_ids, topk_weights, distinct, slots, slab, act, valid_rows=valid_rows,
                               block_rows=block_rows)
    if how == "ragged":
        return ragged_experts(x, topk_ids, topk_weights, distinct, slots, slab, act, valid_rows=valid_rows)
    if how == "capacity":
        return capacity_experts(x, topk_ids, topk_weights, distinct, slots, slab, capacity, act, valid_rows=valid_rows)
    if how == "inplace":
        from moejax.kernels.slab_experts import inplace_experts  # that module imports this one

        return inplace_experts(x, topk_ids, topk_weights, distinct, slots, slab, act)
    if how == "grouped-inplace":
        from moejax.kernels.slab_experts import grouped_inplace_experts

        return grouped_inplace_experts(x, topk_ids, topk_weights, distinct, slots, slab, act, valid_rows=valid_rows,
                                       block_rows=block_rows)
    raise ValueError(f"expert compute {how!r} is not one of {', '.join(EXPERT_COMPUTES[1:])}")


def _union_queues(topk_ids, topk_weights, distinct, valid_rows):
    """Where each (row, choice) pair goes among the distinct experts: -> (member int32 [N, k]: the index in
    `distinct` of its expert, U for pairs not computed (weight 0, as dropped pairs have, or an invalid row),
    place int32 [N, k]: its 0-based place among its expert's pairs, first choices in row order, then second
    choices, ...)."""
    U = distinct.shape[0]
    index = jnp.clip(jnp.searchsorted(distinct, topk_ids), 0, U - 1)
    computed = (distinct[index] == topk_ids) & (topk_weights != 0)
    if valid_rows is not None:
        computed = computed & valid_rows[:, None]
    member = jnp.where(computed, index, U).astype(jnp.int32)
    everyone = jnp.ones((1, member.shape[0]), bool)
    places = queue_positions([member[None, :, j] for j in range(member.shape[1])], everyone, U)
    return member, jnp.stack([p[0] for p in places], axis=-1).astype(jnp.int32)


def _combine(topk_ids, topk_weights, pair_outputs, computed):
    """Each row's weighted expert outputs added into a float32 accumulator in increasing expert order, as
    `experts_from_slab` adds them: pair_outputs [N, k, D], computed bool [N, k] -> [N, D] f32."""
    order = jnp.argsort(jnp.where(computed, topk_ids, jnp.iinfo(jnp.int32).max), axis=-1, stable=True)
    take = lambda a: jnp.take_along_axis(a, order if a.ndim == 2 else order[..., None], axis=1)  # noqa: E731
    weights, outputs, computed = take(topk_weights), take(pair_outputs), take(computed)
    acc = jnp.zeros((pair_outputs.shape[0], pair_outputs.shape[2]), jnp.float32)
    for j in range(topk_ids.shape[1]):
        weight = jnp.where(computed[:, j], weights[:, j], 0.0)[:, None]
        acc = acc + jnp.where(weight != 0, weight * outputs[:, j].astype(jnp.float32), 0.0)
    return acc


def _pair_rows(x, dest, total: int):
    """x [N, D] laid out in `total` rows: pair (n, j) at row dest[n, j] (dest >= total: nowhere); rows no
    pair takes are zeros. -> [total, D]."""
    N, k = dest.shape
    pair_row = jnp.repeat(jnp.arange(N, dtype=jnp.int32), k)
    rows = jnp.full((total,), N, jnp.int32).at[dest.reshape(-1)].set(pair_row, mode="drop")
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[rows]


def _pair_outputs(rows_out, dest):
    """The output row of each pair: rows_out [total, D], dest int32 [N, k] (>= total: none, zeros) -> [N, k, D]."""
    padded = jnp.concatenate([rows_out, jnp.zeros((1, rows_out.shape[1]), rows_out.dtype)])
    return padded[jnp.minimum(dest, rows_out.shape[0])]


def grouped_blocks(rows: int, top_k: int, union: int, block_rows: int = GROUPED_BLOCK_ROWS) -> int:
    """Blocks of `block_rows` rows that `grouped_experts` lays out for `rows` token rows of top_k choices among
    `union` distinct experts: the most the pairs can fill when each expert's pairs are padded to whole blocks
    (every expert's last block cut short), and never more than every expert taking every row."""
    pairs = rows * top_k
    return min((pairs + min(union, pairs) * (block_rows - 1)) // block_rows, union * math.ceil(rows / block_rows))


def grouped_pairs(x, topk_ids, topk_weights, distinct, run_blocks, *, valid_rows=None,
                  block_rows: int = GROUPED_BLOCK_ROWS):
    """Dropless dynamic gating's layout around a block runner -> the routed-expert output [N, D] f32.

    Arguments as `experts_from_slab` (no slots: the runner reads the experts); valid_rows bool [N] or None: rows
    whose pairs are computed (the others get zeros). The (row, choice) pairs are sorted by expert into blocks of
    `block_rows` (static) rows, each expert's pairs padded to whole blocks (`grouped_blocks` of them in all);
    run_blocks(rows [B, block_rows, D], owner int32 [B], used int32 []) -> [B, block_rows, D] computes block b <
    used with expert owner[b] (an index into `distinct`); the blocks past `used` are padding. Each row then adds
    its experts' outputs in increasing expert order, as `experts_from_slab` does: about N x k + U x block_rows
    expert rows instead of union's U x N."""
    (N, k), U = topk_ids.shape, distinct.shape[0]
    num_blocks = grouped_blocks(N, k, U, block_rows)
    member, place = _union_queues(topk_ids, topk_weights, distinct, valid_rows)
    counts = jnp.zeros(U + 1, jnp.int32).at[member.reshape(-1)].add(1)[:U]
    blocks = (counts + block_rows - 1) // block_rows
    ends = jnp.cumsum(blocks)
    computed = member < U
    first = (ends - blocks)[jnp.minimum(member, U - 1)]
    dest = jnp.where(computed, first * block_rows + place, num_blocks * block_rows)
    owner = jnp.minimum(jnp.searchsorted(ends, jnp.arange(num_blocks), side="right"), U - 1).astype(jnp.int32)
    rows_in = _pair_rows(x, dest, num_blocks * block_rows).reshape(num_blocks, block_rows, x.shape[1])
    rows_out = run_blocks(rows_in, owner, ends[-1]).reshape(num_blocks * block_rows, x.shape[1])
    return _combine(topk_ids, topk_weights, _pair_outputs(rows_out, dest), computed)


def grouped_experts(x, topk_ids, topk_weights, distinct, slots, slab: dict, act="silu", *, valid_rows=None,
                    block_rows: int = GROUPED_BLOCK_ROWS):
    """Dropless dynamic gating (`grouped_pairs`) with XLA's matmuls: the chosen experts' weights gathered once
    ([U, ...], as union gathers them: a loop reading the slab itself would copy the whole slab into its state),
    and a loop over the blocks in use runs each block's expert on its rows. Arguments as `experts_from_slab`,
    valid_rows and block_rows as `grouped_pairs`'s. -> [N, D] f32.

    Every expert product has the one shape [block_rows, D] whatever the batch, so a row's result does not
    depend on the other rows or on N where the backend rounds a matmul's rows alike at one shape (XLA:CPU
    does, tests/test_gating.py); union's products have N rows, and XLA:CPU rounds them differently per N.
    """
    chosen = gathered(slab, slots)

    def run_blocks(rows_in, owner, used):
        def run_block(b, rows_out):
            expert = {name: lax.dynamic_index_in_dim(w, owner[b], keepdims=False) for name, w in chosen.items()}
            return lax.dynamic_update_index_in_dim(rows_out, expert_ffn(rows_in[b], expert, act), b, axis=0)

        return lax.fori_loop(0, used, run_block, jnp.zeros_like(rows_in))

    return grouped_pairs(x, topk_ids, topk_weights, distinct, run_blocks, valid_rows=valid_rows, block_rows=block_rows)


def ragged_experts(x, topk_ids, topk_weights, distinct, slots, slab: dict, act="silu", *, valid_rows=None):
    """Dropless dynamic gating through `jax.lax.ragged_dot`: the N x k pairs sorted by expert, no padding, each
    matmul of the FFN one grouped matmul over the gathered chosen experts ([U, ...]) with the experts' pair counts
    as group sizes; each row then adds its experts' outputs as `experts_from_slab` does. The same math as
    `grouped_experts` with XLA's grouped matmul instead of blocks (XLA:CPU lowers it to a masked dense matmul
    per expert, so it is for measuring on the GPU). Arguments as `grouped_experts`. -> [N, D] f32."""
    (N, k), U = topk_ids.shape, distinct.shape[0]
    member, place = _union_queues(topk_ids, topk_weights, distinct, valid_rows)
    counts = jnp.zeros(U + 1, jnp.int32).at[member.reshape(-1)].add(1)[:U]
    computed = member < U
    dest = jnp.where(computed, (jnp.cumsum(counts) - counts)[jnp.minimum(member, U - 1)] + place, N * k)
    rows = _pair_rows(x, dest, N * k)  # sorted by expert; the pairs not computed last, outside every group
    experts = gathered(slab, slots)
    grouped = lambda a, name: lax.ragged_dot(a, experts[name], counts)  # noqa: E731
    group = jnp.minimum(jnp.searchsorted(jnp.cumsum(counts), jnp.arange(N * k), side="right"), U - 1)
    bias = lambda name: experts[name][group] if name in experts else None  # noqa: E731
    up = _biased(grouped(rows, "up"), bias("up_bias"))
    if "gate" in experts:
        hidden = gated_activation(_biased(grouped(rows, "gate"), bias("gate_bias")), up, act)
    else:
        hidden = ACTIVATIONS[act](up)
    out = _biased(grouped(hidden, "down"), bias("down_bias"))
    return _combine(topk_ids, topk_weights, _pair_outputs(out, dest), computed)


def capacity_experts(x, topk_ids, topk_weights, distinct, slots, slab: dict, capacity: int, act="silu", *,
                     valid_rows=None):
    """Static capacity gating's expert compute: every distinct expert gets `capacity` (static) token slots,
    filled in queue order (`_union_queues`), the unfilled ones padding it computes all the same, and the pairs
    past them get nothing (approximate; `models.capacity.drop_over_capacity` drops them from the routing first,
    so the cache fetches no expert for them). The chosen experts' weights are gathered once ([U, ...]) and run
    as one batched matmul over [U, capacity] rows. Arguments as `grouped_experts`. -> [N, D] f32."""
    U = distinct.shape[0]
    member, place = _union_queues(topk_ids, topk_weights, distinct, valid_rows)
    computed = (member < U) & (place < capacity)
    dest = jnp.where(computed, member * capacity + place, U * capacity)
    rows_in = _pair_rows(x, dest, U * capacity).reshape(U, capacity, x.shape[1])
    rows_out = batched_expert_ffn(rows_in, gathered(slab, slots), act).reshape(U * capacity, x.shape[1])
    return _combine(topk_ids, topk_weights, _pair_outputs(rows_out, dest), computed)
