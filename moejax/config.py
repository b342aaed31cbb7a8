"""Frozen configuration dataclasses: hashable, so they can be static arguments of `jax.jit`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from moejax.errors import MoejaxError

DTYPES = ("bfloat16", "float16", "float32")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
# The ModelConfig fields that are keyword arguments of `models.moe.route`.
ROUTER_FIELDS = ("scoring_func", "topk_method", "n_group", "topk_group", "routed_scaling_factor", "softmax_after_topk")
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters.

    `scaling_type` is one of 'default', 'linear', 'llama3', 'yarn'; `scaling` holds that
    type's parameters as sorted (name, value) pairs so the config stays hashable.
    """

    theta: float = 10000.0
    scaling_type: str = "default"
    scaling: tuple[tuple[str, float], ...] = ()

    def param(self, name: str, default: float | None = None) -> float:
        for key, value in self.scaling:
            if key == name:
                return value
        if default is None:
            raise MoejaxError(f"rope scaling '{self.scaling_type}' needs parameter '{name}'")
        return default


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only MoE model (all supported families).

    Per-layer tuples have `num_layers` entries. Sizes are in elements, not bytes.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    moe_layers: tuple[bool, ...]
    sliding_windows: tuple[int | None, ...]
    dense_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # 'none' | 'head' (per head, Qwen3) | 'full' (whole projection, OLMoE)
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_sinks: bool = False  # a learned logit per head that joins each softmax's denominator (gpt-oss)
    router_bias: bool = False
    softmax_after_topk: bool = False  # routing weights: softmax over the top-k logits only (gpt-oss)
    expert_bias: bool = False  # routed experts carry 'gate_bias' [F], 'up_bias' [F] and 'down_bias' [D]
    swiglu_limit: float | None = None  # set: experts use gpt-oss's clamped SwiGLU (see models.moe.ClampedSwiGLU)
    swiglu_alpha: float = 1.702
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
    # The router (see `models.moe.route`): expert scores, how the top-k are chosen, and the weights' scale.
    scoring_func: str = "softmax"  # 'softmax' | 'sigmoid'
    topk_method: str = "greedy"  # 'greedy' | 'group_limited_greedy' (groups by max score) | 'noaux_tc' (by top-2 sum)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_correction_bias: bool = False  # each MoE router has e_score_correction_bias [E] (selection only)
    shared_expert_gate: bool = True  # the shared expert's output goes through a sigmoid gate (Qwen2-MoE)
    partial_rotary_factor: float = 1.0  # rope rotates the first head_dim x factor dims of each head
    # Multi-head latent attention (DeepSeek-V2/V3) when kv_lora_rank > 0: see models/mla.py. head_dim is then
    # qk_nope_head_dim + qk_rope_head_dim (the query/key head) and num_kv_heads equals num_heads.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # 0: a plain query projection
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self):
        if len(self.moe_layers) != self.num_layers or len(self.sliding_windows) != self.num_layers:
            raise MoejaxError(
                f"config: moe_layers and sliding_windows need {self.num_layers} entries, "
                f"got {len(self.moe_layers)} and {len(self.sliding_windows)}"
            )
        if self.dtype not in DTYPES:
            raise MoejaxError(f"config: dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise MoejaxError(
                f"config: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise MoejaxError(f"config: top_k {self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.qk_norm not in ("none", "head", "full"):
            raise MoejaxError(f"config: qk_norm '{self.qk_norm}' is not one of none, head, full")
        self._check_router()
        if not (0 < self.partial_rotary_factor <= 1 and self.rotary_dim % 2 == 0 and self.rotary_dim > 0):
            raise MoejaxError(f"config: partial_rotary_factor {self.partial_rotary_factor} must be in (0, 1] and leave "
                              f"an even number of rotated dims of head_dim {self.head_dim}")
        if self.is_mla and (self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim or self.qk_rope_head_dim % 2
                            or self.v_head_dim < 1):
            raise MoejaxError(
                f"config: latent attention needs head_dim == qk_nope_head_dim + qk_rope_head_dim, an even "
                f"qk_rope_head_dim and v_head_dim >= 1 (got {self.head_dim}, {self.qk_nope_head_dim}, "
                f"{self.qk_rope_head_dim}, {self.v_head_dim})"
            )

    def _check_router(self):
        if self.scoring_func not in SCORING_FUNCS:
            raise MoejaxError(f"config: scoring_func '{self.scoring_func}' is not one of {', '.join(SCORING_FUNCS)}")
        if self.topk_method not in TOPK_METHODS:
            raise MoejaxError(f"config: topk_method '{self.topk_method}' is not one of {', '.join(TOPK_METHODS)}")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and 0 < self.routed_scaling_factor < float("inf")):
            raise MoejaxError(f"config: routed_scaling_factor {self.routed_scaling_factor!r} must be a positive number")
        if self.softmax_after_topk and (self.scoring_func, self.topk_method, self.router_correction_bias,
                                        self.routed_scaling_factor) != ("softmax", "greedy", False, 1.0):
            raise MoejaxError("config: softmax_after_topk (gpt-oss) takes the plain greedy softmax router: no scoring_func, "
                              "topk_method, routed_scaling_factor or router_correction_bias besides")
        if self.topk_method == "greedy":
            return
        if not (isinstance(self.n_group, int) and self.n_group >= 1 and self.num_experts % self.n_group == 0):
            raise MoejaxError(f"config: n_group {self.n_group!r} must divide num_experts {self.num_experts}")
        if not (isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group):
            raise MoejaxError(f"config: topk_group {self.topk_group!r} must be in [1, n_group={self.n_group}]")
        group_size = self.num_experts // self.n_group
        if self.top_k > self.topk_group * group_size:
            raise MoejaxError(f"config: top_k {self.top_k} is more than the {self.topk_group} kept group(s) of "
                              f"{group_size} experts hold (topk_group)")
        if self.topk_method == "noaux_tc" and self.n_group > 1 and group_size < 2:
            raise MoejaxError(f"config: n_group {self.n_group} leaves {group_size} expert per group; topk_method "
                              "noaux_tc scores a group by its 2 best")

    @property
    def rotary_dim(self) -> int:
        """The dims of each head that rope rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def router_defaults(cls) -> dict[str, Any]:
        """`router_options` of the default router (softmax, greedy top-k, no scaling)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.name in ROUTER_FIELDS}

    @property
    def router_options(self) -> dict[str, Any]:
        """The keyword arguments of `models.moe.route` this config sets (all but the correction bias)."""
        return {name: getattr(self, name) for name in ROUTER_FIELDS}


    @property
    def is_mla(self) -> bool:
        """Multi-head latent attention: the KV cache holds a compressed latent, not per-head keys and values."""
        return self.kv_lora_rank > 0

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Indices of the layers that have routed experts."""
        return tuple(i for i, is_moe in enumerate(self.moe_layers) if is_moe)

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @property
    def np_dtype(self):
        """The weights' dtype as a NumPy dtype (bfloat16 via JAX's ml_dtypes)."""
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    @property
    def dtype_bytes(self) -> int:
        return {"bfloat16": 2, "float16": 2, "float32": 4}[self.dtype]

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections, and their biases if any)."""
        biases = 2 * self.expert_intermediate_size + self.hidden_size if self.expert_bias else 0
        return 3 * self.hidden_size * self.expert_intermediate_size + biases

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.dtype_bytes

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rope"] = {
            "theta": self.rope.theta,
            "scaling_type": self.rope.scaling_type,
            "scaling": dict(self.rope.scaling),
        }
        data["format_version"] = FORMAT_VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise MoejaxError("no format_version: not a moejax checkpoint config" if version is None else
                              f"checkpoint format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        rope = data.pop("rope")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise MoejaxError(f"config: unknown fields {sorted(unknown)}")
        for name in ("moe_layers", "sliding_windows", "eos_token_ids"):
            data[name] = tuple(data[name])
        data["rope"] = RopeConfig(
            theta=float(rope["theta"]),
            scaling_type=rope["scaling_type"],
            scaling=tuple(sorted((k, float(v)) for k, v in rope["scaling"].items())),
        )
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        return cls.from_json(read_config_json(path))


def read_config_json(path: Path) -> dict[str, Any]:
    """The parsed moejax config.json at `path`."""
    path = Path(path)
    if not path.is_file():
        raise MoejaxError(f"{path}: missing moejax config file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MoejaxError(f"{path}: not valid JSON ({err})") from None
