"""Incremental detokenization of one request's output, with stop strings.

The engine calls ``add`` once per generated token (in order) and ``take_new_text`` once per
output increment it sends, the last time with ``finished=True``; after that the object is spent.

Decoding uses the prefix-offset / read-offset window of vLLM and TGI: only the tokens since the
last stable point, plus the tokens before it as context, are decoded, so each token costs O(1) in
the output length::

    window:  [ context (already emitted) | unread tokens ]
             ^ prefix offset              ^ read offset
    new text = decode(window) - decode(context), taken once it no longer ends in U+FFFD

The context matters for tokenizers whose decode of a token depends on its neighbours
(sentencepiece strips the leading space of the first token), which is why the window starts with
the tail of the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from memserve.model.tokenizer import Tokenizer

# Prompt tokens seeded into the first window as context (vLLM uses the same number).
NUM_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text increments.

    Text flows through three stages: tokens not yet decodable (an incomplete UTF-8 tail), text
    decoded but held back (it may start a stop string), and text returned by ``take_new_text``.
    Returned text is never retracted: it never ends inside a multi-byte character and never
    contains a prefix of a stop string that is later cut.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        """Raises ``ValueError`` if a stop string is empty."""
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._skip_special_tokens = skip_special_tokens
        # A stop string can begin in the last (longest stop - 1) characters of the text.
        self._num_hold_chars = max((len(s) for s in self._stop), default=1) - 1
        num_context_tokens = min(len(prompt_token_ids), NUM_CONTEXT_TOKENS)
        self._window_ids = list(prompt_token_ids[len(prompt_token_ids) - num_context_tokens :])
        self._read_offset = len(self._window_ids)
        self._taken_parts: list[str] = []
        self._held_text = ""
        self._stop_reason: str | None = None
        self._finished = False

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token. Returns the stop string that matched if the output text now
        contains one (then the request must finish), else None.

        Raises ``RuntimeError`` if called after a stop string matched or after the final
        ``take_new_text(finished=True)``.
        """
        if self._stop_reason is not None or self._finished:
            raise RuntimeError("add() called on a finished detokenizer")
        self._window_ids.append(token_id)
        new_text = self._decode_window(force=False)
        return self._append(new_text, check_stop) if new_text else None

    def take_new_text(self, finished: bool) -> str:
        """The output text that became stable since the last call.

        Holds back an incomplete UTF-8 tail and, while not finished and stop strings exist, the
        last ``len(longest stop) - 1`` characters. With ``finished=True`` returns everything left
        (an incomplete tail is emitted as decoded, with U+FFFD) and the detokenizer is spent.
        """
        if finished and not self._finished:
            self._finished = True
            if self._stop_reason is None:
                self._append(self._decode_window(force=True))
        final = finished or self._stop_reason is not None
        num_chars = len(self._held_text) - (0 if final else self._num_hold_chars)
        if num_chars <= 0:
            return ""
        new_text, self._held_text = self._held_text[:num_chars], self._held_text[num_chars:]
        self._taken_parts.append(new_text)
        return new_text

    @property
    def text(self) -> str:
        """Output text so far, cut at a matched stop string (after it with
        ``include_stop_str_in_output``); excludes an incomplete UTF-8 tail until finished."""
        return "".join(self._taken_parts) + self._held_text

    def _decode_window(self, force: bool) -> str:
        """Text of the unread tokens, or "" if it may still change (ends in U+FFFD) unless
        ``force``; on success the read offset moves to the end and the window slides."""
        if self._read_offset == len(self._window_ids):
            return ""
        context_text = self._decode(self._window_ids[: self._read_offset])
        window_text = self._decode(self._window_ids)
        if not force and (
            len(window_text) <= len(context_text) or window_text.endswith(_REPLACEMENT_CHAR)
        ):
            return ""
        del self._window_ids[: self._read_offset]
        self._read_offset = len(self._window_ids)
        return window_text[len(context_text) :]

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _append(self, new_text: str, check_stop: bool = True) -> str | None:
        """Add decoded text to the held text; on a stop string, cut there and return it."""
        search_from = len(self._held_text)
        self._held_text += new_text
        if not check_stop:
            return None
        match = self._find_stop(search_from)
        if match is None:
            return None
        index, stop = match
        self._held_text = self._held_text[: index + len(stop) if self._include_stop else index]
        self._stop_reason = stop
        return stop

    def _find_stop(self, search_from: int) -> tuple[int, str] | None:
        """Earliest stop string in the held text that ends at or after ``search_from``.

        Every earlier match would have been found by an earlier call, and the held text always
        keeps the last ``longest stop - 1`` characters, so a match never starts in taken text.
        """
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self._held_text.find(stop, max(0, search_from - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best
