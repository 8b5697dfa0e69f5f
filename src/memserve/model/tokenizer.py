"""Tokenizer: a Hugging Face ``tokenizers.Tokenizer`` plus the chat template and special token ids.

``Tokenizer.from_pretrained(dir)`` reads a model directory the way ``transformers.AutoTokenizer``
does (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``,
``generation_config.json``), so ``encode`` gives the same ids as HF. ``Tokenizer.dummy()`` builds a
deterministic byte-level BPE in memory so that everything runs without downloads.

Token ids are plain ints. ``token_bytes`` knows the two piece spellings in use: byte-level BPE
(GPT-2 / Llama-3: every byte is one printable unicode symbol) and sentencepiece-style BPE
(Llama-2: ``▁`` is a space, ``<0xNN>`` is the byte NN).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import jinja2
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from memserve.engine.types import RequestError
from memserve.model.chat_template import (
    compile_chat_template,
    normalize_chat_messages,
    read_chat_template,
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

_DUMMY_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_DUMMY_NUM_BASE_TOKENS = len(_DUMMY_SPECIAL_TOKENS) + 256
_DUMMY_MAX_MERGES = 256**2 + 256**3  # every byte pair, then every (byte pair, byte)
# Characters whose pairs the dummy BPE merges first, most frequent in English first; every other
# byte follows in byte order.
_DUMMY_CHAR_PRIORITY = (
    " etaoinsrhldcumfpgwybvkxjqzETAOINSRHLDCUMFPGWYBVKXJQZ0123456789.,'\"-:;!?()\n/"
)
_DUMMY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + (message['content'] or '') + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """Encode/decode text, render chat prompts, and name the special token ids of one model.

    Immutable after construction (the only mutable state is the lazily filled ``token_bytes``
    cache and compiled chat template), so one instance may be shared by every request.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        """Wrap ``backend``; ``extra_eos_token_ids`` adds ids (from ``generation_config.json``)
        that end generation besides ``eos_token``. Raises ``ValueError`` if a named special token
        is not in the vocabulary."""
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self._id_of(bos_token)
        eos_token_id = self._id_of(eos_token)
        eos_ids = {*extra_eos_token_ids, *([] if eos_token_id is None else [eos_token_id])}
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        added_tokens = backend.get_added_tokens_decoder()
        self._added_tokens = {i: t.content for i, t in added_tokens.items()}
        special = {i for i, t in added_tokens.items() if t.special}
        named = (self.bos_token_id, eos_token_id, self._id_of(unk_token))
        self.all_special_ids: frozenset[int] = frozenset(
            special | {i for i in named if i is not None}
        )
        self._piece_to_bytes = _piece_decoder(backend)
        self._token_bytes_cache: dict[int, bytes] = {}
        self._compiled_template: jinja2.Template | None = None

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return int(token_id)

    # ---- encode / decode -------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the post-processor adds BOS (etc.)."""
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``; an incomplete UTF-8 sequence comes out as U+FFFD."""
        return str(self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes that the single token ``token_id`` stands for (added tokens: their text).

        Raises ``ValueError`` for an id outside the vocabulary.
        """
        cached = self._token_bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._added_tokens:
            raw = self._added_tokens[token_id].encode()
        else:
            piece = self._backend.id_to_token(token_id) if token_id >= 0 else None
            if piece is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary")
            raw = self._piece_to_bytes(piece)
        self._token_bytes_cache[token_id] = raw
        return raw

    def token_str(self, token_id: int) -> str:
        """Text of one token for logprobs; bytes that are not valid UTF-8 on their own come back in
        vLLM's form ``bytes:\\xe2\\x80`` (literal backslash-x escapes)."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    # ---- chat template ---------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True
    ) -> str:
        """Render an OpenAI-style message list to the prompt text, as HF's
        ``apply_chat_template(..., tokenize=False)`` does.

        Raises ``RequestError(param="messages")`` for invalid messages, a model without a chat
        template, or an error raised by the template itself.
        """
        if self.chat_template is None:
            raise RequestError("this model has no chat template; use completions", "messages")
        normalized = normalize_chat_messages(messages)
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        special |= {"unk_token": self.unk_token}
        try:
            if self._compiled_template is None:
                self._compiled_template = compile_chat_template(self.chat_template)
            return str(
                self._compiled_template.render(
                    messages=normalized,
                    tools=None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **{k: v for k, v in special.items() if v is not None},
                )
            )
        except jinja2.TemplateError as e:
            raise RequestError(f"chat template error: {e.message}", "messages") from e

    # ---- construction and persistence ------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a model directory.

        Whether ``encode`` adds BOS/EOS is up to the post-processor in tokenizer.json; the config's
        ``add_bos_token`` / ``add_eos_token`` are ignored, as transformers (v5) does when a
        tokenizer.json exists.

        Raises ``FileNotFoundError`` if ``path`` or its ``tokenizer.json`` is missing, and
        ``ValueError`` naming the file if a file cannot be parsed.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(root)!r} does not exist")
        tokenizer_file = root / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{str(tokenizer_file)!r} not found")
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust parser raises plain Exception
            raise ValueError(f"cannot parse {str(tokenizer_file)!r}: {e}") from e
        config = _read_json(root / CONFIG_FILE)
        generation = _read_json(root / GENERATION_CONFIG_FILE)
        bos_token = _token_content(config.get("bos_token"))
        generation_bos_id = generation.get("bos_token_id")
        if bos_token is None and isinstance(generation_bos_id, int):
            bos_token = backend.id_to_token(generation_bos_id)
        return cls(
            backend,
            bos_token=bos_token,
            eos_token=_token_content(config.get("eos_token")),
            unk_token=_token_content(config.get("unk_token")),
            chat_template=read_chat_template(root, config),
            extra_eos_token_ids=_as_int_list(generation.get("eos_token_id")),
        )

    @classmethod
    def dummy(cls, vocab_size: int = 32000) -> Tokenizer:
        """A deterministic byte-level BPE built in memory (no files, no randomness).

        Ids: 0 ``<unk>``, 1 ``<s>`` (BOS), 2 ``</s>`` (EOS), 3..258 the 256 byte symbols in byte
        order, then ``vocab_size - 259`` two-byte merges, common English pairs first (vocabularies
        over 259 + 256**2, e.g. Llama-3's 128256, continue with three-byte merges). Raises
        ``ValueError`` unless ``259 <= vocab_size <= 259 + 256**2 + 256**3``.
        """
        num_merges = vocab_size - _DUMMY_NUM_BASE_TOKENS
        if not 0 <= num_merges <= _DUMMY_MAX_MERGES:
            raise ValueError(
                f"dummy vocab_size must be in [{_DUMMY_NUM_BASE_TOKENS}, "
                f"{_DUMMY_NUM_BASE_TOKENS + _DUMMY_MAX_MERGES}], got {vocab_size}"
            )
        alphabet = bytes_to_unicode()
        vocab = {token: i for i, token in enumerate(_DUMMY_SPECIAL_TOKENS)}
        vocab |= {alphabet[b]: len(_DUMMY_SPECIAL_TOKENS) + b for b in range(256)}
        merges = _dummy_merges(num_merges)
        vocab |= {
            left + right: _DUMMY_NUM_BASE_TOKENS + i for i, (left, right) in enumerate(merges)
        }
        backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
        backend.add_special_tokens([AddedToken(t, special=True) for t in _DUMMY_SPECIAL_TOKENS])
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        return cls(
            backend,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            chat_template=_DUMMY_CHAT_TEMPLATE,
        )

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``path`` (created if needed)
        so that both ``Tokenizer.from_pretrained`` and ``transformers.AutoTokenizer`` load it.

        EOS ids beyond ``eos_token`` are merged into ``generation_config.json`` (other keys of an
        existing file are kept); otherwise that file is not touched.
        """
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(root / TOKENIZER_FILE))
        config: dict[str, object] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
        }
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        named |= {"unk_token": self.unk_token, "chat_template": self.chat_template}
        config |= {k: v for k, v in named.items() if v is not None}
        _write_json(root / CONFIG_FILE, config)
        if self.eos_token_ids != self._named_eos_ids():
            generation = _read_json(root / GENERATION_CONFIG_FILE)
            generation["eos_token_id"] = sorted(self.eos_token_ids)
            _write_json(root / GENERATION_CONFIG_FILE, generation)

    def _named_eos_ids(self) -> frozenset[int]:
        eos_token_id = self._id_of(self.eos_token)
        return frozenset() if eos_token_id is None else frozenset({eos_token_id})

    def to_str(self) -> str:
        """The ``tokenizer.json`` text of the backend (for comparing two tokenizers)."""
        return str(self._backend.to_str())


# ---- pieces and bytes ------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: byte -> printable unicode symbol that stands for it in byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    unprintable = [b for b in range(256) if b not in table]
    table |= {b: chr(256 + i) for i, b in enumerate(unprintable)}
    return dict(sorted(table.items()))


def _byte_level_piece_bytes(symbol_to_byte: Mapping[str, int], piece: str) -> bytes:
    return bytes(symbol_to_byte[symbol] for symbol in piece)


def _sentencepiece_piece_bytes(piece: str) -> bytes:
    byte_match = _BYTE_FALLBACK_PIECE.fullmatch(piece)
    if byte_match is not None:
        return bytes([int(byte_match.group(1), 16)])
    return piece.replace("▁", " ").encode()


def _piece_decoder(backend: Backend) -> Callable[[str], bytes]:
    """How one vocabulary piece maps to bytes, picked from the backend's decoder."""
    decoder = backend.decoder
    state = json.loads(decoder.__getstate__()) if decoder is not None else {}
    types = {d.get("type") for d in [state, *state.get("decoders", [])]}
    if "ByteLevel" in types:
        symbol_to_byte = {symbol: b for b, symbol in bytes_to_unicode().items()}
        return functools.partial(_byte_level_piece_bytes, symbol_to_byte)
    return _sentencepiece_piece_bytes


def _dummy_merges(num_merges: int) -> list[tuple[str, str]]:
    """The dummy's first ``num_merges`` merges: all 65536 byte pairs, then (vocabularies over
    65795) a byte pair + a byte, both in the order of ``_bytes_pairs_by_priority``."""
    alphabet = bytes_to_unicode()
    byte_pairs = list(itertools.islice(_byte_pairs_by_priority(), num_merges))
    merges = [(alphabet[a], alphabet[b]) for a, b in byte_pairs]
    by_priority = _bytes_by_priority()
    for i in range(num_merges - len(merges)):
        (a, b), c = byte_pairs[i // 256], by_priority[i % 256]
        merges.append((alphabet[a] + alphabet[b], alphabet[c]))
    return merges


def _bytes_by_priority() -> list[int]:
    """``_DUMMY_CHAR_PRIORITY`` first, then every other byte in byte order."""
    first = [ord(c) for c in _DUMMY_CHAR_PRIORITY]
    return first + [b for b in range(256) if b not in first]


def _byte_pairs_by_priority() -> Iterator[tuple[int, int]]:
    """All byte pairs such that, for every k, the pairs of the k highest-priority bytes come
    before any pair with a lower-priority byte (tier k: the pairs whose rarer byte is k-th)."""
    by_priority = _bytes_by_priority()
    for k, newest in enumerate(by_priority):
        yield from ((older, newest) for older in by_priority[:k])
        yield from ((newest, other) for other in by_priority[: k + 1])


# ---- config files ----------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, object]:
    """The JSON object in ``path``, ``{}`` if the file is absent; ``ValueError`` if malformed."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse {str(path)!r}: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    return value


def _write_json(path: Path, value: Mapping[str, object]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_content(value: object) -> str | None:
    """A special token as written in tokenizer_config: a string or ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_int_list(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []
