"""A KServe ModelInferRequest -> the pipeline's completion (or chat) request.

Inputs are named as Triton's vLLM and TensorRT-LLM backends name them, so that clients
written for those work unchanged. A value can come from three places; the later wins:

1. request ``parameters`` (``max_tokens``, ``temperature``, ..., ``apply_chat_template``),
2. the vLLM backend's ``sampling_parameters`` tensor (one JSON object; numbers may be strings),
3. a tensor of its own (``max_tokens``, ``temperature``, ``top_k``, ... as TRT-LLM sends them).

``text_input`` is a raw prompt (a completion), as with Triton's backends; the request parameter
``apply_chat_template=true`` makes it the user message of a chat instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from dynamo_run.errors import RequestError
from dynamo_run.inputs.grpc.proto import grpc_service_pb2 as pb
from dynamo_run.inputs.grpc.tensors import Tensor, TensorError, decode_inputs, parameter_value
from dynamo_run.pipeline.client import ModelClient
from dynamo_run.pipeline.preprocess import PreparedRequest
from dynamo_run.protocol import json_input
from dynamo_run.protocol.openai import ChatCompletionRequest, CompletionRequest

TEXT_INPUT = "text_input"
# Output tensors, all returned unless the request names some.
TEXT_OUTPUT = "text_output"
FINISH_REASON = "finish_reason"
NUM_INPUT_TOKENS = "num_input_tokens"
NUM_OUTPUT_TOKENS = "num_output_tokens"
OUTPUTS = (TEXT_OUTPUT, FINISH_REASON, NUM_INPUT_TOKENS, NUM_OUTPUT_TOKENS)

# Sampling names (tensor, parameter or sampling_parameters key) -> CompletionRequest field.
_FIELDS = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "random_seed": "seed",  # TRT-LLM
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "stop": "stop",
    "stop_words": "stop",  # TRT-LLM
    "ignore_eos": "ignore_eos",
    "min_tokens": "min_tokens",
    "min_length": "min_tokens",  # TRT-LLM
}
# Flags of this input (tensor or parameter).
_STREAM = ("stream", "streaming")  # vLLM/TRT-LLM name it stream, Dynamo streaming
_EXCLUDE_INPUT = "exclude_input_in_output"
_CHAT = "apply_chat_template"
# Tensors the backends define that change nothing here: their defaults are what this server
# does anyway (one beam, the model's own end and pad tokens, all outputs returned).
_IGNORED_TENSORS = frozenset(
    {
        "end_id",
        "pad_id",
        "length_penalty",
        "beam_width",
        "return_log_probs",
        "return_context_logits",
        "return_generation_logits",
        "return_finish_reason",
        "return_cumulative_logprob",
        "return_logprobs",
        "return_num_input_tokens",
        "return_num_output_tokens",
        "bad_words",
    }
)
# Parameters tritonclient or Triton add to requests, never sampling settings.
_IGNORED_PARAMS = frozenset(
    {
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "triton_enable_empty_final_response",
    }
)


@dataclass
class InferInput:
    """One decoded inference request: the prompt, how to answer, and the sampling fields
    (with where each came from, for error messages)."""

    prompt: str
    stream: bool = False
    chat: bool = False
    exclude_input: bool | None = None  # None: the backends' default for the mode
    fields: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = OUTPUTS

    def prepend_prompt(self) -> bool:
        """Whether text_output starts with the prompt: Triton's backends do so unless
        exclude_input_in_output is set, except when streaming."""
        if self.exclude_input is None:
            return not self.stream
        return not self.exclude_input


def _one(tensor: Tensor) -> Any:
    """The single element of a [1] / [1, 1] tensor."""
    if len(tensor.values) != 1:
        raise TensorError(tensor.name, f"expected one element, got {len(tensor.values)}")
    value = tensor.values[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise TensorError("", f"{where}: expected a boolean, got {value!r}")


def _stop_words(tensor: Tensor) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in tensor.values]


class _Builder:
    def __init__(self) -> None:
        self.out = InferInput(prompt="")

    def setting(self, name: str, value: Any, where: str) -> None:
        """Apply one named value from ``where`` (a tensor, a parameter, a JSON key)."""
        if name in _STREAM:
            self.out.stream = _bool(value, where)
        elif name == _EXCLUDE_INPUT:
            self.out.exclude_input = _bool(value, where)
        elif name == _CHAT:
            self.out.chat = _bool(value, where)
        elif name in _FIELDS:
            target = _FIELDS[name]
            self.out.fields[target] = value
            self.out.sources[target] = where
        elif name == "n" and value not in (1, "1"):
            raise TensorError("", f"{where}: only n=1 is supported")


def parse_infer_request(request: pb.ModelInferRequest) -> InferInput:
    """Decode and check ``request``; TensorError (INVALID_ARGUMENT) names what is wrong."""
    tensors = decode_inputs(request)
    build = _Builder()
    for key, param in request.parameters.items():
        if key not in _IGNORED_PARAMS:
            build.setting(key, parameter_value(param), f"parameter '{key}'")
    sampling = tensors.get("sampling_parameters")
    if sampling is not None:
        try:
            params = json_input.loads(_one(sampling) or "{}")
        except json_input.JsonTooDeep as exc:
            raise TensorError(sampling.name, str(exc)) from None
        except ValueError as exc:
            raise TensorError(sampling.name, f"not a JSON object: {exc}") from None
        if not isinstance(params, dict):
            raise TensorError(sampling.name, "not a JSON object")
        for key, value in params.items():
            build.setting(key, value, f"sampling_parameters '{key}'")
    text = tensors.get(TEXT_INPUT)
    if text is None:
        raise TensorError(TEXT_INPUT, "missing: send the prompt as a BYTES tensor of shape [1]")
    if text.datatype != "BYTES":
        raise TensorError(TEXT_INPUT, f"expected datatype BYTES, got {text.datatype}")
    build.out.prompt = _one(text)
    for name, tensor in tensors.items():
        if name in (TEXT_INPUT, "sampling_parameters") or name in _IGNORED_TENSORS:
            if name == "bad_words" and any(tensor.values):
                raise TensorError(name, "bad words are not supported")
            if name == "beam_width" and tensor.values and tensor.values[0] != 1:
                raise TensorError(name, "only beam_width 1 is supported")
            continue
        if name in ("stop", "stop_words"):
            build.setting(name, _stop_words(tensor), f"input '{name}'")
        elif name in _FIELDS or name in _STREAM or name in (_EXCLUDE_INPUT, _CHAT):
            build.setting(name, _one(tensor), f"input '{name}'")
        else:
            raise TensorError(name, f"unexpected input; this model takes {TEXT_INPUT} and "
                              "sampling inputs (see the model metadata)")  # fmt: skip
    if request.outputs:
        names = tuple(o.name for o in request.outputs)
        for name in names:
            if name not in OUTPUTS:
                raise TensorError("", f"unknown output '{name}'; outputs are {', '.join(OUTPUTS)}")
        build.out.outputs = names
    return build.out


def prepare(client: ModelClient, parsed: InferInput) -> PreparedRequest:
    """The pipeline's request for ``parsed`` (--request-template defaults, generation
    defaults, templating); TensorError names the input a bad value came from."""
    pre = client.preprocessor
    body: dict[str, Any] = dict(parsed.fields)
    if parsed.chat:
        body["messages"] = [{"role": "user", "content": parsed.prompt}]
        model: type[CompletionRequest] | type[ChatCompletionRequest] = ChatCompletionRequest
    else:
        body["prompt"] = parsed.prompt
        model = CompletionRequest
    body = pre.apply_template(body)
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc, parsed) from None
    try:
        if isinstance(req, ChatCompletionRequest):
            return pre.chat(req)
        return pre.completion(req)[0]
    except RequestError as exc:
        name = TEXT_INPUT if exc.param in (None, "prompt", "messages") else exc.param
        raise TensorError(name, str(exc)) from None


def _validation_error(exc: ValidationError, parsed: InferInput) -> TensorError:
    err = exc.errors()[0]
    loc = err.get("loc", ())
    key = str(loc[0]) if loc else ""
    where = parsed.sources.get(key, TEXT_INPUT if key in ("prompt", "messages") else key)
    if where.startswith("input '"):
        return TensorError(where[7:-1], str(err.get("msg", "invalid")))
    return TensorError("", f"{where}: {err.get('msg', 'invalid')}")
