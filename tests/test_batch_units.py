"""The batch input's pure parts in process: line parsing, output shapes, resume, progress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from dynamo_run.inputs.batch.lines import (
    FORM_CHAT,
    FORM_OPENAI,
    FORM_TEXT,
    detect_form,
    parse_line,
)
from dynamo_run.inputs.batch.progress import BatchProgress, Tally
from dynamo_run.inputs.batch.records import Outcome, outcome, record_matches
from dynamo_run.inputs.batch.resume import BatchState, read_resume, scan_input
from dynamo_run.pipeline.preprocess import Preprocessor
from dynamo_run.protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from dynamo_run.spec import SpecError


@pytest.fixture(scope="module")
def pre(default_card) -> Preprocessor:
    return Preprocessor(default_card, {"max_tokens": 7, "temperature": 0.3})


def parse(pre: Preprocessor, obj: object, form: str = FORM_TEXT):
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_line(raw, 3, form, pre)


def test_detect_form() -> None:
    assert detect_form({"text": "a"}) == FORM_TEXT
    assert detect_form({"messages": []}) == FORM_CHAT
    assert detect_form({"custom_id": "x"}) == FORM_OPENAI
    assert detect_form({"body": {}, "text": "a"}) == FORM_OPENAI
    assert detect_form({"prompt": "a"}) is None
    assert detect_form(["text"]) is None


def test_text_line_is_a_one_message_chat_with_template_defaults(pre: Preprocessor) -> None:
    item = parse(pre, {"text": "Hi", "temperature": 0.9, "stop": ["x"]})
    assert item.error is None and item.prompt_text == "Hi" and item.line == 3
    req = item.request
    assert isinstance(req, ChatCompletionRequest)
    assert [(m.role, m.text()) for m in req.messages] == [("user", "Hi")]
    assert (req.temperature, req.max_tokens, req.stop) == (0.9, 7, ["x"])  # line beats template


def test_chat_line_prompt_text_is_the_last_user_message(pre: Preprocessor) -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "sec"}, {"type": "text", "text": "ond"}],
        },
    ]
    item = parse(pre, {"messages": messages})
    assert item.form == FORM_CHAT and item.prompt_text == "second"


def test_unknown_fields_are_named_with_a_hint(pre: Preprocessor) -> None:
    item = parse(pre, {"text": "Hi", "max_token": 3, "zzz": 1})
    assert item.request is None and item.error is not None
    assert item.error.code == "invalid_request"
    assert item.error.message.startswith(
        "unknown fields 'max_token' (did you mean 'max_tokens'?), 'zzz'; a text line takes"
    )
    assert item.prompt_text == "Hi"  # kept so the error line still shows the prompt


@pytest.mark.parametrize(
    ("raw", "code", "start"),
    [
        (b"{", "invalid_json", "invalid JSON: Expecting property name"),
        (b"\xff\xfe", "invalid_json", "the line is not valid UTF-8"),
        (b"42", "invalid_request", "expected a JSON object"),
    ],
)
def test_undecodable_lines(pre: Preprocessor, raw: bytes, code: str, start: str) -> None:
    item = parse_line(raw, 9, FORM_OPENAI, pre)
    assert item.error is not None and (item.error.code, item.form) == (code, FORM_OPENAI)
    assert item.error.message.startswith(start)


def test_openai_lines_validate_against_the_protocol_types(pre: Preprocessor) -> None:
    def line(url: str, body: object, **extra: object) -> dict[str, object]:
        return {"custom_id": "c", "method": "POST", "url": url, "body": body, **extra}

    chat = parse(
        pre, line("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    )
    assert isinstance(chat.request, ChatCompletionRequest) and chat.request.max_tokens == 7
    cmpl = parse(pre, line("/v1/completions", {"prompt": [1, 2, 3]}))
    assert isinstance(cmpl.request, CompletionRequest) and cmpl.custom_id == "c"
    emb = parse(pre, line("/v1/embeddings", {"input": ["a", "b"], "encoding_format": "base64"}))
    assert isinstance(emb.request, EmbeddingRequest)

    bad = parse(pre, line("/v1/embeddings", {"input": "a", "encoding_format": "hex"}))
    assert bad.error is not None and bad.error.message.startswith("body.encoding_format: ")
    role = parse(pre, line("/v1/chat/completions", {"messages": [{"role": "robot"}]}))
    assert role.error is not None and role.error.message.startswith("body.messages.0.role: ")
    assert parse(pre, line("/v1/completions", [])).error.message == (
        "body: required, a JSON object"
    )
    url = parse(pre, line("/v2/chat", {}))
    assert url.error.code == "invalid_url" and url.url is None


def test_outcome_reads_both_shapes() -> None:
    text_ok = {"line": 1, "error": None, "tokens_in": 5, "tokens_out": 7}
    assert outcome(text_ok) == Outcome(True, 5, 7)
    assert outcome({"line": 2, "error": "boom", "tokens_in": 0}) == Outcome(False, 0, 0)
    usage = {"prompt_tokens": 3, "completion_tokens": 4}
    oa_ok = {
        "id": "batch_req_1",
        "custom_id": "a",
        "response": {"status_code": 200, "request_id": "r", "body": {"usage": usage}},
        "error": None,
    }
    assert outcome(oa_ok) == Outcome(True, 3, 4)
    oa_err = {"id": "b", "custom_id": "a", "response": None, "error": {"code": "x", "message": "y"}}
    assert outcome(oa_err) == Outcome(False, 0, 0)
    assert record_matches(oa_ok, 99, "a") and not record_matches(oa_ok, 99, "b")
    assert record_matches(text_ok, 1, None) and not record_matches(text_ok, 2, None)


# --- resume ------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_scan_counts_non_blank_lines_and_hashes_bytes(tmp_path: Path) -> None:
    inp = write(tmp_path / "in.jsonl", '\ufeff{"custom_id": "a"}\n\n  \n{"text": "b"}')
    info = scan_input(inp)
    assert (info.requests, info.size, info.default_form) == (2, inp.stat().st_size, FORM_OPENAI)
    write(inp, inp.read_text(encoding="utf-8") + "\n")
    assert scan_input(inp).sha256 != info.sha256
    assert scan_input(write(tmp_path / "bad.jsonl", "nope\n")).default_form == FORM_TEXT


def test_read_resume_stops_at_a_torn_or_damaged_line(tmp_path: Path) -> None:
    inp = write(tmp_path / "in.jsonl", "".join(f'{{"text": "{i}"}}\n' for i in range(5)))
    good = [
        json.dumps({"line": i + 1, "error": None, "tokens_in": 2, "tokens_out": 3})
        for i in range(3)
    ]
    out = write(tmp_path / "out.jsonl", "\n".join(good) + '\n{"line": 4, "err')
    resume = read_resume(scan_input(inp), out)
    assert (resume.done, resume.ok, resume.tokens_in, resume.tokens_out) == (3, 3, 6, 9)
    assert resume.valid_bytes == len(("\n".join(good) + "\n").encode())
    assert resume.dropped_bytes == len('{"line": 4, "err')

    write(out, good[0] + "\n\x00\x00\x00\n" + good[2] + "\n")  # a damaged line: redo from it
    resume = read_resume(scan_input(inp), out)
    assert resume.done == 1 and resume.dropped_bytes > 0


def test_read_resume_refuses_lines_of_another_input(tmp_path: Path) -> None:
    inp = write(tmp_path / "in.jsonl", '{"text": "a"}\n\n{"text": "b"}\n')
    out = write(tmp_path / "out.jsonl", '{"line": 1, "error": null}\n{"line": 2, "error": null}\n')
    with pytest.raises(SpecError, match="output line 2 does not belong to input line 3"):
        read_resume(scan_input(inp), out)
    write(out, '{"line": 1}\n{"line": 3}\n{"line": 4}\n')
    with pytest.raises(SpecError, match="has more lines than"):
        read_resume(scan_input(inp), out)


def test_state_round_trip_and_differences(tmp_path: Path) -> None:
    inp = write(tmp_path / "in.jsonl", '{"text": "a"}\n')
    info = scan_input(inp)
    state = BatchState.for_run(info, "echo", None)
    path = tmp_path / "out.jsonl.state"
    state.save(path)
    loaded = BatchState.load(path)
    assert loaded == state and loaded.differences(state) == []
    other = BatchState.for_run(info, "llamacpp", "/m.gguf")
    assert loaded.differences(other) == [
        "it was written by out=echo",
        "it was written with model default",
    ]
    write(path, "not json")
    assert BatchState.load(path) is None
    write(path, json.dumps({"dynamo_run_batch": 99}))
    assert BatchState.load(path) is None


# --- progress ----------------------------------------------------------------------------------


class Captured(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_plain_progress_prints_each_tenth_at_most_once_a_second(tmp_path: Path) -> None:
    stream = Captured()
    progress = BatchProgress(100, Tally(ok=10, failed=0), tmp_path / "o", stream, interval=5.0)
    progress.begin()
    for _ in range(90):
        progress.update(Outcome(True, 1, 2))
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"batch: 90 of 100 lines to run -> {tmp_path / 'o'}"
    assert lines[-1].startswith("batch: 100/100 lines (100%)")
    assert len(lines) <= 4  # the first step, then only the last: far from one line per update
    progress.summary()
    tail = stream.getvalue().splitlines()[-2:]
    assert (
        tail[0]
        == f"batch: 100 of 100 lines: 100 ok, 0 failed (10 done in an earlier run) -> {tmp_path / 'o'}"
    )
    assert "this run: 90 lines in " in tail[1] and "tokens in 90, out 180" in tail[1]
