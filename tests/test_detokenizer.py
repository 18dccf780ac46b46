"""Incremental detokenisation and stop strings, against real tokenizers: SmolLM2's byte-level
BPE and a SentencePiece-style (Metaspace + byte fallback) tokenizer trained here."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dynamo_run.pipeline.postprocess import IncrementalDetokenizer, StopStringMatcher

SAMPLES = [
    "Hello world",
    "  leading and   inner    spaces, trailing  ",
    "naïve café — “quotes” and ‘apostrophes’",
    "日本語のテキストと中文字符",
    "emoji: 👩‍💻🚀🇫🇷 done",
    "code:\n\tdef f(x):\n\t\treturn x ** 2\n",
    "numbers 1234567890 and 3.14159",
]


def stream_decode(tokenizer: Tokenizer, ids: list[int], prompt_ids=None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [detok.add([token]) for token in ids]


@pytest.fixture(scope="module")
def sentencepiece_like() -> Tokenizer:
    """SentencePiece-style: ▁ for spaces, byte fallback for characters not in the vocab."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.normalizer = None
    tokenizer.train_from_iterator(["Hello world, the quick brown fox."] * 30, trainer)
    # Byte tokens are ordinary vocabulary entries in SentencePiece models, not specials.
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_stream_equals_full_decode(default_card, text):
    tokenizer = default_card.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces = stream_decode(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_multibyte_character_is_held_until_complete(default_card):
    tokenizer = default_card.tokenizer
    ids = tokenizer.encode("🚀", add_special_tokens=False).ids
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    pieces = stream_decode(tokenizer, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🚀"


def test_special_tokens_are_skipped(default_card):
    tokenizer = default_card.tokenizer
    ids = tokenizer.encode("Hi there<|im_end|>", add_special_tokens=False).ids
    assert ids[-1] == 2
    assert "".join(stream_decode(tokenizer, ids)) == "Hi there"


@pytest.mark.parametrize("text", ["Hello world", "the quick  fox", "héllo wörld ✓"])
def test_sentencepiece_spaces_and_byte_fallback(sentencepiece_like, text):
    tokenizer = sentencepiece_like
    prompt = tokenizer.encode("Hello", add_special_tokens=False).ids
    ids = tokenizer.encode(" " + text, add_special_tokens=False).ids
    pieces = stream_decode(tokenizer, ids, prompt_ids=prompt)
    assert not any("\ufffd" in piece for piece in pieces)
    # With the prompt as left context, the leading space of the answer is kept.
    assert "".join(pieces) == " " + text


def test_stop_string_split_across_pieces():
    matcher = StopStringMatcher(["</answer>"])
    shown = []
    for piece in ["The result", " is 42</", "ans", "wer> and more"]:
        text, stopped = matcher.push(piece)
        shown.append(text)
        if stopped:
            break
    assert "".join(shown) == "The result is 42"
    assert stopped


def test_stop_string_prefix_released_when_it_cannot_match():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.push("abc ST") == ("abc ", False)
    assert matcher.push("ART") == ("START", False)
    assert matcher.push("ST") == ("", False)
    assert matcher.flush() == "ST"


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["\n\n", "User:"])
    assert matcher.push("one User: two\n\nthree") == ("one ", True)


def test_no_stop_strings_passes_through():
    matcher = StopStringMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""
