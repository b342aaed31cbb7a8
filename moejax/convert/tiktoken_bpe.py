"""A tiktoken BPE tokenizer -> HF `tokenizers`' tokenizer.json, for checkpoints that ship only tiktoken's files
(Kimi-K2: `tiktoken.model`, `tokenization_kimi.py`, `tokenizer_config.json`).

tiktoken splits text with a regex (the tokenizer class's `pat_str`) and encodes each piece: a piece that is a token
is that token; otherwise its bytes are merged, joining again and again the adjacent pair whose concatenation has the
lowest rank (the leftmost of equals) until no adjacent pair makes a token. Special tokens are found in the text
first. The same tokenizer in `tokenizers`: a byte-level BPE model whose vocabulary is the ranks (each token's bytes
in the byte-level alphabet, its id its rank), with `ignore_merges` (a piece that is a token is taken whole) and a
merge (left, right) for every split of a token into two tokens, ordered by the token's rank; the regex as a Split
pre-tokenizer, then ByteLevel without a regex of its own; a ByteLevel decoder. The special tokens are
tokenizer_config.json's `added_tokens_decoder`, at their ids, and every other id of the model's vocabulary
past the ranks is a special token named `<|reserved_token_{id}|>`, as Kimi-K2's tokenization_kimi.py names
its unlisted special ids (so every id the model can emit decodes, and encodes back); BOS is prepended when its
`add_bos_token` is true.
The two merge alike: both take the lowest-ranked pair, the leftmost of equals (`tokenizers` ranks a merge by its
place in the list, and a token's splits sit together at its rank). Their order among a token's splits never
matters: when two parts cover a token's bytes, they are the parts that the same merges give on those bytes alone
(a merge across the edge would have joined them to a neighbour), so a token forms from one split everywhere.

The regex is read from the `pat_str = ...` assignment of the checkpoint's `tokenization_*.py` without running that
file (`ast`): a string literal, or a string literal's `.join` of a list of string literals.
"""

from __future__ import annotations

import ast
import base64
import json
import logging
from pathlib import Path

from moejax.errors import MoejaxError

RANKS_FILE = "tiktoken.model"
PATTERN_NAME = "pat_str"
TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")  # of an added token; all False unless given
RESERVED_NAME = "<|reserved_token_{id}|>"

log = logging.getLogger(__name__)


def byte_level_alphabet() -> list[str]:
    """The character `tokenizers`' ByteLevel writes for each byte value (index): printable Latin-1 bytes stand for
    themselves, the others for code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


BYTE_LEVEL = byte_level_alphabet()
BYTE_OF = {char: b for b, char in enumerate(BYTE_LEVEL)}


def byte_level(token: bytes) -> str:
    return "".join(BYTE_LEVEL[b] for b in token)


def read_ranks(path: Path) -> dict[bytes, int]:
    """{token bytes: rank} of a tiktoken ranks file: one `base64(token) rank` per line (empty lines skipped)."""
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as err:
        raise MoejaxError(f"{path}: cannot read tiktoken ranks ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            if len(fields) != 2 or not token or rank < 0:
                raise ValueError
        except (IndexError, ValueError):  # binascii.Error is a ValueError
            raise MoejaxError(f"{path}:{number}: expected '<base64 token> <rank>' (a non-empty token, a rank >= 0), "
                              f"found {line[:60].decode('ascii', 'replace')!r}") from None
        if token in ranks or rank in seen_ranks:
            what = f"token {token!r}" if token in ranks else f"rank {rank}"
            raise MoejaxError(f"{path}:{number}: {what} appears twice")
        ranks[token] = rank
        seen_ranks.add(rank)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise MoejaxError(f"{path}: no token for {len(missing)} of the 256 single bytes (first 0x{missing[0]:02x}); a "
                          "byte-level BPE needs them all")
    return ranks


def read_pattern(path: Path) -> str | None:
    """The `pat_str = ...` string a Python file assigns (at any level, e.g. a class attribute), read without running
    the file; None when it assigns none."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as err:
        raise MoejaxError(f"{path}: cannot parse it to find {PATTERN_NAME} ({type(err).__name__}: {err})") from None
    values = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        if any(isinstance(target, ast.Name) and target.id == PATTERN_NAME for target in targets):
            values[_string_value(node.value, f"{path}:{node.lineno}")] = node.lineno
    if len(values) > 1:
        raise MoejaxError(f"{path}: {PATTERN_NAME} is assigned different strings (lines "
                          f"{', '.join(map(str, sorted(values.values())))})")
    return next(iter(values), None)


def _string_value(node: ast.expr, where: str) -> str:
    """The string of a literal or of `"sep".join([literals])`; anything else is refused."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
            and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
            and len(node.args) == 1 and not node.keywords and isinstance(node.args[0], (ast.List, ast.Tuple))
            and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.args[0].elts)):
        return node.func.value.value.join(e.value for e in node.args[0].elts)
    found = " ".join(ast.unparse(node).split())
    raise MoejaxError(f"{where}: {PATTERN_NAME} must be a string literal or \"|\".join([string literals]) to be read "
                      f"without running the file (found {found[:60]!r})")


def find_pattern(src: Path) -> tuple[str, Path] | None:
    """(pattern, file) of the `tokenization_*.py` in `src` that assigns `pat_str`; None when none does."""
    found = {}
    for path in sorted(Path(src).glob("tokenization_*.py")):
        pattern = read_pattern(path)
        if pattern is not None:
            found.setdefault(pattern, path)
    if len(found) > 1:
        names = ", ".join(path.name for path in found.values())
        raise MoejaxError(f"{src}: {names} assign different {PATTERN_NAME} patterns")
    return next(iter(found.items()), None)


def merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """Every (left, right) pair of tokens whose concatenation is a token, in byte-level text, ordered by the rank of
    the concatenation (then by the left token's length: a fixed order among a token's splits)."""
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            if token[:cut] in ranks and token[cut:] in ranks:
                found.append((rank, cut, token))
    found.sort()
    return [(byte_level(token[:cut]), byte_level(token[cut:])) for _, cut, token in found]


def added_tokens(config: dict, path: Path, ranks: dict[bytes, int]) -> list[dict]:
    """tokenizer.json's `added_tokens`: tokenizer_config.json's `added_tokens_decoder` {id: {"content", flags}},
    special unless it says otherwise, at ids no ranked token has."""
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise MoejaxError(f"{path}: added_tokens_decoder must be an object {{id: {{content: ...}}}}")
    ranked_ids = set(ranks.values())
    out, contents = [], set()
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not (key.isascii() and key.isdigit()) or not isinstance(content, str):
            raise MoejaxError(f"{path}: added_tokens_decoder entry {key!r} must be an id with {{\"content\": string}}")
        if int(key) in ranked_ids:
            raise MoejaxError(f"{path}: added_tokens_decoder id {key} is also a rank of {RANKS_FILE}")
        if content in contents:
            raise MoejaxError(f"{path}: added_tokens_decoder holds {content!r} twice")
        contents.add(content)
        same_text = bytes(BYTE_OF[char] for char in content) if all(char in BYTE_OF for char in content) else None
        if same_text in ranks:
            raise MoejaxError(f"{path}: added token {content!r} (id {key}) has the byte-level text of ranked token "
                              f"{ranks[same_text]}: one vocabulary cannot hold both")
        flags = {name: bool(entry.get(name, False)) for name in TOKEN_FLAGS}
        out.append({"id": int(key), "content": content, **flags, "special": bool(entry.get("special", True))})
    return sorted(out, key=lambda token: token["id"])


def reserved_tokens(added: list[dict], ranks: dict[bytes, int], vocab_size: int | None, path: Path) -> list[dict]:
    """`added` plus a special `<|reserved_token_{id}|>` at every id from the ranks' count up to `vocab_size` (the
    model's) that neither a rank nor an added token has, sorted by id."""
    taken = {token["id"] for token in added}
    names = {token["content"] for token in added}
    reserved = []
    for i in range(len(ranks), vocab_size or 0):
        if i in taken:
            continue
        content = RESERVED_NAME.format(id=i)
        if content in names:
            raise MoejaxError(f"{path}: added token {content!r} is not at id {i}, where tiktoken names it")
        reserved.append({"id": i, "content": content, **dict.fromkeys(TOKEN_FLAGS, False), "special": True})
    return sorted(added + reserved, key=lambda token: token["id"])


def bos_token(config: dict, path: Path, added: list[dict]) -> tuple[str, int] | None:
    """(BOS, its id) when tokenizer_config.json's add_bos_token is true (absent: false, as tiktoken encodes)."""
    if not config.get("add_bos_token", False):
        return None
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    ids = {token["content"]: token["id"] for token in added}
    if bos not in ids:
        raise MoejaxError(f"{path}: add_bos_token is true but bos_token {bos!r} is not one of added_tokens_decoder's")
    return bos, ids[bos]


def build_tokenizer(ranks: dict[bytes, int], pattern: str, added: list[dict], bos: tuple[str, int] | None,
                    pattern_source: str = "pattern"):
    """The `tokenizers.Tokenizer` of a tiktoken encoding (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    try:
        regex = Regex(pattern)
    except Exception as err:  # tokenizers raises a bare Exception for a pattern Oniguruma refuses
        raise MoejaxError(f"{pattern_source}: {PATTERN_NAME} is not a regex tokenizers (Oniguruma) accepts "
                          f"({err})") from None
    vocab = {byte_level(token): rank for token, rank in ranks.items()}
    # The added tokens are in the model's vocabulary too: tokenizers gives an added token its id there, and would
    # number it after the vocabulary otherwise.
    vocab.update({token["content"]: token["id"] for token in added})
    tokenizer = Tokenizer(models.BPE(vocab, merges(ranks), ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(regex, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", special_tokens=[bos])
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = added  # with their flags as tokenizer_config.json gives them
    tokenizer = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    assert all(tokenizer.token_to_id(token["content"]) == token["id"] for token in added)
    return tokenizer


def tiktoken_tokenizer(src: Path, vocab_size: int | None = None):
    """The `tokenizers.Tokenizer` of the tiktoken files of `src` when it has `tiktoken.model` and no tokenizer.json,
    else None. Without a `tokenization_*.py` assigning pat_str there is none, with a note. vocab_size: the model's
    (ids past the ranks that no added token has become reserved special tokens); None: none are added."""
    src = Path(src)
    if (src / "tokenizer.json").is_file() or not (src / RANKS_FILE).is_file():
        return None
    found = find_pattern(src)
    if found is None:
        log.warning(f"{src}: {RANKS_FILE} without a tokenization_*.py assigning {PATTERN_NAME} (its split pattern): "
                    "the converted checkpoint has no tokenizer.json")
        return None
    pattern, pattern_file = found
    config_path = src / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoejaxError(f"{config_path}: cannot read it ({err})") from None
    if not isinstance(config, dict):
        raise MoejaxError(f"{config_path}: expected a JSON object")
    ranks = read_ranks(src / RANKS_FILE)
    added = reserved_tokens(added_tokens(config, config_path, ranks), ranks, vocab_size, config_path)
    return build_tokenizer(ranks, pattern, added, bos_token(config, config_path, added), str(pattern_file))


def point_config_at_tokenizer_json(path: Path) -> None:
    """Rewrites a copied tokenizer_config.json (if any) for the tokenizer.json written beside it: the tiktoken class
    it names (`tokenizer_class`, `auto_map`) lives in a Python file the converted checkpoint does not carry, so
    tools that read the config (transformers' AutoTokenizer, `moejax export`'s output) load tokenizer.json instead."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))  # read before, in tiktoken_tokenizer
    config.pop("auto_map", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
