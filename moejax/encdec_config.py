"""Configuration of encoder-decoder MoE models (Switch Transformers, NLLB-MoE) and their model cards.

Layers are numbered globally: encoder layers 0..Le-1, then decoder layers Le..Le+Ld-1. Per-layer
tuples, checkpoint groups ("layer", g) / ("expert", g, e) and a runtime's expert keys (g, e) all use
this one numbering, so a runtime drives encoder and decoder MoE layers through the same interface.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from moejax.config import DTYPES, FORMAT_VERSION, ModelConfig
from moejax.errors import MoejaxError

KIND = "encdec"
ROUTING_MODES = ("dropless", "capacity")
EMBEDDING_TABLES = ("encoder_embed", "decoder_embed", "lm_head")


@dataclasses.dataclass(frozen=True)
class EncDecConfig:
    """Architecture of an encoder-decoder MoE model. Sizes are in elements, not bytes.

    Routing: 'dropless' gives every token its top-k experts; 'capacity' reproduces transformers'
    expert-capacity token dropping: per sequence (`capacity_group='sequence'`, Switch) or over all
    tokens of a call (`'batch'`, NLLB), with capacity `expert_capacity`, or
    ceil(`capacity_token_fraction` x tokens in the call) when that fraction is > 0.
    `route_padding_tokens`: whether source padding takes expert capacity (it never gets experts).

    `own_tables` names the embedding tables that are separate weights (`EMBEDDING_TABLES`); the
    others are the one `shared` table (the output projection then uses its transpose).
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    head_dim: int
    num_encoder_layers: int
    num_decoder_layers: int
    moe_layers: tuple[bool, ...]
    num_experts: int
    top_k: int
    encoder_ffn_size: int
    decoder_ffn_size: int
    norm: str  # 'rms' (T5 style, no bias) | 'layer' (with bias)
    norm_eps: float
    position: str  # 'relative' (T5 buckets) | 'sinusoidal' (fairseq, offset by pad id)
    relative_buckets: int = 32
    relative_max_distance: int = 128
    attention_bias: bool = False
    scale_attention: bool = True  # scores * head_dim**-0.5 (Switch folds it into the weights)
    hidden_act: str = "relu"
    ffn_bias: bool = False
    embed_scale: float = 1.0
    logit_scale: float = 1.0
    own_tables: tuple[str, ...] = ()
    router_bias: bool = False
    norm_topk_prob: bool = False
    expert_output_scale: float = 1.0
    routing: str = "dropless"
    capacity_group: str = "sequence"
    expert_capacity: int | None = None
    capacity_token_fraction: float = 0.0
    batch_prioritized_routing: bool = False
    normalize_before_dropping: bool = False
    route_padding_tokens: bool = True
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = ()
    max_position_embeddings: int = 0  # informational: neither family limits lengths
    dtype: str = "float32"

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise MoejaxError(f"config: {message}")

        check(len(self.moe_layers) == self.num_layers,
              f"moe_layers needs {self.num_layers} entries (encoder + decoder layers), got {len(self.moe_layers)}")
        check(self.dtype in DTYPES, f"dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")
        check(1 <= self.top_k <= self.num_experts, f"top_k {self.top_k} must be in [1, num_experts={self.num_experts}]")
        check(self.top_k <= 2, f"top_k {self.top_k}: encoder-decoder families route to 1 or 2 experts")
        check(self.norm in ("rms", "layer"), f"norm '{self.norm}' is not one of rms, layer")
        check(self.position in ("relative", "sinusoidal"), f"position '{self.position}' is not one of relative, sinusoidal")
        check(self.routing in ROUTING_MODES, f"routing '{self.routing}' is not one of {', '.join(ROUTING_MODES)}")
        check(self.capacity_group in ("sequence", "batch"), f"capacity_group '{self.capacity_group}' is not one of sequence, batch")
        check(set(self.own_tables) <= set(EMBEDDING_TABLES), f"own_tables {list(self.own_tables)} not within {list(EMBEDDING_TABLES)}")
        check(self.position != "relative" or self.relative_max_distance > self.relative_buckets // 2,
              f"relative_max_distance {self.relative_max_distance} must exceed half of relative_buckets {self.relative_buckets}")
        check(self.expert_capacity is not None or self.capacity_token_fraction > 0,
              "capacity routing needs expert_capacity or capacity_token_fraction > 0")

    # -- layers --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Encoder plus decoder layers (the global numbering)."""
        return self.num_encoder_layers + self.num_decoder_layers

    @property
    def encoder_layer_ids(self) -> range:
        return range(self.num_encoder_layers)

    @property
    def decoder_layer_ids(self) -> range:
        return range(self.num_encoder_layers, self.num_layers)

    def is_decoder_layer(self, layer: int) -> bool:
        return layer >= self.num_encoder_layers

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Global indices of the layers that have routed experts."""
        return tuple(i for i, is_moe in enumerate(self.moe_layers) if is_moe)

    def ffn_size(self, layer: int) -> int:
        """Hidden size of layer `layer`'s FFN (dense or each expert)."""
        return self.decoder_ffn_size if self.is_decoder_layer(layer) else self.encoder_ffn_size

    @property
    def inner_size(self) -> int:
        """Attention width: num_heads x head_dim (may differ from hidden_size in Switch)."""
        return self.num_heads * self.head_dim

    # -- sizes ---------------------------------------------------------------------------
    # The weights' dtype as a NumPy dtype, its size in bytes, and `replace`: as for decoder models.
    np_dtype = ModelConfig.np_dtype
    dtype_bytes = ModelConfig.dtype_bytes
    replace = ModelConfig.replace

    def layer_expert_params(self, layer: int) -> int:
        """Parameters of one routed expert of layer `layer` (up, down and their biases)."""
        d, f = self.hidden_size, self.ffn_size(layer)
        return 2 * d * f + (f + d if self.ffn_bias else 0)

    @property
    def expert_params(self) -> int:
        """Parameters of the largest routed expert (what an expert cache slot must hold)."""
        return max((self.layer_expert_params(g) for g in self.moe_layer_ids), default=0)

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.dtype_bytes

    # -- serialisation -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, **dataclasses.asdict(self), "format_version": FORMAT_VERSION}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EncDecConfig:
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise MoejaxError("no format_version: not a moejax checkpoint config" if version is None else
                              f"checkpoint format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        if data.pop("kind", None) != KIND:
            raise MoejaxError(f"config: not an encoder-decoder config (kind is not '{KIND}')")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise MoejaxError(f"config: unknown fields {sorted(unknown)}")
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(data)
        if missing:
            raise MoejaxError(f"config: missing fields {sorted(missing)}")
        for name in ("moe_layers", "own_tables", "eos_token_ids"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

