"""Model cards: JSON presets of real architectures in the top-level `models/` folder.

A card holds `name`, `source` (the HF repo it describes), published parameter counts for
checking and optional `notes`. Decoder-only cards hold `architecture`: the fields of a
`ModelConfig` (dtype bfloat16). Encoder-decoder cards (`"kind": "encdec"`) hold `config`: the
HF config.json fields, parsed by the same family code as `moejax convert`. Benchmarks build
random-weight models from them, often with fewer layers so they fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moejax.config import FORMAT_VERSION, ModelConfig
from moejax.encdec_config import KIND as ENCDEC, EncDecConfig
from moejax.errors import MoejaxError

CARDS_DIR = Path(__file__).resolve().parent.parent / "models"


def card_kind(card: dict[str, Any]) -> str:
    """'decoder' or 'encdec'."""
    return card.get("kind", "decoder")


def list_cards(kind: str | None = None) -> list[str]:
    """Names of the shipped cards (of one kind, 'decoder' or 'encdec', if given), sorted."""
    names = sorted(path.stem for path in CARDS_DIR.glob("*.json"))
    return [n for n in names if kind is None or card_kind(read_card(n)) == kind]


def card_path(name_or_path: str | Path) -> Path:
    """The file of a shipped card's name, or the given path to a card file."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise MoejaxError(f"{path}: no such model card")
        return path
    path = CARDS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise MoejaxError(f"unknown model card '{name_or_path}' (cards: {', '.join(list_cards())})")
    return path


def read_card(name_or_path: str | Path) -> dict[str, Any]:
    """The whole card as a dict (name, source, published counts, notes, architecture or config)."""
    path = card_path(name_or_path)
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MoejaxError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(card, dict):
        raise MoejaxError(f"{path}: a model card is a JSON object")
    body = "config" if card_kind(card) == ENCDEC else "architecture"
    if not isinstance(card.get(body), dict):
        raise MoejaxError(f"{path}: a {card_kind(card)} model card needs a '{body}' object")
    for key in ("name", "source"):
        if key not in card:
            raise MoejaxError(f"{path}: card lacks '{key}'")
    return card


def load_card(name_or_path: str | Path, num_layers: int | None = None) -> ModelConfig | EncDecConfig:
    """The card's config; `num_layers` keeps only the first layers of a decoder card (the same
    layer pattern, e.g. a dense first layer stays first), for benchmarks that must fit in memory."""
    card = read_card(name_or_path)
    if card_kind(card) == ENCDEC:
        if num_layers is not None:
            raise MoejaxError(f"card '{card['name']}': num_layers applies to decoder-only cards")
        from moejax.convert.families import family

        return family(card["config"].get("model_type")).config_from_hf(card["config"]).replace(dtype="bfloat16")
    try:
        cfg = ModelConfig.from_json({**card["architecture"], "format_version": FORMAT_VERSION})
    except (KeyError, TypeError, ValueError) as err:
        raise MoejaxError(f"{card_path(name_or_path)}: invalid architecture ({type(err).__name__}: {err})") from None
    if num_layers is None:
        return cfg
    if not 1 <= num_layers <= cfg.num_layers:
        raise MoejaxError(f"card '{card['name']}': num_layers must be in [1, {cfg.num_layers}] (got {num_layers})")
    if not any(cfg.moe_layers[:num_layers]):
        raise MoejaxError(f"card '{card['name']}': its first {num_layers} layer(s) have no experts")
    return cfg.replace(
        num_layers=num_layers,
        moe_layers=cfg.moe_layers[:num_layers],
        sliding_windows=cfg.sliding_windows[:num_layers],
    )
