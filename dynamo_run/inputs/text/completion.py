"""Tab completion for the chat shell: slash commands, then setting names after /set."""

from __future__ import annotations

from collections.abc import Iterable

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document


class CommandCompleter(Completer):
    def __init__(self, commands: list[str], settings: list[str]) -> None:
        self.commands = commands
        self.settings = settings

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        if " " not in text:
            for cmd in self.commands:
                if cmd.startswith(text):
                    yield Completion(cmd, start_position=-len(text))
            return
        command, _, rest = text.partition(" ")
        if command in ("/set", "/unset") and " " not in rest:
            for name in self.settings:
                if name.startswith(rest):
                    yield Completion(name, start_position=-len(rest))
