"""Output parsers: tool calls and reasoning, pure functions of the generated text.

Both come as a streaming parser (one per answer, ``feed``/``finish``) and a one-shot
function built on it, so a streamed answer and a non-streamed one always agree.
"""

from .reasoning import (
    REASONING_PARSERS,
    ReasoningParser,
    detect_reasoning_parser,
    reasoning_parser,
    split_reasoning,
)
from .tool_calls import (
    TOOL_CALL_PARSERS,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    detect_tool_call_parser,
    parse_tool_calls,
    tool_call_parser,
)

__all__ = [
    "REASONING_PARSERS",
    "TOOL_CALL_PARSERS",
    "ReasoningParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "detect_reasoning_parser",
    "detect_tool_call_parser",
    "parse_tool_calls",
    "reasoning_parser",
    "split_reasoning",
    "tool_call_parser",
]
