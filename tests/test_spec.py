"""Spec and flag parsing, and every error path of the command line (exit code 2, one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from dynamo_run.settings import resolve
from dynamo_run.spec import Flags, SpecError, parse_run_spec


def parse(*words: str, **flags):
    return parse_run_spec(list(words), Flags(**flags))


def test_defaults_are_text_and_auto():
    spec = parse()
    assert spec.input.kind == "text"
    assert spec.output.kind == "auto"
    assert spec.model is None
    assert spec.flags.http_host == "127.0.0.1"
    assert spec.flags.http_port == 8000


def test_specs_in_any_order_with_model():
    spec = parse("model.gguf", "out=llamacpp", "in=http")
    assert (spec.input.kind, spec.output.kind, spec.model) == ("http", "llamacpp", "model.gguf")


@pytest.mark.parametrize(
    "value", ["echo", "mocker", "llamacpp", "vllm", "sglang", "trtllm", "auto"]
)
def test_every_engine_output_parses(value):
    assert parse(f"out={value}").output.kind == value


def test_batch_and_endpoints():
    spec = parse("in=batch:data/prompts.jsonl", "out=dyn://ns.backend.generate")
    assert spec.input.batch_path == Path("data/prompts.jsonl")
    assert spec.output.kind == "dyn"
    assert spec.output.endpoint.url == "dyn://ns.backend.generate"
    worker = parse("in=dyn://ns.backend.generate", "out=echo")
    assert worker.input.endpoint.component == "backend"
    assert parse("out=dyn").output.endpoint is None


@pytest.mark.parametrize(
    ("words", "flags", "message"),
    [
        (["out=llamcpp"], {}, "did you mean 'llamacpp'"),
        (["in=txt"], {}, "did you mean 'text'"),
        (["in=batch"], {}, "in=batch needs a file"),
        (["in=batch:"], {}, "in=batch needs a file"),
        (["in=dyn://onlytwo.parts"], {}, "dyn://namespace.component.endpoint"),
        (["out=dyn://a.b.c.d"], {}, "not an endpoint"),
        (["in=text", "in=http"], {}, "given twice"),
        (["out=echo", "out=echo"], {}, "given twice"),
        (["a.gguf", "b.gguf"], {}, "a second MODEL"),
        (["outt=echo"], {}, "did you mean 'out'"),
        (["a.gguf"], {"model_path": "b.gguf"}, "--model-path"),
        ([], {"http_port": 70000}, "--http-port 70000"),
        ([], {"context_length": 0}, "--context-length 0"),
        ([], {"kv_cache_block_size": -1}, "--kv-cache-block-size"),
        ([], {"tensor_parallel_size": 0}, "--tensor-parallel-size 0"),
        ([], {"migration_limit": -1}, "--migration-limit"),
        ([], {"router_mode": "round_robin"}, "did you mean 'round-robin'"),
        ([], {"tls_cert_path": Path("cert.pem")}, "must be given together"),
        ([], {"batch_concurrency": 0}, "--batch-concurrency"),
        ([], {"generation_config": "nome"}, "did you mean 'none'"),
        ([], {"max_inflight_per_worker": -1}, "--max-inflight-per-worker -1"),
        ([], {"request_queue_limit": -2}, "--request-queue-limit -2"),
        ([], {"active_decode_blocks_threshold": 1.5}, "--active-decode-blocks-threshold 1.5"),
        (["in=dyn://a.b.c", "out=dyn"], {}, "out=dyn cannot"),
    ],
)
def test_errors_name_the_bad_part(words, flags, message):
    with pytest.raises(SpecError) as err:
        parse(*words, **flags)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_json_flag_files(tmp_path):
    good = tmp_path / "args.json"
    good.write_text(json.dumps({"n_threads": 2}))
    assert parse(extra_engine_args=good).extra_engine_args == {"n_threads": 2}
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"temperature": 0.1, "max_tokens": 5}))
    assert parse(request_template=template).request_template["max_tokens"] == 5

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="invalid JSON at line 1"):
        parse(extra_engine_args=bad)
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    with pytest.raises(SpecError, match="expected a JSON object"):
        parse(request_template=array)
    with pytest.raises(SpecError, match="no such file"):
        parse(extra_engine_args=tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("dyn_log", "verbosity"),
    [("error", -1), ("warn", 0), ("info", 1), ("debug", 2), ("debug,dynamo_runtime=trace", 2)],
)
def test_dyn_log_sets_verbosity(dyn_log, verbosity):
    """DYN_LOG=debug is -vv (debug), DYN_LOG=info is -v; read in one place (settings)."""
    assert resolve({}, {"DYN_LOG": dyn_log}).verbosity == verbosity


# --- the real command line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["out=llamcpp"], "did you mean 'llamacpp'"),
        (["--http-prot", "80"], "No such option: --http-prot"),
        (["--context-length", "many"], "--context-length"),
        (["--router-mode", "kvv"], "did you mean 'kv'"),
        (["--generation-config", "vllm"], "--generation-config vllm"),
        (["in=http", "--http-port", "0"], "--http-port 0"),
    ],
)
def test_cli_usage_errors_exit_2_with_one_line(args, needle):
    result = run_cli(*args, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_missing_model_is_one_clear_line(tmp_path):
    result = run_cli("out=echo", str(tmp_path / "nope.gguf"), "-p", "hi", timeout=60)
    assert result.returncode == 1
    assert "nope.gguf: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_engine_that_cannot_run_here_is_one_line():
    """TensorRT-LLM needs an NVIDIA GPU (and is not installed in the test set-up): out=trtllm
    fails before loading the model, with one line saying what to install or what is missing."""
    result = run_cli("out=trtllm", "-p", "hi", timeout=60)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dynamo-run: error: out=trtllm: ")
    assert "dynamo-run[trtllm]" in lines[0] or "GPU" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_help_lists_inputs_outputs_engines_examples():
    result = run_cli("--help", timeout=60)
    assert result.returncode == 0
    out = result.stdout
    for needle in ("in=text", "in=batch", "out=auto", "trtllm", "Installed engines", "echo"):
        assert needle in out
    assert "Examples" in out


def test_cli_version():
    result = run_cli("--version", timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("dynamo-run ")
    engines = result.stdout.splitlines()[1]
    assert engines.startswith("engines: ") and "echo" in engines and "mocker" in engines
