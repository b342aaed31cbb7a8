"""Training text: documents from files, a fixed train/valid/test split, and packed token streams.

A document is one WikiText article (files whose lines mark articles as ` = Title = `), one
record of a JSON-lines file (`prompt` + `reference`, as in tasks.jsonl), or one whole file of any
other text. Each document's split follows from a checksum of its text, so training and
evaluation agree on the held-out documents without storing a list.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from moejax.errors import MoejaxError

TEXT_SUFFIXES = (".txt", ".rst", ".md", ".jsonl", ".py")
SPLITS = ("train", "valid", "test")
TEST_PERCENT = 4  # checksum % 100 below this: test (held out for evaluation scripts)
VALID_PERCENT = 4  # the next this many: valid (monitored during training)

_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)
_HEADING = re.compile(r"^((?:= )+)(.*?)((?: =)+)$", re.MULTILINE)
# WikiText's tokenisation, undone so that the model writes ordinary text.
_WIKITEXT_JOINS = (
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "), (" : ", ": "),
    (" 's ", "'s "), (" n't ", "n't "), ("( ", "("), (" )", ")"),
)


@dataclasses.dataclass(frozen=True)
class Document:
    source: str  # the file it came from
    text: str

    @property
    def split(self) -> str:
        bucket = zlib.crc32(self.text.encode()) % 100
        if bucket < TEST_PERCENT:
            return "test"
        return "valid" if bucket < TEST_PERCENT + VALID_PERCENT else "train"


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files named by each path: a file, a directory (text files below it, sorted) or a glob pattern."""
    files: list[Path] = []
    for spec in paths:
        path = Path(spec)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES)))
        else:
            matches = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file())
            if not matches:
                raise MoejaxError(f"corpus path {spec}: no such file, directory or matching files")
            files.extend(matches)
    return files


def clean_wikitext(text: str) -> str:
    """Joins WikiText's split punctuation, drops its `<unk>` placeholders (a model trained on them
    writes them), strips its padded lines and compacts `= = Heading = =`."""
    text = text.replace(" <unk>", "").replace("<unk> ", "")
    for split, joined in _WIKITEXT_JOINS:
        text = text.replace(split, joined)
    lines = [line.strip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = _HEADING.sub(lambda m: f"{'=' * len(m.group(1).split())} {m.group(2)} {'=' * len(m.group(1).split())}", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def file_documents(path: Path) -> list[Document]:
    """The documents of one file (see the module docstring)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MoejaxError(f"{path}: cannot read corpus file ({err})") from None
    if path.suffix == ".jsonl":
        return [Document(str(path), text) for text in _jsonl_texts(path, raw)]
    starts = [m.start() for m in _ARTICLE_TITLE.finditer(raw)]
    if not starts:
        return [Document(str(path), raw.strip())] if raw.strip() else []
    pieces = [raw[a:b] for a, b in zip(starts, starts[1:] + [len(raw)])]
    return [Document(str(path), clean_wikitext(piece)) for piece in pieces if piece.strip()]


def _jsonl_texts(path: Path, raw: str) -> list[str]:
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record["prompt"] + (" " + record["reference"] if record.get("reference") else "")
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise MoejaxError(f"{path}:{number}: expected a JSON object with a 'prompt' string ({err})") from None
        texts.append(text.strip())
    return texts


def read_documents(paths: Sequence[str | Path]) -> list[Document]:
    """All documents of the given corpus paths, in file order."""
    docs = [doc for path in expand_paths(paths) for doc in file_documents(path)]
    if not docs:
        raise MoejaxError(f"corpus {', '.join(map(str, paths))}: no text found")
    return docs


def split_documents(docs: Sequence[Document]) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for doc in docs:
        out[doc.split].append(doc)
    return out


def pack(tokenizer, docs: Sequence[Document], bos_id: int, eos_id: int) -> np.ndarray:
    """One int32 token stream: each document as BOS, its tokens, EOS, in order."""
    if not docs:
        return np.zeros(0, np.int32)
    encodings = tokenizer.encode_batch([doc.text for doc in docs], add_special_tokens=False)
    pieces = [np.asarray([bos_id, *enc.ids, eos_id], np.int32) for enc in encodings]
    return np.concatenate(pieces)


def windows(stream: np.ndarray, length: int, limit: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows [M, length + 1] of a token stream (each shares one token
    with the next, so every token but the first is a target once); at most `limit` of them."""
    count = (len(stream) - 1) // length
    if limit is not None:
        count = min(count, limit)
    if count < 1:
        raise MoejaxError(f"{len(stream)} tokens are too few for one window of {length + 1}")
    index = np.arange(count)[:, None] * length + np.arange(length + 1)[None, :]
    return stream[index]
