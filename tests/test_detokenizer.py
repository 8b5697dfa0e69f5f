"""IncrementalDetokenizer: streaming equals one-shot decoding; stop strings never leak."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as Backend

from memserve.engine.detokenizer import NUM_CONTEXT_TOKENS, IncrementalDetokenizer
from memserve.model.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
BYTE_BASE_ID = 3  # the dummy tokenizer's id of byte 0x00


class CountingTokenizer(Tokenizer):
    """Records the length of every decode call, to check the per-token cost."""

    decoded_lengths: list[int]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.decoded_lengths.append(len(token_ids))
        return super().decode(token_ids, skip_special_tokens)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.dummy(2000)


def byte_ids(text: str) -> list[int]:
    """One token per UTF-8 byte, so multi-byte characters arrive split."""
    return [BYTE_BASE_ID + b for b in text.encode()]


def stream(detok: IncrementalDetokenizer, token_ids: Sequence[int]) -> tuple[list[str], str | None]:
    """Feed tokens one by one, taking text after each; return the increments and the stop."""
    increments: list[str] = []
    stop_reason = None
    for token_id in token_ids:
        stop_reason = detok.add(token_id)
        increments.append(detok.take_new_text(finished=stop_reason is not None))
        if stop_reason is not None:
            return increments, stop_reason
    increments.append(detok.take_new_text(finished=True))
    return increments, None


def assert_no_early_replacement(increments: list[str], final: str) -> None:
    """A U+FFFD may only be emitted where the final text has one too."""
    offset = 0
    for piece in increments:
        for i, char in enumerate(piece):
            if char == REPLACEMENT:
                assert final[offset + i] == REPLACEMENT
        offset += len(piece)


# Token ids mixing everything: specials, lone bytes (incl. parts of multi-byte characters), merges.
token_id_lists = st.lists(
    st.one_of(
        st.integers(0, 2),
        st.integers(BYTE_BASE_ID + 0x80, BYTE_BASE_ID + 0xFF),
        st.integers(BYTE_BASE_ID, 1999),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    prompt=st.text(max_size=10),
    output_text=st.text(max_size=20),
    noise=token_id_lists,
    skip_special_tokens=st.booleans(),
)
def test_streaming_equals_one_shot_decode(
    tok: Tokenizer, prompt: str, output_text: str, noise: list[int], skip_special_tokens: bool
) -> None:
    output_ids = byte_ids(output_text) + noise + tok.encode(output_text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), skip_special_tokens=skip_special_tokens)
    increments, stop_reason = stream(detok, output_ids)
    final = tok.decode(output_ids, skip_special_tokens=skip_special_tokens)
    assert stop_reason is None
    assert "".join(increments) == final == detok.text
    assert_no_early_replacement(increments, final)


def test_multibyte_characters_are_held_until_complete(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, tok.encode("say"))
    taken = []
    for token_id in byte_ids("a🙂b"):
        assert detok.add(token_id) is None
        taken.append(detok.take_new_text(finished=False))
    assert taken == ["a", "", "", "", "🙂", "b"]


def test_incomplete_tail_is_flushed_on_finish(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [])
    for token_id in [*byte_ids("ok"), BYTE_BASE_ID + 0xE2, BYTE_BASE_ID + 0x82]:
        detok.add(token_id)
    assert detok.take_new_text(finished=False) == "ok"
    assert detok.take_new_text(finished=True) == REPLACEMENT
    assert detok.text == "ok" + REPLACEMENT
    with pytest.raises(RuntimeError):
        detok.add(BYTE_BASE_ID)


def test_cost_per_token_does_not_grow(tok: Tokenizer) -> None:
    counting = CountingTokenizer.dummy(2000)
    assert isinstance(counting, CountingTokenizer)
    counting.decoded_lengths = []
    detok = IncrementalDetokenizer(counting, counting.encode("x " * 100))
    text = "The quick brown fox jumps over the lazy dog. " * 20
    increments, _ = stream(detok, counting.encode(text, add_special_tokens=False))
    assert "".join(increments) == text
    assert max(counting.decoded_lengths) <= NUM_CONTEXT_TOKENS + 1


def sentencepiece_tokenizer() -> Tokenizer:
    """A tiny Llama-2-style tokenizer: ``▁`` marks a space and decode strips the first one."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab |= {piece: 259 + i for i, piece in enumerate("▁ahelosy")}
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
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
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>")


def test_prompt_context_keeps_sentencepiece_leading_space() -> None:
    sp = sentencepiece_tokenizer()
    output_ids = sp.encode("hello é", add_special_tokens=False)  # ▁ h e l l o ▁ <0xC3> <0xA9>
    assert sp.decode(output_ids) == "hello é"  # decoded alone, the leading space is stripped
    detok = IncrementalDetokenizer(sp, sp.encode("say"))
    increments, _ = stream(detok, output_ids)
    assert "".join(increments) == " hello é"
    assert "" in increments  # the lone byte 0xC3 was held back


# ---- stop strings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("include", "expected"), [(False, "Hello "), (True, "Hello world")])
def test_stop_string_spanning_tokens(tok: Tokenizer, include: bool, expected: str) -> None:
    output_ids = tok.encode("Hello world, goodbye", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [1], stop=["world"], include_stop_str_in_output=include)
    increments, stop_reason = stream(detok, output_ids)
    assert stop_reason == "world"
    assert "".join(increments) == detok.text == expected
    with pytest.raises(RuntimeError):
        detok.add(BYTE_BASE_ID)


def test_stop_string_is_held_back_while_it_may_match(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    taken = []
    for token_id in byte_ids("abST"):
        detok.add(token_id)
        taken.append(detok.take_new_text(finished=False))
    assert "".join(taken) == "a"  # "bST" could still be the start of "STOP"
    assert detok.take_new_text(finished=True) == "bST"


def test_earliest_stop_wins_and_multibyte_stop(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, [], stop=["🙂", "xyz"])
    increments, stop_reason = stream(detok, byte_ids("abc🙂xyz"))
    assert stop_reason == "🙂"
    assert "".join(increments) == "abc"


def first_stop_cut(text: str, stops: Sequence[str], include: bool) -> tuple[str, str | None]:
    """Reference: the text fed one character at a time, cut at the first completed stop."""
    for end in range(1, len(text) + 1):
        found = [(end - len(s), s) for s in stops if text[:end].endswith(s)]
        if found:
            start, stop = min(found)
            return text[: end if include else start], stop
    return text, None


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab é", max_size=30),
    stops=st.lists(st.text(alphabet="ab é", min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
)
def test_stop_strings_match_reference_and_never_leak(
    tok: Tokenizer, text: str, stops: list[str], include: bool
) -> None:
    detok = IncrementalDetokenizer(tok, [1], stop=stops, include_stop_str_in_output=include)
    increments, stop_reason = stream(detok, byte_ids(text))
    expected, expected_stop = first_stop_cut(text, stops, include)
    assert (stop_reason, detok.text) == (expected_stop, expected)
    assert "".join(increments) == expected
    if stop_reason is not None and not include:
        assert all(s not in expected for s in stops)
    assert REPLACEMENT not in "".join(increments)
