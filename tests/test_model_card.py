"""Model resolution and model cards: the default GGUF, a Hugging Face folder built here with a
real `tokenizers` tokenizer and chat template, and every way a path can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dynamo_run.model.card import ModelCardError, load_model_card
from dynamo_run.model.resolve import ModelNotFoundError, resolve_model
from dynamo_run.model.template import ChatTemplate, TemplateError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_hf_folder(folder: Path, template: str | None = CHATML) -> Path:
    """A small but real HF model folder: a byte-level BPE trained here, configs, template."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["Hello world, how are you today?", "The quick brown fox jumps over the dog."] * 50
    tokenizer.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    tok_config: dict = {"bos_token": None, "eos_token": "<|im_end|>", "model_max_length": 2048}
    if template is not None:
        tok_config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "max_position_embeddings": 1024,
                "eos_token_id": 0,
            }
        )
    )
    return folder


def test_default_model_card(default_card):
    card = default_card
    assert card.kind == "gguf"
    assert card.name == "SmolLM2-135M-Instruct"
    assert card.path.name.endswith(".gguf")
    assert card.context_length == 8192
    assert card.architecture == "llama"
    assert card.eos_token_ids == [2]  # <|im_end|>
    assert card.tokenizer.get_vocab_size() == 49152
    prompt = card.chat_template.render([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = card.tokenizer.encode(prompt, add_special_tokens=False).ids
    assert ids[0] == 1  # <|im_start|> is one special token, not characters


def test_context_length_flag_caps_the_card():
    card = load_model_card(None, served_name="smol", context_length=512)
    assert card.context_length == 512
    assert card.name == "smol"


def test_hf_folder_card(tmp_path):
    folder = make_hf_folder(tmp_path / "tiny-model")
    card = load_model_card(str(folder))
    assert card.kind == "hf"
    assert card.name == "tiny-model"
    assert card.context_length == 1024
    assert card.architecture == "LlamaForCausalLM"
    im_end = card.tokenizer.token_to_id("<|im_end|>")
    assert set(card.eos_token_ids) == {0, im_end}
    text = "Hello world"
    ids = card.tokenizer.encode(text, add_special_tokens=False).ids
    assert card.tokenizer.decode(ids) == text
    prompt = card.chat_template.render([{"role": "user", "content": text}])
    assert prompt == "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"


def test_hf_folder_template_in_jinja_file(tmp_path):
    folder = make_hf_folder(tmp_path / "m", template=None)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    card = load_model_card(str(folder))
    assert card.chat_template.render([{"role": "user", "content": "hi"}]) == "HI"


def test_resolve_kinds(tmp_path, default_gguf):
    assert resolve_model(str(default_gguf)).kind == "gguf"
    folder = make_hf_folder(tmp_path / "m")
    assert resolve_model(str(folder)).kind == "hf"
    resolved = resolve_model(None)
    assert resolved.is_default and resolved.path == default_gguf


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.gguf", "no such file or folder"),
        (lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "not a model"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no config.json"),
        (lambda d: Path("relative/missing-model.gguf"), "no such file or folder"),
        (lambda d: Path("NoOrg/no-such-repo-xyz"), "no such file or folder"),
    ],
)
def test_bad_model_paths_name_the_path(tmp_path, setup, message):
    target = setup(tmp_path)
    with pytest.raises(ModelNotFoundError) as err:
        load_model_card(str(target))
    assert message in str(err.value)
    assert str(target) in str(err.value)


def test_damaged_files_are_clear_errors(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00")  # magic, version, then nothing
    with pytest.raises(ModelCardError, match=r"broken\.gguf: truncated"):
        load_model_card(str(broken))
    folder = make_hf_folder(tmp_path / "m")
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ModelCardError, match=r"config\.json: cannot read JSON"):
        load_model_card(str(folder))
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("not a tokenizer")
    with pytest.raises(ModelCardError, match="not a valid tokenizer"):
        load_model_card(str(folder))


def test_repo_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="not in the local cache"):
        resolve_model("SomeOrg/some-model-that-is-not-cached")


def test_template_sandbox_and_helpers():
    template = ChatTemplate(
        "{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}"
        "{{ messages | tojson }}"
    )
    assert (
        template.render([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]'
    )
    with pytest.raises(TemplateError, match="only one message"):
        template.render([{"role": "user", "content": "a"}] * 2)
    unsafe = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError):
        unsafe.render([])
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for %}")
