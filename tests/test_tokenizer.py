"""Tokenizer: the built-in dummy BPE, HF compatibility of save/load, token bytes, chat templates."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from memserve.engine.types import RequestError
from memserve.model.tokenizer import Tokenizer, bytes_to_unicode

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Crème brûlée à la française, naïve façade",
    "日本語のテキストと中文文本",
    "emoji 🙂👍🏽 and flags 🇫🇷",
    "  leading spaces\n\n\ttabs and <s> specials </s> inside",
    "",
]
CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks! 🙂"},
    ],
]


@pytest.fixture(scope="module")
def dummy() -> Tokenizer:
    return Tokenizer.dummy()


@pytest.fixture(scope="module")
def saved_dir(dummy: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dummy_tokenizer")
    dummy.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(saved_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(saved_dir)


# ---- dummy -----------------------------------------------------------------------------------


def test_dummy_is_deterministic(dummy: Tokenizer) -> None:
    again = Tokenizer.dummy()
    assert again.to_str() == dummy.to_str()
    assert again.encode(TEXTS[0]) == dummy.encode(TEXTS[0])


def test_dummy_builds_fast() -> None:
    start = time.perf_counter()
    Tokenizer.dummy(32000)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("vocab_size", [259, 260, 1000, 32000])
def test_dummy_vocab_has_exact_size_and_no_holes(vocab_size: int) -> None:
    tok = Tokenizer.dummy(vocab_size)
    assert tok.vocab_size == vocab_size
    for token_id in range(vocab_size):
        assert tok.decode([token_id], skip_special_tokens=False) != ""
        assert tok.token_bytes(token_id) != b""


def test_dummy_layout(dummy: Tokenizer) -> None:
    assert (dummy.bos_token_id, dummy.eos_token_ids) == (1, frozenset({2}))
    assert dummy.all_special_ids == frozenset({0, 1, 2})
    assert (dummy.bos_token, dummy.eos_token) == ("<s>", "</s>")
    assert [dummy.token_bytes(3 + b) for b in range(256)] == [bytes([b]) for b in range(256)]
    table = bytes_to_unicode()
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (table[ord(" ")], table[ord("\n")], table[ord("a")]) == ("Ġ", "Ċ", "a")
    assert all(len(dummy.token_bytes(i)) == 2 for i in range(259, dummy.vocab_size))
    first_merges = [dummy.token_str(i) for i in range(259, 265)]
    assert first_merges == ["  ", " e", "e ", "ee", " t", "et"]  # most frequent characters first


def test_dummy_grows_three_byte_merges_past_all_byte_pairs() -> None:
    tok = Tokenizer.dummy(128256)
    assert tok.vocab_size == 128256
    assert len(tok.token_bytes(259 + 256 * 256 - 1)) == 2
    assert len(tok.token_bytes(259 + 256 * 256)) == 3
    assert len(tok.token_bytes(128255)) == 3
    text = TEXTS[0] + TEXTS[3]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("vocab_size", [0, 258, 259 + 256**2 + 256**3 + 1])
def test_dummy_rejects_impossible_vocab_size(vocab_size: int) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.dummy(vocab_size)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
@example(text=TEXTS[1])
@example(text=TEXTS[2])
@example(text=TEXTS[3])
def test_dummy_round_trips_any_text(dummy: Tokenizer, text: str) -> None:
    token_ids = dummy.encode(text, add_special_tokens=False)
    assert dummy.decode(token_ids, skip_special_tokens=False) == text
    assert b"".join(dummy.token_bytes(i) for i in token_ids) == text.encode()


def test_bos_only_with_special_tokens(dummy: Tokenizer) -> None:
    with_bos = dummy.encode("hello")
    without = dummy.encode("hello", add_special_tokens=False)
    assert with_bos == [1, *without]
    assert 1 not in without
    assert dummy.decode(with_bos) == "hello"
    assert dummy.decode(with_bos, skip_special_tokens=False) == "<s>hello"


def test_english_compresses(dummy: Tokenizer) -> None:
    text = " ".join(TEXTS[:1] * 4) + " Serving large language models needs a KV cache."
    assert len(dummy.encode(text, add_special_tokens=False)) < 0.7 * len(text.encode())


# ---- token_bytes / token_str -----------------------------------------------------------------


def test_token_str_of_partial_utf8_uses_bytes_form(dummy: Tokenizer) -> None:
    assert dummy.token_str(3 + 0xE2) == "bytes:\\xe2"
    assert dummy.token_str(3 + ord("h")) == "h"
    assert dummy.token_str(1) == "<s>"
    multi = [dummy.token_str(i) for i in dummy.encode("🙂", add_special_tokens=False)]
    assert all(s.startswith("bytes:\\x") for s in multi)


def test_token_bytes_rejects_unknown_id(dummy: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dummy.token_bytes(dummy.vocab_size)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dummy.token_bytes(-1)


# ---- save / load / HF ------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_saved_dummy_encodes_like_transformers(
    dummy: Tokenizer, hf_tokenizer: Any, text: str
) -> None:
    assert hf_tokenizer(text)["input_ids"] == dummy.encode(text)
    hf_ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert hf_ids == dummy.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_like_transformers(
    dummy: Tokenizer, hf_tokenizer: Any, messages: list[dict[str, Any]]
) -> None:
    for add_generation_prompt in (True, False):
        expected = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert dummy.apply_chat_template(messages, add_generation_prompt) == expected


def test_dummy_chat_template_format(dummy: Tokenizer) -> None:
    rendered = dummy.apply_chat_template(CONVERSATIONS[1][:2])
    assert rendered == "<s><|system|>\nBe brief.</s>\n<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n"


def test_from_pretrained_round_trips(dummy: Tokenizer, saved_dir: Path) -> None:
    loaded = Tokenizer.from_pretrained(saved_dir)
    assert loaded.to_str() == dummy.to_str()
    assert loaded.chat_template == dummy.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_ids) == (dummy.bos_token_id, dummy.eos_token_ids)
    assert loaded.all_special_ids == dummy.all_special_ids
    for text in TEXTS:
        assert loaded.encode(text) == dummy.encode(text)


def test_from_pretrained_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_from_pretrained_corrupt_files(saved_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((saved_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_chat_template_jinja_file_wins(saved_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((saved_dir / name).read_text())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


def test_generation_config_eos_ids_round_trip(dummy: Tokenizer, tmp_path: Path) -> None:
    dummy.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7], "top_p": 0.9}')
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token_ids == frozenset({2, 7})
    resaved = tmp_path / "resaved"
    loaded.save_pretrained(resaved)
    assert Tokenizer.from_pretrained(resaved).eos_token_ids == frozenset({2, 7})


# ---- sentencepiece-style (Llama-2 layout) ----------------------------------------------------


def _sentencepiece_backend() -> Backend:
    """A tiny tokenizer.json laid out like Llama-2's: ``▁`` pieces, byte fallback, BOS template."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in "▁abcdefghijklmnopqrstuvwxyzHW,!":
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("e", "l"), ("▁h", "el"), ("l", "o"), ("▁hel", "lo"), ("▁", "w")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Backend(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return backend


def _write_sentencepiece_dir(path: Path, add_bos_token: bool) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _sentencepiece_backend().save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "bos_token": {
            "__type": "AddedToken",
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "special": True,
        },
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
        ],
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": [2, 5]}')
    return path


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_sentencepiece_layout_encodes_like_transformers(
    tmp_path: Path, add_bos_token: bool
) -> None:
    transformers = pytest.importorskip("transformers")
    path = _write_sentencepiece_dir(tmp_path, add_bos_token)
    ours = Tokenizer.from_pretrained(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    for text in ["hello world", "Hello, World!", "héllo 🙂 x"]:
        assert ours.encode(text) == hf(text)["input_ids"]
        assert ours.encode(text)[0] == 1  # tokenizer.json's post-processor wins, as in HF


def test_sentencepiece_layout_bytes_and_config(tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_write_sentencepiece_dir(tmp_path, add_bos_token=True))
    token_ids = tok.encode("hello wé", add_special_tokens=False)
    assert [tok.token_bytes(i) for i in token_ids] == [b" hello", b" w", b"\xc3", b"\xa9"]
    assert tok.token_str(token_ids[2]) == "bytes:\\xc3"
    assert tok.decode(token_ids) == "hello wé"
    assert tok.eos_token_ids == frozenset({2, 5})
    assert tok.bos_token_id == 1
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"


# ---- apply_chat_template validation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        ({"role": "user", "content": "x"}, "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], "missing 'role'"),
        ([{"role": "robot", "content": "x"}], "role must be one of"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "user", "content": None}], "content must be a string"),
        ([{"role": "user"}], "content must be a string"),
        ([{"role": "assistant", "content": None}], "content must be a string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "'image_url' is not supported",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], r"text must be a string"),
        ([{"role": "user", "content": ["plain"]}], r"content\[0\] must be an object"),
    ],
)
def test_invalid_messages_are_request_errors(dummy: Tokenizer, messages: Any, match: str) -> None:
    with pytest.raises(RequestError, match=match) as info:
        dummy.apply_chat_template(messages)
    assert info.value.param == "messages"


def test_message_normalization(dummy: Tokenizer) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    messages: list[dict[str, Any]] = [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": parts},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
    ]
    rendered = dummy.apply_chat_template(messages, add_generation_prompt=False)
    expected = "<s><|system|>\nrules</s>\n<|user|>\none\ntwo</s>\n<|assistant|>\n</s>\n"
    assert rendered == expected


def test_template_errors_are_request_errors(dummy: Tokenizer, tmp_path: Path) -> None:
    dummy.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('only user turns, please') }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RequestError, match="only user turns, please"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])
    config["chat_template"] = "{% for %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RequestError, match="chat template error"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template_is_request_error(dummy: Tokenizer, tmp_path: Path) -> None:
    dummy.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RequestError, match="no chat template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_template_globals_and_tojson(dummy: Tokenizer, tmp_path: Path) -> None:
    dummy.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}|{{ eos_token }}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    rendered = Tokenizer.from_pretrained(tmp_path).apply_chat_template(
        [{"role": "user", "content": "<é>"}]
    )
    assert rendered == '{"role": "user", "content": "<é>"}|4|</s>'
