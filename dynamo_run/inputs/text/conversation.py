"""The chat shell's state: conversation history, system prompt and sampling settings, with
save/load as JSON. Pure data, no terminal I/O, so it is unit-testable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dynamo_run.protocol.openai import ChatCompletionRequest

# Settings that `/set NAME VALUE` accepts, with the type each parses to.
SETTINGS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "seed": int,
    "max_tokens": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "repetition_penalty": float,
    "stop": str,
}


class SettingError(ValueError):
    """A bad `/set`, `/load` or `/save`; the message is shown to the user as is."""


@dataclass
class Conversation:
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def set(self, name: str, raw: str) -> Any:
        """Parse and validate one setting (through the same model the HTTP API uses)."""
        kind = SETTINGS.get(name)
        if kind is None:
            import difflib

            close = difflib.get_close_matches(name, list(SETTINGS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SettingError(f"unknown setting '{name}'{hint}; one of: {', '.join(SETTINGS)}")
        try:
            value = kind(raw)
        except ValueError:
            raise SettingError(f"{name}: '{raw}' is not a valid {kind.__name__}") from None
        candidate = {**self.settings, name: value}
        try:
            self.request(candidate)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise SettingError(f"{name}: {first['msg']}") from None
        self.settings = candidate
        return value

    def unset(self, name: str) -> None:
        self.settings.pop(name, None)

    def request(self, settings: dict[str, Any] | None = None) -> ChatCompletionRequest:
        """The chat request for the conversation so far (ends with the latest user turn)."""
        messages: list[dict[str, str]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.extend(self.messages or [{"role": "user", "content": ""}])
        return ChatCompletionRequest(messages=messages, **(settings or self.settings))

    def drop_oldest_turn(self) -> bool:
        """Forget the oldest user/assistant exchange to make room; False if none is left
        other than the latest question."""
        if len(self.messages) <= 1:
            return False
        del self.messages[:2]
        return True

    def clear(self) -> None:
        self.messages.clear()

    def save(self, path: Path) -> None:
        data = {"system": self.system, "messages": self.messages, "settings": self.settings}
        try:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")
        except OSError as exc:
            raise SettingError(f"cannot save to {path}: {exc.strerror or exc}") from None

    @classmethod
    def load(cls, path: Path) -> Conversation:
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise SettingError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingError(f"{path}: cannot read: {exc}") from None
        except json.JSONDecodeError as exc:
            raise SettingError(f"{path}: not JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("messages", []), list):
            raise SettingError(f"{path}: not a saved conversation")
        conv = cls(
            system=data.get("system"),
            messages=[
                {"role": str(m["role"]), "content": str(m["content"])}
                for m in data.get("messages", [])
                if isinstance(m, dict) and "role" in m and "content" in m
            ],
            settings=dict(data.get("settings") or {}),
        )
        try:
            conv.request()
        except ValidationError as exc:
            raise SettingError(f"{path}: invalid conversation: {exc.errors()[0]['msg']}") from None
        return conv
