"""Build a Hugging Face ``tokenizers`` tokenizer from the vocabulary stored in a GGUF file.

The frontend owns tokenisation (see ARCHITECTURE.md), so a GGUF model must be tokenisable
without llama.cpp. Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: GPT-2,
Llama 3, Qwen 2, SmolLM, ...) carry their merges and map exactly onto ``tokenizers``' BPE.
The pre-tokeniser split rules are chosen from ``tokenizer.ggml.pre`` the way llama.cpp does.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp token types (llama_token_type): control and user-defined tokens are special.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_GPT2_SPLIT = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
    r"""|\s+(?!\S)|\s+"""
)
_LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class GGUFTokenizerError(ValueError):
    """The GGUF vocabulary cannot be turned into a tokenizer."""


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split rules llama.cpp applies for the GGUF's ``tokenizer.ggml.pre`` value."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def split(pattern: str) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)

    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # Digits one by one, then the GPT-2 rules.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), split(_GPT2_SPLIT), byte_level]
        )
    if pre in ("llama3", "llama-bpe", "llama-v3", "dbrx", "smaug-bpe", "falcon3"):
        return pre_tokenizers.Sequence([split(_LLAMA3_SPLIT), byte_level])
    if pre in ("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan"):
        return pre_tokenizers.Sequence([split(_QWEN2_SPLIT), byte_level])
    # "gpt-2", "default" and anything unknown: GPT-2's own rules.
    return pre_tokenizers.Sequence([split(_GPT2_SPLIT), byte_level])


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """Return a ``tokenizers.Tokenizer`` equivalent to the GGUF's vocabulary."""
    model = meta.get("tokenizer.ggml.model")
    tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFTokenizerError("the GGUF file has no tokenizer vocabulary")
    if model != "gpt2":
        raise GGUFTokenizerError(
            f"GGUF tokenizer model '{model}' is not supported yet (byte-level BPE 'gpt2' is); "
            "pass the model's Hugging Face folder instead"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    tokenizer.decoder = decoders.ByteLevel()

    types: list[int] = meta.get("tokenizer.ggml.token_type", [])
    specials = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(types)
        if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    tokenizer.add_special_tokens(specials)
    return tokenizer
