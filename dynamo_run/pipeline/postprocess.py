"""Token ids -> text for streaming: incremental detokenisation, stop strings and finish
reasons. The one detokeniser of the project; every input uses it through the client."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from dynamo_run.protocol.internal import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
)

# How many prompt tokens seed the decoder, so the first generated token decodes with its
# real left context (SentencePiece drops a leading space at the start of a stream).
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Feeds generated token ids one step at a time and returns only complete UTF-8 text.

    Built on ``tokenizers``' DecodeStream, which keeps the prefix/read offsets and holds back
    partial multi-byte characters, for byte-level BPE and SentencePiece alike.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        context = list(prompt_ids[-_CONTEXT_TOKENS:]) if prompt_ids else None
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)

    def add(self, token_ids: list[int]) -> str:
        """Text completed by these tokens ('' while a character is still partial)."""
        if not token_ids:
            return ""
        if len(token_ids) == 1:
            return self._stream.step(self.tokenizer, token_ids[0]) or ""
        return self._stream.step(self.tokenizer, token_ids) or ""


class StopStringMatcher:
    """Holds back text that might be the start of a stop string, and cuts at a full match.

    ``push`` returns the text safe to show and whether a stop string was hit; the stop
    string itself is never shown (OpenAI behaviour).
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self._pending + text
        cut = -1
        for stop in self.stops:
            idx = buf.find(stop)
            if idx != -1 and (cut == -1 or idx < cut):
                cut = idx
        if cut != -1:
            self._pending = ""
            return buf[:cut], True
        # Keep the longest suffix of buf that is a prefix of some stop string.
        keep = 0
        for size in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                keep = size
                break
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Text held back when the stream ends without a match."""
        text, self._pending = self._pending, ""
        return text


def openai_finish_reason(engine_reason: str | None) -> str | None:
    """The one mapping from an engine's finish reason to the OpenAI API's."""
    if engine_reason is None:
        return None
    if engine_reason == FINISH_LENGTH:
        return "length"
    if engine_reason in (FINISH_STOP, FINISH_CANCELLED):
        return "stop"
    if engine_reason == FINISH_ERROR:
        return "error"
    return engine_reason
