"""One answer's text -> reasoning, content and tool calls, as it streams.

The postprocess stage of every input (HTTP, batch, shell) runs this per choice: stop strings
have already been cut; here the reasoning parser (``<think>``) runs first and the tool-call
parser on what is left, so a call written inside the reasoning is never taken for a call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynamo_run.parsers import (
    ReasoningParser,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    reasoning_parser,
    tool_call_parser,
)


@dataclass
class OutputPlan:
    """How to read a chat request's answers: which parsers run, for which tools."""

    tool_parser: str | None = None  # a TOOL_CALL_PARSERS name; None: tools are not parsed
    tools: list[dict] | None = None  # the request's tools (limits the callable names)
    reasoning_parser: str | None = None  # a REASONING_PARSERS name
    forced: bool = False  # tool_choice required / named: the answer is a call (JSON grammar)

    @property
    def active(self) -> bool:
        return self.tool_parser is not None or self.reasoning_parser is not None


@dataclass
class Parsed:
    """What a piece of an answer turned out to be."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class AnswerParser:
    """The parsers of one answer (one choice), fed its text as it is decoded."""

    def __init__(self, plan: OutputPlan) -> None:
        self._reasoning: ReasoningParser | None = (
            reasoning_parser(plan.reasoning_parser) if plan.reasoning_parser else None
        )
        self._tools: ToolCallParser | None = (
            tool_call_parser(plan.tool_parser, plan.tools) if plan.tool_parser else None
        )

    @property
    def called(self) -> bool:
        """Whether any tool call has been parsed (finish_reason becomes tool_calls)."""
        return self._tools is not None and bool(self._tools.calls)

    def feed(self, text: str) -> Parsed:
        if not text:
            return Parsed()
        reasoning, content = ("", text) if self._reasoning is None else self._reasoning.feed(text)
        if self._tools is None or not content:
            return Parsed(reasoning, content)
        content, calls = self._tools.feed(content)
        return Parsed(reasoning, content, calls)

    def finish(self) -> Parsed:
        """The end of the answer: everything the parsers still held back."""
        reasoning, content = ("", "") if self._reasoning is None else self._reasoning.finish()
        if self._tools is None:
            return Parsed(reasoning, content)
        head, calls = self._tools.feed(content) if content else ("", [])
        tail, more = self._tools.finish()
        return Parsed(reasoning, head + tail, calls + more)


class ToolCallJoin:
    """Joins streamed tool-call deltas back into whole calls (for whole responses)."""

    def __init__(self) -> None:
        self._calls: dict[int, ToolCall] = {}

    def add(self, deltas: list[ToolCallDelta]) -> None:
        for d in deltas:
            call = self._calls.setdefault(d.index, ToolCall(id="", name="", arguments=""))
            if d.id:
                call.id = d.id
            if d.name:
                call.name += d.name
            call.arguments += d.arguments

    def calls(self) -> list[ToolCall]:
        return [self._calls[i] for i in sorted(self._calls)]
