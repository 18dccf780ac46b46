"""``in=text``: the interactive chat shell, and a single-shot mode for pipes and --prompt.

On a terminal: a prompt-toolkit prompt with history, completion and multi-line input, and
answers streamed through rich. Not on a terminal (or with --prompt): the answer alone is
printed to stdout and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from rich.console import Console

from dynamo_run.errors import RequestError
from dynamo_run.inputs.text.conversation import SETTINGS, Conversation, SettingError
from dynamo_run.pipeline.client import Delta, EngineFailure, ModelClient
from dynamo_run.pipeline.loop_guard import LoopGuard
from dynamo_run.pipeline.preprocess import PreparedRequest
from dynamo_run.spec import RunSpec

COMMANDS: dict[str, str] = {
    "/help": "show this help",
    "/system": "/system TEXT sets the system prompt (no TEXT: show it)",
    "/set": "/set NAME VALUE sets a sampling option; /set alone lists them; "
    "/set think on|off shows or hides the model's reasoning (--reasoning-parser)",
    "/unset": "/unset NAME returns an option to the model's default",
    "/show": "show the model, its card and the current settings",
    "/clear": "forget the conversation (keeps the system prompt)",
    "/save": "/save FILE writes the conversation as JSON",
    "/load": "/load FILE reads a conversation saved with /save",
    "/stats": "/stats on|off prints tokens, time to first token and tokens/s",
    "/bye": "exit (also Ctrl-D, or Ctrl-C on an empty prompt)",
}
MULTILINE_FENCE = '"""'
LOOP_NOTE = "(answer stopped: it was repeating itself; /set repetition_penalty 1.2 may help)"


async def guarded_stream(
    client: ModelClient, prepared: PreparedRequest, guard: LoopGuard
) -> AsyncIterator[Delta]:
    """``client.stream`` that ends (cancelling the generation) once the answer loops, so a
    looping answer never runs on until the context is full."""
    async with contextlib.aclosing(client.stream(prepared)) as deltas:
        async for delta in deltas:
            yield delta
            if guard.feed(delta.token_ids):
                return


def history_path() -> Path:
    """Where the prompt history lives: $DYN_HISTORY_FILE or the XDG state folder."""
    if os.environ.get("DYN_HISTORY_FILE"):
        return Path(os.environ["DYN_HISTORY_FILE"])
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "dynamo-run" / "history"


async def run_text(loading: asyncio.Task[ModelClient], spec: RunSpec) -> int:
    if spec.flags.prompt is not None or not sys.stdin.isatty():
        return await run_single_shot(loading, spec)
    return await ChatShell(loading, spec).run()


# --- single shot --------------------------------------------------------------------------


def _single_shot_question(spec: RunSpec) -> str:
    piped = "" if sys.stdin.isatty() else sys.stdin.read()
    if spec.flags.prompt is not None:
        return f"{spec.flags.prompt}\n\n{piped}".strip() if piped.strip() else spec.flags.prompt
    return piped.strip()


async def run_single_shot(loading: asyncio.Task[ModelClient], spec: RunSpec) -> int:
    """Answer one question to stdout; errors go to stderr with exit code 1."""
    question = await asyncio.to_thread(_single_shot_question, spec)
    if not question:
        print("dynamo-run: error: no question on standard input", file=sys.stderr)
        return 2
    client = await loading
    conv = Conversation(messages=[{"role": "user", "content": question}])
    try:
        prepared = client.prepare_chat(conv.request(client.preprocessor.apply_template({})))
        ended_with_newline = True
        guard = LoopGuard()
        async for delta in guarded_stream(client, prepared, guard):
            if delta.text:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                ended_with_newline = delta.text.endswith("\n")
        if not ended_with_newline:
            sys.stdout.write("\n")
        sys.stdout.flush()
        if guard.looping:
            print(f"dynamo-run: {LOOP_NOTE}", file=sys.stderr)
    except (RequestError, EngineFailure) as exc:
        print(f"dynamo-run: error: {exc}", file=sys.stderr)
        return 1
    return 0


# --- interactive shell --------------------------------------------------------------------


class ChatShell:
    """The interactive loop. Generation runs as a task that Ctrl-C cancels."""

    def __init__(self, loading: asyncio.Task[ModelClient], spec: RunSpec) -> None:
        self.loading = loading
        self.spec = spec
        self.console = Console(highlight=False, soft_wrap=True)
        self.conversation = Conversation(settings={})
        self.stats = False
        self.think = True  # show the reasoning a --reasoning-parser splits off, dimmed
        self.client: ModelClient | None = None

    async def run(self) -> int:
        with self.console.status("Loading model…", spinner="dots"):
            self.client = await self.loading
        defaults = self.client.preprocessor.apply_template({})
        self.conversation.settings = {k: v for k, v in defaults.items() if k in SETTINGS}
        self.console.print(
            f"[bold]{self.client.card.name}[/] ready. Type a message, [bold]/help[/] for "
            f"commands, {MULTILINE_FENCE} for multi-line input, Ctrl-D to exit."
        )
        session = self._make_session()
        while True:
            try:
                text = await self._read(session)
            except EOFError:
                return 0
            except KeyboardInterrupt:
                return 0
            if text is None:
                continue
            text = text.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self._command(text):
                    return 0
                continue
            await self._answer(text)

    # --- input ---------------------------------------------------------------------------
    def _make_session(self):  # -> PromptSession
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        from dynamo_run.inputs.text.completion import CommandCompleter

        bindings = KeyBindings()

        @bindings.add("c-c")
        def _(event) -> None:  # type: ignore[no-untyped-def]
            buffer = event.app.current_buffer
            if buffer.text:
                buffer.reset()  # Ctrl-C with text typed clears the line
            else:
                event.app.exit(exception=KeyboardInterrupt())

        @bindings.add("escape", "enter")
        def _(event) -> None:  # type: ignore[no-untyped-def]
            event.app.current_buffer.insert_text("\n")  # Alt-Enter / Esc Enter: new line

        path = history_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()
        return PromptSession(
            history=history,
            completer=CommandCompleter(list(COMMANDS), [*SETTINGS, "think"]),
            key_bindings=bindings,
            complete_while_typing=False,
        )

    async def _read(self, session) -> str | None:  # type: ignore[no-untyped-def]
        text = await session.prompt_async(">>> ", placeholder="Send a message (/help for help)")
        if not text.lstrip().startswith(MULTILINE_FENCE):
            return text
        # """ block: keep reading lines until the closing fence.
        body = text.lstrip()[len(MULTILINE_FENCE) :]
        lines = [body] if body else []
        while MULTILINE_FENCE not in (lines[-1] if lines else ""):
            lines.append(await session.prompt_async("... ", placeholder=""))
        joined = "\n".join(lines)
        return joined[: joined.rfind(MULTILINE_FENCE)]

    # --- commands ------------------------------------------------------------------------
    def _command(self, line: str) -> bool:
        """Run a slash command; False means exit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        conv = self.conversation
        try:
            if name in ("/bye", "/exit", "/quit"):
                return False
            if name in ("/help", "/?"):
                for cmd, text in COMMANDS.items():
                    self.console.print(f"  [bold]{cmd:<8}[/] {text}")
                self.console.print(
                    f"  Multi-line: start with {MULTILINE_FENCE} and end with "
                    f"{MULTILINE_FENCE}, or press Esc then Enter for a new line."
                )
            elif name == "/system":
                if arg:
                    conv.system = arg
                    self.console.print("System prompt set.")
                else:
                    self.console.print(conv.system or "(no system prompt: the model's default)")
            elif name == "/set":
                self._set(arg)
            elif name == "/unset":
                conv.unset(arg)
                self.console.print(f"{arg} reset to the model's default.")
            elif name == "/show":
                self._show()
            elif name == "/clear":
                conv.clear()
                self.console.print("Conversation cleared.")
            elif name == "/save":
                if not arg:
                    raise SettingError("usage: /save FILE")
                conv.save(Path(arg).expanduser())
                self.console.print(f"Saved {len(conv.messages)} messages to {arg}.")
            elif name == "/load":
                if not arg:
                    raise SettingError("usage: /load FILE")
                self.conversation = Conversation.load(Path(arg).expanduser())
                self.console.print(f"Loaded {len(self.conversation.messages)} messages.")
            elif name == "/stats":
                if arg not in ("", "on", "off"):
                    raise SettingError("usage: /stats on|off")
                self.stats = (not self.stats) if not arg else arg == "on"
                self.console.print(f"Stats {'on' if self.stats else 'off'}.")
            else:
                import difflib

                close = difflib.get_close_matches(name, list(COMMANDS), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise SettingError(f"unknown command {name}{hint}; type /help")
        except SettingError as exc:
            self.console.print(f"[red]{exc}[/]", markup=True)
        return True

    def _set(self, arg: str) -> None:
        if not arg:
            settings = self.conversation.settings
            for key in SETTINGS:
                value = settings.get(key, "(default)")
                self.console.print(f"  {key:<19} {value}")
            self.console.print(f"  {'think':<19} {'on' if self.think else 'off'}")
            return
        name, _, value = arg.partition(" ")
        if name == "stats":  # `/set stats on` reads naturally too
            self._command(f"/stats {value}")
            return
        if name == "think":
            if value.strip() not in ("on", "off"):
                raise SettingError("usage: /set think on|off")
            self.think = value.strip() == "on"
            shown = "shown (dimmed)" if self.think else "hidden"
            self.console.print(f"Reasoning {shown}.")
            return
        if not value.strip():
            raise SettingError(f"usage: /set {name} VALUE")
        parsed = self.conversation.set(name, value.strip())
        self.console.print(f"Set {name} to {parsed}.")

    def _show(self) -> None:
        assert self.client is not None
        for key, value in self.client.card.describe().items():
            self.console.print(f"  {key:<15} {value}")
        self.console.print(f"  {'system':<15} {self.conversation.system or '(default)'}")
        self.console.print(f"  {'settings':<15} {self.conversation.settings or '(defaults)'}")
        self.console.print("  defaults        (for settings left unset)")
        for name, item in self.client.preprocessor.defaults.describe().items():
            self.console.print(f"    {name:<19} {item['value']:<8} {item['source']}")
        self.console.print(f"  {'messages':<15} {len(self.conversation.messages)}")

    # --- answering -----------------------------------------------------------------------
    async def _answer(self, question: str) -> None:
        assert self.client is not None
        conv = self.conversation
        conv.messages.append({"role": "user", "content": question})
        prepared = None
        trimmed = False
        while prepared is None:
            try:
                prepared = self.client.prepare_chat(conv.request())
            except RequestError as exc:
                if exc.code == "context_length_exceeded" and conv.drop_oldest_turn():
                    trimmed = True
                    continue
                conv.messages.pop()
                self.console.print(f"[red]{exc}[/]")
                return
        if trimmed:
            self.console.print("[dim](older turns dropped to fit the context)[/]")

        parts: list[str] = []
        stats = {"tokens": 0, "ttft": None}
        start = time.perf_counter()

        thinking = False  # reasoning is being shown; a line break ends it before the answer
        guard = LoopGuard()

        async def stream() -> None:
            nonlocal thinking
            async for delta in guarded_stream(self.client, prepared, guard):  # type: ignore[arg-type]
                if stats["ttft"] is None and delta.token_ids:
                    stats["ttft"] = time.perf_counter() - start
                stats["tokens"] = delta.completion_tokens
                if delta.reasoning and self.think:
                    thinking = True
                    self.console.out(delta.reasoning, style="dim", end="", highlight=False)
                    self.console.file.flush()
                if delta.text:
                    if thinking:
                        thinking = False
                        self.console.out("\n", end="")
                    parts.append(delta.text)
                    self.console.out(delta.text, end="", highlight=False)
                    self.console.file.flush()

        task = asyncio.create_task(stream())
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        interrupted = False
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            interrupted = True
        except EngineFailure as exc:
            self.console.print(f"\n[red]engine error: {exc}[/]")
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        answer = "".join(parts)
        self.console.out("" if answer.endswith("\n") else "\n", end="")
        if interrupted:
            self.console.print("[dim]^C (answer stopped)[/]")
        elif guard.looping:
            self.console.print(f"[dim]{LOOP_NOTE}[/]")
        if answer:
            conv.messages.append({"role": "assistant", "content": answer})
        else:
            conv.messages.pop()
        if self.stats:
            elapsed = time.perf_counter() - start
            ttft = stats["ttft"] or 0.0
            decode = max(elapsed - ttft, 1e-9)
            rate = (stats["tokens"] - 1) / decode if stats["tokens"] > 1 else 0.0
            self.console.print(
                f"[dim]{stats['tokens']} tokens · first token {ttft * 1000:.0f} ms · "
                f"{rate:.1f} tokens/s · {elapsed:.2f} s[/]"
            )
