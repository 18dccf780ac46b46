"""The single-file binary (packaging/build.sh): built once for this module, then driven as a user
would: version and help, a piped one-shot, the default model bundled inside it, an OpenAI server
on a GGUF path, a usage error, the bundled nats-server with a worker and a frontend over embedded
NATS, and its self-unpacking (fresh cache, a copy in another folder, two first runs at once).

The build takes a few minutes: the module is skipped when PyInstaller is not installed
(``bash scripts/setup.sh packaging``). ``DYN_BINARY=PATH`` tests an existing build instead of
building one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from http_helpers import MODEL_NAME, free_port

REPO = Path(__file__).resolve().parent.parent

# The build runs inside the first test that asks for the binary.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@dataclass
class Binary:
    path: Path
    cache: Path  # DYN_BINARY_CACHE for every run of this module

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "DYN_BINARY_CACHE": str(self.cache), "DYN_TOKEN_ECHO_DELAY_MS": "0"}
        env.pop("DYN_API_KEY", None)
        env.update(extra)
        return env

    def run(self, *args: str, input: str | None = None, timeout: float = 120, **env: str):
        return subprocess.run(
            [str(self.path), *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(**env),
        )

    def bundle(self) -> Path:
        """The folder the binary unpacked itself into (one per build)."""
        (folder,) = [p for p in self.cache.iterdir() if not p.name.startswith(".")]
        return folder


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Binary]:
    cache = tmp_path_factory.mktemp("cache")
    given = os.environ.get("DYN_BINARY")
    if given:
        yield Binary(Path(given).resolve(), cache)
        shutil.rmtree(cache, ignore_errors=True)
        return
    if importlib.util.find_spec("PyInstaller") is None:
        pytest.skip("PyInstaller is not installed (bash scripts/setup.sh packaging)")
    dist = tmp_path_factory.mktemp("dist")
    work = tmp_path_factory.mktemp("build")
    out = dist / "dynamo-run"
    start = time.monotonic()
    build = subprocess.run(
        ["bash", str(REPO / "packaging" / "build.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "DYN_BUILD_DIR": str(work)},
    )
    shutil.rmtree(work, ignore_errors=True)
    assert build.returncode == 0, f"build failed:\n{build.stdout[-3000:]}\n{build.stderr[-5000:]}"
    print(f"built {out} ({out.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - start:.0f} s")
    yield Binary(out, cache)
    # Hundreds of MB each: pytest keeps its last temporary folders around.
    shutil.rmtree(dist, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)


def test_version_from_one_file_that_unpacks_once(binary: Binary) -> None:
    assert binary.path.is_file() and os.access(binary.path, os.X_OK)
    first = binary.run("--version")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("dynamo-run ")
    assert first.stderr == ""  # no unpacking note when stderr is not a terminal
    folder = binary.bundle()
    assert folder.name.startswith(first.stdout.split()[1] + "-")
    assert (folder / "dynamo-run").is_file()
    again = binary.run("--version")
    assert again.stdout == first.stdout
    assert [p.name for p in binary.cache.iterdir()] == [folder.name]  # nothing left over


def test_help_lists_the_bundled_engines(binary: Binary) -> None:
    result = binary.run("--help")
    assert result.returncode == 0, result.stderr
    engines = next(line for line in result.stdout.splitlines() if "Installed engines" in line)
    assert "echo" in engines and "llamacpp" in engines


def test_piped_one_shot_on_echo(binary: Binary) -> None:
    result = binary.run("out=echo", input="the lighthouse keeper counts waves\n")
    assert result.returncode == 0, result.stderr
    assert "the lighthouse keeper counts waves" in result.stdout


def test_bad_spec_is_one_line_and_exit_2(binary: Binary) -> None:
    result = binary.run("out=llamcpp", "--prompt", "hi")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "did you mean 'llamacpp'" in result.stderr


def test_default_model_is_inside_the_binary(binary: Binary, tmp_path: Path) -> None:
    template = tmp_path / "template.json"
    template.write_text(json.dumps({"max_tokens": 8, "temperature": 0}))
    result = binary.run(
        "out=llamacpp", "--request-template", str(template), "-p", "Name the capital of France."
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_http_llamacpp_on_a_gguf_path_answers_openai(
    binary: Binary, default_gguf: Path, tmp_path: Path
) -> None:
    from openai import OpenAI

    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    argv = [
        str(binary.path),
        "in=http",
        "out=llamacpp",
        str(default_gguf),
        "--http-port",
        str(port),
    ]
    proc = subprocess.Popen(
        argv, env=binary.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", log)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        (model,) = [m.id for m in client.models.list().data]
        assert model.startswith(MODEL_NAME)  # named after the file
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Name the capital of France."}],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].message.content
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            stream=True,
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text
        proc.send_signal(signal.SIGTERM)  # the launcher exec'd: this is the server itself
        assert proc.wait(30) == 0, _tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# What vLLM's CPU build brings into the test venv, and none of it is dynamo-run's (matched
# against the bundle's top-level entries: packages, NAME-VERSION.dist-info, NAME.libs).
FOREIGN = ("cv2", "opencv", "transformers", "torch", "anthropic", "pycountry", "vllm")
# Unpacked size bound: 285 MB measured (94 MB of it the default model); OpenCV alone was 172.
MAX_UNPACKED_MB = 330


def test_bundle_holds_only_what_dynamo_run_needs(binary: Binary) -> None:
    assert binary.run("--version").returncode == 0
    internal = binary.bundle() / "_internal"
    stems = {entry.name: re.split(r"[-.]", entry.name)[0].lower() for entry in internal.iterdir()}
    foreign = sorted(name for name, stem in stems.items() if stem.startswith(FOREIGN))
    assert foreign == [], f"the bundle carries packages dynamo-run does not need: {foreign}"
    size = sum(
        p.stat().st_size for p in binary.bundle().rglob("*") if p.is_file() and not p.is_symlink()
    )
    assert size < MAX_UNPACKED_MB * 1e6, f"unpacked bundle is {size / 1e6:.0f} MB"


def test_excluded_modules_rule_keeps_the_closure_and_drops_the_rest() -> None:
    """The spec's rule (packaging/closure.py) on this venv, without building: every module
    dynamo-run imports is kept, every installed foreign one left out."""
    spec = importlib.util.spec_from_file_location("closure", REPO / "packaging" / "closure.py")
    assert spec is not None and spec.loader is not None
    closure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(closure)
    excluded = set(closure.excluded_modules())
    needed = {"nats", "fastapi", "uvicorn", "pydantic", "tokenizers", "llama_cpp", "grpc", "numpy"}
    assert not needed & excluded
    for name in ("cv2", "transformers", "torch", "anthropic", "pycountry", "vllm", "pytest"):
        if importlib.util.find_spec(name) is not None:  # installed here: must be left out
            assert name in excluded, name


def test_nats_server_and_supervisor_entry_are_bundled(binary: Binary) -> None:
    binary.run("--version")
    nats = binary.bundle() / "_internal" / "nats-server"
    version = subprocess.run([str(nats), "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and "nats-server" in version.stdout
    # dynamo_run.distributed.* is frozen in: the hidden supervisor entry imports and parses.
    supervisor = binary.run("__nats-supervisor", "--help")
    assert supervisor.returncode == 0, supervisor.stderr
    assert "usage:" in supervisor.stdout


def test_distributed_worker_and_frontend_from_the_binary(binary: Binary, tmp_path: Path) -> None:
    """Embedded NATS from the frozen build: the supervisor entry starts the bundled nats-server."""
    from openai import OpenAI

    nats_dir = tmp_path / "nats"
    env = binary.env(DYN_NATS_DIR=str(nats_dir), DYN_NATS_GRACE_S="0")
    port = free_port()
    logs = [(tmp_path / f"{name}.log").open("w+") for name in ("worker", "frontend")]
    argvs = [
        [str(binary.path), "in=dyn://binarytest.backend.generate", "out=echo"],
        [str(binary.path), "in=http", "out=dyn", "--http-port", str(port)],
    ]
    procs = [
        subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        for argv, log in zip(argvs, logs, strict=True)
    ]
    try:
        _wait_healthy(procs[1], f"http://127.0.0.1:{port}/health", logs[1])
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 60
        while not client.models.list().data:  # until the worker has registered
            assert time.monotonic() < deadline, _tail(logs[0]) + _tail(logs[1])
            assert procs[0].poll() is None, _tail(logs[0])
            time.sleep(0.2)
        (model,) = [m.id for m in client.models.list().data]
        reply = client.completions.create(model=model, prompt="hello from the binary", max_tokens=8)
        assert reply.choices[0].text == "hello from the binary"
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(30) for proc in procs] == [0, 0], _tail(logs[0]) + _tail(logs[1])
        # The supervisor stops the bundled nats-server once its last client is gone.
        deadline = time.monotonic() + 30
        while _processes_mentioning(str(nats_dir)):
            assert time.monotonic() < deadline, _processes_mentioning(str(nats_dir))
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def test_a_copy_elsewhere_unpacks_itself_once_under_two_first_runs(
    binary: Binary, tmp_path: Path
) -> None:
    copy = tmp_path / "elsewhere" / "dynamo-run"
    copy.parent.mkdir()
    shutil.copy2(binary.path, copy)
    cache = tmp_path / "fresh-cache"
    env = {**binary.env(), "DYN_BINARY_CACHE": str(cache)}
    try:
        runs = [
            subprocess.Popen([str(copy), "--version"], env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outputs = [proc.communicate(timeout=300)[0] for proc in runs]
        assert [proc.returncode for proc in runs] == [0, 0]
        assert outputs[0] == outputs[1] and outputs[0].startswith("dynamo-run ")
        (folder,) = cache.iterdir()  # one published folder, no half-unpacked leftovers
        assert sorted(p.name for p in folder.iterdir()) == ["_internal", "dynamo-run"]
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _wait_healthy(proc: subprocess.Popen, url: str, log, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not ready in {timeout} s:\n{_tail(log)}")


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]
