"""tiktoken tokenizers (Kimi-K2's layout: tiktoken.model, tokenization_*.py, tokenizer_config.json) -> tokenizer.json,
against a tiktoken-style encoder written here: split by the regex (Python's `regex`), then per piece the whole
piece if it is a token, else its bytes merged, again and again the adjacent pair whose concatenation has the lowest
rank (the leftmost of equals). The ranks are learnt here by a plain BPE over a small multilingual text, with the
single bytes in a shuffled order and a few whole words listed as tokens that no merge reaches."""

import base64
import json
import random

import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file

from moejax.cli import main as cli
from moejax.convert import tiktoken_bpe

regex = pytest.importorskip("regex")

# The features of Kimi-K2's pat_str: Han runs, letter classes intersected with [^\p{Han}], case-insensitive
# contractions, digit runs of up to 3, a lookahead for trailing whitespace.
PATTERN_PARTS = [
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'re|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'re|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
]
PATTERN = "|".join(PATTERN_PARTS)
SPECIAL = {1000: "[BOS]", 1001: "[EOS]", 1002: "<|im_user|>", 1003: "<|im_assistant|>", 1004: "<|im_end|>",
           1006: "<|im_system|>", 1007: "<|im_middle|>"}
# In the manner of Kimi-K2's (whitespace control, loop.first, dict .get, `is string`), written here.
CHAT_TEMPLATE = """{%- for m in messages -%}
  {%- if loop.first and m['role'] != 'system' -%}<|im_system|>system<|im_middle|>Be brief.<|im_end|>{%- endif -%}
  {%- if m.get('role') == 'user' -%}<|im_user|>user<|im_middle|>
  {%- else -%}<|im_assistant|>{{ m['role'] }}<|im_middle|>{%- endif -%}
  {%- if m['content'] is string -%}{{ m['content'] }}{%- endif -%}<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"""
CORPUS = """The tokenizer's job: split the text, then merge bytes. It's what they'd said they're doing.
Les élèves ont réussi l'épreuve à Noël; Straße, Größe, naïve café. ÀÉÎÕÜ résumé déjà vu.
中文分词测试，我们喜欢自然语言处理。日本語のテキストも少し。한국어 문장도 있습니다.
Numbers 1234567 and 3.14159, 2026-12-05 at 09:25; 100% of 42 items cost $19.99.
Emoji 🙂🙂 and 👍🏽 thumbs, 🚀 launch!   Spaces    runs\tand\ttabs\n\nnew lines\r\n  indented code:
    def f(x):  return x ** 2  # THE END. THEY'RE HERE, IT'S DONE.
"""
LISTED = ["词法分析", " überall", "🚀🙂", " Ωμέγα"]  # whole words as tokens, not in CORPUS: no merge makes them
TEXTS = [
    "Hello world! It's the tokenizer's test; THEY'RE here and we'd go.",
    "Les élèves réussissent à Noël — naïve café, Straße.",
    "中文分词测试，日本語のテキスト。한국어 문장",
    "Mixed中文and English混合text",
    "Emoji 🙂🙂🙂 👍🏽 🚀🚀 done",
    "Digits 1234567890 3.14159 2026-12-05 $19.99",
    "Whitespace   runs\t\ttabs\n\n\nand\r\nlines   \n  trailing   ",
    "    def f(x):\n        return x ** 2\n",
    "Special [BOS] tokens <|im_user|>hi<|im_end|><|im_assistant|> in text [EOS]",
    "<|im_end|><|im_end|>[BOS]",
    "",
    " ",
    "词法分析",
    "词法分析器 überall überallhin 🚀🙂🚀🙂 Ωμέγα",
    "l'épreuve",
]


def learn_ranks(corpus: str, merges: int, seed: int = 0) -> dict[bytes, int]:
    """The single bytes (shuffled), then `merges` BPE merges learnt on `corpus` split by PATTERN (the most frequent
    adjacent pair, the smallest bytes of equals), with LISTED tokens placed among them."""
    byte_order = list(range(256))
    random.Random(seed).shuffle(byte_order)
    tokens = [bytes([b]) for b in byte_order]
    words: dict[tuple[bytes, ...], int] = {}
    for piece in regex.findall(PATTERN, corpus, flags=regex.V1):
        word = tuple(bytes([b]) for b in piece.encode())
        words[word] = words.get(word, 0) + 1
    for _ in range(merges):
        pairs: dict[tuple[bytes, bytes], int] = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        tokens.append(best[0] + best[1])
        words = {_merge(word, best): count for word, count in words.items()}
    for i, word in enumerate(LISTED):
        tokens.insert(300 + 20 * i, word.encode())
    return {token: rank for rank, token in enumerate(dict.fromkeys(tokens))}


def _merge(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


RANKS = learn_ranks(CORPUS, 200)


def reference_encode(text: str, ranks: dict[bytes, int] = RANKS) -> list[int]:
    """tiktoken's encoding of `text`, special tokens allowed."""
    ids = []
    specials = {content: i for i, content in SPECIAL.items()}
    for chunk in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if chunk in specials:
            ids.append(specials[chunk])
            continue
        for piece in regex.findall(PATTERN, chunk, flags=regex.V1):
            parts = [bytes([b]) for b in piece.encode()]
            if piece.encode() in ranks:
                parts = [piece.encode()]
            while len(parts) > 1:
                ranked = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
                if not ranked:
                    break
                _, i = min(ranked)
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids.extend(ranks[part] for part in parts)
    return ids


def write_tiktoken_files(directory, ranks=RANKS, add_bos_token=False, pattern_source=None):
    """Kimi-K2's tokenizer layout: the ranks file, a tokenization_*.py that must not be run, tokenizer_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda t: t[1])]
    (directory / "tiktoken.model").write_text("\n".join(lines) + "\n")
    parts = ",\n".join(f"            r\"\"\"{part}\"\"\"" for part in PATTERN_PARTS)
    pattern_source = pattern_source or f"\"|\".join(\n        [\n{parts},\n        ]\n    )"
    (directory / "tokenization_test.py").write_text(
        "import tiktoken_that_is_not_installed\nraise SystemExit('this file must not be run')\n\n\n"
        f"class TikTokenTokenizer:\n    num_reserved_special_tokens = 256\n\n    pat_str = {pattern_source}\n")
    decoder = {str(i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for i, content in SPECIAL.items()}
    config = {"added_tokens_decoder": decoder, "bos_token": "[BOS]", "eos_token": "[EOS]",
              "add_bos_token": add_bos_token,
              "chat_template": CHAT_TEMPLATE, "tokenizer_class": "TikTokenTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_test.TikTokenTokenizer", None]}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiktoken_bpe.tiktoken_tokenizer(write_tiktoken_files(tmp_path_factory.mktemp("tiktoken")))


def test_byte_level_alphabet_is_tokenizers():
    """The characters tokenizers' ByteLevel writes for every byte of UTF-8 text (all but C0, C1, F5-FF)."""
    from tokenizers import pre_tokenizers

    assert set(tiktoken_bpe.BYTE_LEVEL) == set(pre_tokenizers.ByteLevel.alphabet())
    code_points = [*range(0x800), *range(0x800, 0xD800, 0x800), *range(0xE000, 0x10000, 0x800), 0x10000, 0x40000,
                   0x80000, 0xC0000, 0x100000]
    text = "".join(map(chr, code_points))
    assert {b for b in text.encode()} == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    [(written, _)] = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert written == tiktoken_bpe.byte_level(text.encode())


def test_learnt_ranks_merge_within_words_and_list_whole_words():
    assert len(RANKS) == 256 + 200 + len(LISTED) and sorted(RANKS.values()) == list(range(len(RANKS)))
    assert reference_encode("词法分析") == [RANKS["词法分析".encode()]]
    assert RANKS["词法分析".encode()] not in reference_encode("词法分析器")  # no merge reaches it in a longer piece
    assert len(reference_encode(" the tokenizer")) < len(" the tokenizer".encode()) / 2


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_as_tiktoken_and_decodes_back(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == reference_encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == regex.sub("|".join(map(regex.escape, SPECIAL.values())), "", text)


def test_random_text_encodes_as_tiktoken(tokenizer):
    """Strings drawn from the corpus' characters and a few others (case folds, marks, spaces of other widths)."""
    pool = [*sorted(set(CORPUS)), *"ſİıǅ\u00a0\u2003\u3000\u0301'", "'s", "'RE", "    ", "\r\n", "词法分析", " überall"]
    rng = random.Random(1)
    for _ in range(2000):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 24)))
        assert tokenizer.encode(text, add_special_tokens=False).ids == reference_encode(text), repr(text)


def test_any_rank_order_encodes_as_tiktoken():
    """Vocabularies of two-letter words in any rank order (a word's parts may rank after it, a word may have several
    splits): the two encoders agree."""
    rng = random.Random(2)
    for _ in range(100):
        words = sorted({"".join(rng.choice("ab") for _ in range(rng.randint(2, 5))).encode() for _ in range(10)})
        rng.shuffle(words)
        ranks = {token: rank for rank, token in enumerate([bytes([b]) for b in range(256)] + words)}
        tokenizer = tiktoken_bpe.build_tokenizer(ranks, PATTERN, [], None)
        for _ in range(20):
            text = "".join(rng.choice("ab") for _ in range(rng.randint(2, 12)))
            assert tokenizer.encode(text).ids == reference_encode(text, ranks), (text, words)


def test_bos_is_added_as_tokenizer_config_says(tmp_path, tokenizer):
    assert tokenizer.encode("hi").ids == reference_encode("hi")
    with_bos = tiktoken_bpe.tiktoken_tokenizer(write_tiktoken_files(tmp_path, add_bos_token=True))
    assert with_bos.encode("hi").ids == [1000, *reference_encode("hi")]


def test_ranks_without_a_pattern_give_no_tokenizer_with_a_note(tmp_path, caplog):
    (write_tiktoken_files(tmp_path) / "tokenization_test.py").unlink()
    with caplog.at_level("WARNING"):
        assert tiktoken_bpe.tiktoken_tokenizer(tmp_path) is None
    assert "tiktoken.model without a tokenization_*.py assigning pat_str" in caplog.text
    (tmp_path / "tokenizer.json").write_text("{}")  # a tokenizer.json of its own is copied, never replaced
    assert tiktoken_bpe.tiktoken_tokenizer(tmp_path) is None


def tiny_checkpoint(directory):
    """A 1-layer Mixtral safetensors checkpoint of zeros (the tokenizer is what is converted here)."""
    from moejax.convert.families import family

    hf = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 1010, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "num_local_experts": 2, "num_experts_per_tok": 1, "torch_dtype": "float32"}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf))
    targets = family("mixtral").tensor_map(family("mixtral").config_from_hf(hf))
    save_file({name: np.zeros(target.hf_shape, np.float32) for name, target in targets.items()},
              str(directory / "model.safetensors"))
    return directory


def test_conversion_writes_the_tokenizer_and_chat_finds_its_template(tmp_path):
    from moejax.serving.http.chat import ChatTemplate
    from moejax.tokenizer import load_tokenizer

    hf = write_tiktoken_files(tiny_checkpoint(tmp_path / "hf"))
    assert cli(["convert", str(hf), str(tmp_path / "out"), "--quiet"]) == 0
    tokenizer = load_tokenizer(tmp_path / "out")
    text = "Straße 中文分词测试 🙂🙂  done 词法分析"
    assert tokenizer.encode(text) == reference_encode(text) and tokenizer.decode(reference_encode(text)) == text
    # the copied tokenizer_config.json names tokenizer.json's class, not the tiktoken one whose file is not copied
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tokenizer.encode(text) == reference_encode(text)
    # ids past the ranks that tokenizer_config.json does not name (460-999, 1005, 1008, 1009 of the model's 1010)
    # are reserved special tokens, named as tiktoken's Kimi class names them
    assert [tokenizer.token_id(f"<|reserved_token_{i}|>") for i in (460, 1005, 1009)] == [460, 1005, 1009]
    assert tokenizer.encode("a<|reserved_token_460|>") == [*reference_encode("a"), 460]
    assert hf_tokenizer.convert_ids_to_tokens([1004, 1008]) == ["<|im_end|>", "<|reserved_token_1008|>"]
    chat = ChatTemplate.from_checkpoint(tmp_path / "out", tokenizer)
    assert chat.kind == "the checkpoint's"
    prompt = chat.prompt_ids([{"role": "user", "content": "It's 中文?"}])
    assert prompt == reference_encode("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>"
                                      "It's 中文?<|im_end|><|im_assistant|>assistant<|im_middle|>")


@pytest.mark.parametrize("change,message", [
    (lambda hf: (hf / "tiktoken.model").write_text("IQ== 0\nIg== 1\nnot-base64! 2\n"),
     r"tiktoken.model:3: expected '<base64 token> <rank>'.*found 'not-base64! 2'"),
    (lambda hf: (hf / "tiktoken.model").write_text("IQ== 0\nIQ== 1\n"), r"tiktoken.model:2: token b'!' appears twice"),
    (lambda hf: (hf / "tiktoken.model").write_bytes(b"IQ== 0\nIg== \xff1\n"), r"tiktoken.model:2: expected"),
    (lambda hf: (hf / "tiktoken.model").write_text("IQ== 0\nIg== 0\n"), r"tiktoken.model:2: rank 0 appears twice"),
    (lambda hf: (hf / "tiktoken.model").write_text("IQ== 0\n"), "no token for 255 of the 256 single bytes"),
    (lambda hf: write_tiktoken_files(hf, pattern_source="'|'.join(PARTS)"),
     r"tokenization_test.py:8: pat_str must be a string literal or \"\|\".join\(\[string literals\]\).*join\(PARTS\)"),
    (lambda hf: write_tiktoken_files(hf, pattern_source="r'[a-z'"), r"tokenization_test.py: pat_str is not a regex"),
    (lambda hf: (hf / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"7": {"content": "x"}}}'),
     r"tokenizer_config.json: added_tokens_decoder id 7 is also a rank of tiktoken.model"),
    (lambda hf: (hf / "tokenizer_config.json").write_text(
        '{"added_tokens_decoder": {"1001": {"content": "<|reserved_token_1009|>"}}}'),
     r"tokenizer_config.json: added token '<\|reserved_token_1009\|>' is not at id 1009, where tiktoken names it"),
    (lambda hf: (hf / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"999": {"content": "!"}}}'),
     r"tokenizer_config.json: added token '!' \(id 999\) has the byte-level text of ranked token"),
])
def test_bad_tokenizer_files_are_named_and_nothing_is_written(tmp_path, capsys, change, message):
    hf = write_tiktoken_files(tiny_checkpoint(tmp_path / "hf"))
    change(hf)
    capsys.readouterr()
    assert cli(["convert", str(hf), str(tmp_path / "out"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and regex.search(message, err), err
    assert not (tmp_path / "out").exists()
