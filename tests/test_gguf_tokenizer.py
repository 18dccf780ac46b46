"""Our GGUF -> `tokenizers` conversion must give exactly llama.cpp's token ids, since the
frontend tokenises and the engine trusts the ids it receives."""

from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from dynamo_run.model.card import ModelCard, load_model_card  # noqa: E402

pytestmark = pytest.mark.model

SAMPLES = [
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing space ",
    "multiple   spaces\tand\ttabs",
    "line one\nline two\n\n\nthree blank lines\r\nwindows",
    "   \n  \n",
    "Numbers: 0 7 42 123 4567 3.14159 -12,000,000 1e-9",
    "2024-06-01T12:34:56Z",
    "Unicode: café naïve résumé Ångström Straße",
    "Chinese 中文字符测试，日本語のテキスト、한국어 텍스트",
    "Emoji 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 and symbols ∑∫√∞ ≠ ≤",
    "Русский текст и ελληνικά",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "if (x != NULL && *x == '\\0') { printf(\"%d\\n\", x[i++]); }",
    '<html><body class="x">&nbsp;&amp;</body></html>',
    "I'm sure you'll see they've done it, we'd've; DON'T SHOUT",
    "https://example.com/path?query=1&b=two#frag",
    "a" * 50 + " " + "ab" * 20,
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> inside text <|im_end|>",
    "abc123def 12ab34 x2y3",
    "curly ’quotes’ “double” — dash… and 'S 'LL",
    "العربية עברית हिन्दी ไทย",
    "  two leading spaces\n\n\tindented",
    "",
]


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return load_model_card(None)


@pytest.fixture(scope="module")
def reference(card: ModelCard):
    return llama_cpp.Llama(str(card.path), vocab_only=True, verbose=False)


def _llama_ids(reference, text: str) -> list[int]:
    return reference.tokenize(text.encode("utf-8"), add_bos=False, special=True)


@pytest.mark.parametrize("text", SAMPLES)
def test_same_ids_as_llama_cpp(card: ModelCard, reference, text: str) -> None:
    ours = card.tokenizer.encode(text, add_special_tokens=False).ids
    assert ours == _llama_ids(reference, text)


def test_chat_template_output_matches(card: ModelCard, reference) -> None:
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is 2 + 2?\nShow   your work. 🙂"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "和 3 + 3 呢？"},
    ]
    prompt = card.chat_template.render(messages, add_generation_prompt=True)
    ours = card.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert ours == _llama_ids(reference, prompt)
    # The special tokens are single ids, not spelled out.
    im_start = card.tokenizer.token_to_id("<|im_start|>")
    assert ours.count(im_start) == 5


def test_decode_round_trips(card: ModelCard) -> None:
    for text in SAMPLES:
        ids = card.tokenizer.encode(text, add_special_tokens=False).ids
        assert card.tokenizer.decode(ids, skip_special_tokens=False) == text
