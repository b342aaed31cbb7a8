"""The format the routed experts are kept in: the checkpoint's dtype, bf16, or compact int8 / int4 codes.

`ExpertFormat` converts expert stacks ({name: [E, ...]}) or single experts into its format when they are
loaded, and tells their bytes (what crosses the link per missed expert, what a cache budget counts).
Compact formats (`models.quantized`) are approximate: the engine reports its format in the stats, and
`moejax info` a stored checkpoint's. A checkpoint written compact by `moejax convert --expert-format`
says so in `expert_format.json` ({"expert_format": "int4", "group_size": 64}); it loads compact with no
option, and only in its own format.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError, ParameterError
from moejax.models.quantized import (CODE_DTYPES, GROUP_SIZE, QUANTIZED_FORMATS, QUANTIZED_WEIGHTS, SCALE_SUFFIX,
                                     check_quantizable, quantize)

EXPERT_FORMATS = ("bf16",) + QUANTIZED_FORMATS  # what `expert_format` may ask for
FORMAT_FILE = "expert_format.json"
DTYPE_FORMATS = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


@dataclasses.dataclass(frozen=True)
class ExpertFormat:
    """name: 'int8' / 'int4' (compact), or 'bf16' / 'f16' / 'f32' (float weights of that dtype);
    model_dtype: the checkpoint's dtype (compact formats' scales and dequantized weights);
    approximate: whether the weights differ from the checkpoint's (compact, or a narrower float)."""

    name: str
    model_dtype: str
    group_size: int = GROUP_SIZE

    @property
    def compact(self) -> bool:
        return self.name in QUANTIZED_FORMATS

    @property
    def approximate(self) -> bool:
        return self.name != DTYPE_FORMATS[self.model_dtype]

    @property
    def float_dtype(self) -> np.dtype:
        """The dtype of the float weights (all of them in float formats; biases and scales in compact ones)."""
        import jax.numpy as jnp

        names = {v: k for k, v in DTYPE_FORMATS.items()}
        return jnp.dtype(self.model_dtype if self.compact else names[self.name])

    def shapes(self, shapes: dict) -> dict:
        """One expert's {name: (shape, dtype)} of the checkpoint -> the same in this format."""
        if not self.compact:
            return {name: (shape, self.float_dtype) for name, (shape, _) in shapes.items()}
        out = {}
        for name, (shape, _) in shapes.items():
            if name not in QUANTIZED_WEIGHTS:
                out[name] = (shape, self.float_dtype)
                continue
            rows = shape[-2] // 2 if self.name == "int4" else shape[-2]
            out[name] = (shape[:-2] + (rows, shape[-1]), CODE_DTYPES[self.name])
            out[name + SCALE_SUFFIX] = (shape[:-2] + (shape[-2] // self.group_size, shape[-1]), self.float_dtype)
        return out

    def expert_bytes(self, shapes: dict) -> int:
        """Bytes of one expert in this format; shapes: one expert's {name: (shape, dtype)} of the checkpoint."""
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.shapes(shapes).values())

    def check(self, shapes: dict) -> None:
        """Raises ParameterError when the experts ({name: (shape, dtype)}) cannot be quantized to this format."""
        if self.compact:
            for name, (shape, _) in shapes.items():
                if name in QUANTIZED_WEIGHTS:
                    try:
                        check_quantizable(name, shape, self.group_size)
                    except ValueError as err:
                        raise ParameterError("{expert_format} {fmt!r}: the experts' {problem}", fmt=self.name,
                                             problem=str(err)) from None

    def convert(self, weights: dict, where: str, xp=np) -> dict:
        """An expert or stack {name: NumPy array [..., I, O]} in this format. Weights that are already in it
        (a compact checkpoint's codes and scales) are checked and kept; float ones are cast or quantized
        (with `xp`: numpy, or jax.numpy on a device). `where` names the source in errors (e.g. 'ckpt: MoE
        layer 3')."""
        stored = _stored_format(weights)
        if stored is not None:
            if stored != self.name:
                raise MoejaxError(f"{where}: experts stored {stored}, expected {self.name}")
            for name in QUANTIZED_WEIGHTS:
                if name in weights and name + SCALE_SUFFIX not in weights:
                    raise MoejaxError(f"{where}: compact expert weight {name!r} has no scale {name + SCALE_SUFFIX!r}")
            return {name: w if name in QUANTIZED_WEIGHTS else xp.asarray(w).astype(self.float_dtype)
                    for name, w in weights.items()}
        if not self.compact:
            return {name: xp.asarray(w).astype(self.float_dtype) for name, w in weights.items()}
        out = {}
        for name, w in weights.items():
            if name in QUANTIZED_WEIGHTS:
                out[name], out[name + SCALE_SUFFIX] = quantize(w, self.name, self.float_dtype, self.group_size, xp)
            else:
                out[name] = xp.asarray(w).astype(self.float_dtype)
        return out

    def describe(self) -> dict:
        """For the stats and `--json`."""
        info = {"expert_format": self.name, "expert_format_approximate": self.approximate}
        if self.compact:
            info["expert_group_size"] = self.group_size
        return info

    def record(self) -> dict:
        """What an expert directory's manifest records (`offload.expert_files`): {"name": "int4", "group_size":
        64}, or {"name": "bf16"} for float weights."""
        return {"name": self.name, **({"group_size": self.group_size} if self.compact else {})}

    def save(self, directory: Path) -> None:
        """Marks a checkpoint directory as holding experts in this (compact) format."""
        (Path(directory) / FORMAT_FILE).write_text(json.dumps({"expert_format": self.name, "group_size": self.group_size}))


def _stored_format(weights: dict) -> str | None:
    """'int8' / 'int4' when the weights are compact codes (or a scale is there), else None."""
    for fmt, dtype in CODE_DTYPES.items():
        if any(np.dtype(w.dtype) == dtype for name, w in weights.items() if name in QUANTIZED_WEIGHTS):
            return fmt
    if any(name.endswith(SCALE_SUFFIX) for name in weights):
        return "compact"
    return None


def stored_format(path: Path, model_dtype: str) -> ExpertFormat:
    """The format a checkpoint's experts are stored in: its `expert_format.json`, else its dtype."""
    marker = Path(path) / FORMAT_FILE
    if not marker.is_file():
        return ExpertFormat(DTYPE_FORMATS[model_dtype], model_dtype)
    try:
        data = json.loads(marker.read_text())
        name, group_size = data["expert_format"], int(data["group_size"])
    except (ValueError, KeyError, TypeError) as err:
        raise MoejaxError(f"{marker}: not a valid expert format file ({type(err).__name__}: {err})") from None
    if name not in QUANTIZED_FORMATS or group_size < 1:
        raise MoejaxError(f"{marker}: unknown expert format {name!r} (group size {group_size})")
    return ExpertFormat(name, model_dtype, group_size)


def resolve_format(requested: str | None, stored: ExpertFormat, encoder_decoder: bool = False) -> ExpertFormat:
    """The format to load in: `requested` (the `expert_format` parameter; None: as stored) from `stored`."""
    if requested is None or requested == stored.name:
        return stored
    if requested not in EXPERT_FORMATS:
        raise ParameterError.not_one_of("expert_format", requested, EXPERT_FORMATS)
    if stored.compact:
        raise ParameterError("{expert_format} {fmt!r}: the checkpoint stores {stored} experts, which load only as "
                             "{stored}", fmt=requested, stored=stored.name)
    if encoder_decoder:
        raise ParameterError("{expert_format} {fmt!r}: encoder-decoder models load their experts as stored",
                             fmt=requested)
    return ExpertFormat(requested, stored.model_dtype)
