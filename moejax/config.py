"""Frozen configuration dataclasses: hashable, so they can be static arguments of `jax.jit`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from moejax.errors import MoejaxError

DTYPES = ("bfloat16", "float16", "float32")
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
    shared_expert_gated: bool = True  # a sigmoid gate scales the shared expert (Qwen2-MoE); DeepSeek's has none
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # 'none' | 'head' (per head, Qwen3) | 'full' (whole projection, OLMoE)
    clip_qkv: float | None = None
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
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
        if self.is_mla and (self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim or self.qk_rope_head_dim % 2
                            or self.v_head_dim < 1):
            raise MoejaxError(
                f"config: latent attention needs head_dim == qk_nope_head_dim + qk_rope_head_dim, an even "
                f"qk_rope_head_dim and v_head_dim >= 1 (got {self.head_dim}, {self.qk_nope_head_dim}, "
                f"{self.qk_rope_head_dim}, {self.v_head_dim})"
            )

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
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

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
