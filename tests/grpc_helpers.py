"""Start ``dynamo-run in=grpc`` (or ``in=http,grpc``) as a real process on free loopback ports
and drive it with the real Triton client (``tritonclient.grpc``)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as tc
from http_helpers import MODEL_NAME, PYTHON, ROOT, free_port, parse_metrics
from tritonclient.utils import InferenceServerException

__all__ = ["MODEL_NAME", "GrpcServer", "InferenceServerException", "start_grpc_server"]


class GrpcServer:
    """One ``python -m dynamo_run in=grpc`` process (``http=True``: ``in=http,grpc``)."""

    def __init__(
        self,
        out: str = "echo",
        args: list[str] | None = None,
        engine_args: dict[str, object] | None = None,
        http: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.http_port = free_port() if http else None
        self._tmp = tempfile.TemporaryDirectory(prefix="dyngrpc-")
        self.log_path = Path(self._tmp.name) / "server.log"
        argv = [PYTHON, "-m", "dynamo_run", "in=http,grpc" if http else "in=grpc", f"out={out}"]
        argv += ["--grpc-port", str(self.port)]
        if self.http_port is not None:
            argv += ["--http-port", str(self.http_port)]
        if engine_args is not None:
            path = Path(self._tmp.name) / "engine.json"
            path.write_text(json.dumps(engine_args))
            argv += ["--extra-engine-args", str(path)]
        argv += args or []
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        full_env.pop("DYN_API_KEY", None)
        full_env.update(env or {})
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text()

    def client(self, **kwargs: Any) -> tc.InferenceServerClient:
        return tc.InferenceServerClient(self.address, **kwargs)

    def wait_ready(self, timeout: float = 60.0, **client_kwargs: Any) -> None:
        """Poll ServerReady until true; fail with the log if the process dies or times out."""
        deadline = time.monotonic() + timeout
        client = self.client(**client_kwargs)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.is_server_ready(client_timeout=2):
                        return
                except InferenceServerException:
                    pass
                time.sleep(0.05)
        finally:
            client.close()
        raise AssertionError(f"server not ready in {timeout}s:\n{self.log()}")

    def metrics(self) -> dict[str, float]:
        import httpx

        assert self.http_port is not None, "metrics need in=http,grpc"
        return parse_metrics(httpx.get(f"http://127.0.0.1:{self.http_port}/metrics").text)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self._tmp.cleanup()


def start_grpc_server(**kwargs: Any) -> Iterator[GrpcServer]:
    server = GrpcServer(**kwargs)
    try:
        server.wait_ready()
        yield server
        code = server.stop()
        assert code == 0, f"server exited {code}:\n{server.log()}"
    finally:
        server.cleanup()


def text_input(text: str, name: str = "text_input") -> tc.InferInput:
    tensor = tc.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return tensor


def scalar(name: str, value: Any, datatype: str) -> tc.InferInput:
    dtypes = {"BOOL": np.bool_, "INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32}
    tensor = tc.InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(np.array([value], dtype=dtypes[datatype]))
    return tensor


def text_of(result: Any, name: str = "text_output") -> str:
    return b"".join(result.as_numpy(name).tolist()).decode()


class Stream:
    """A tritonclient stream whose responses (result, error) land in a queue."""

    def __init__(self, client: tc.InferenceServerClient, **kwargs: Any) -> None:
        self.client = client
        self.responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(
            callback=lambda result, error: self.responses.put((result, error)), **kwargs
        )

    def send(self, inputs: list[tc.InferInput], model: str = MODEL_NAME, **kwargs: Any) -> None:
        self.client.async_stream_infer(model, inputs, **kwargs)

    def next(self, timeout: float = 20.0) -> tuple[Any, Any]:
        return self.responses.get(timeout=timeout)

    def until_final(self, timeout: float = 30.0) -> list[Any]:
        """Responses up to the one flagged triton_final_response (errors raise)."""
        out = []
        while True:
            result, error = self.next(timeout)
            if error is not None:
                raise error
            out.append(result)
            if is_final(result):
                return out


def is_final(result: Any) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param
