"""The command-line face of ``settings.py``: typer options generated from the declared
settings, and the settings a command was run with (its flags over the environment over
``--config`` over the defaults). Used by ``dynamo-run`` and ``dynamo-run ps``."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from dynamo_run.settings import Declared, Settings, SpecError, declared, resolve

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        metavar="FILE",
        help="TOML (.toml) or YAML file of settings, keyed by flag name "
        "(http-port = 8080). Flags and environment variables override it.",
    ),
]


def _chosen(names: Iterable[str] | None) -> list[Declared]:
    wanted = None if names is None else set(names)
    return [d for d in declared() if wanted is None or d.name in wanted]


def _negation(d: Declared) -> str:
    return f"no_{d.name}"


def _option(d: Declared) -> tuple[Any, Any]:
    """The typer option of one declared setting: (annotation, default shown in help). Click
    only parses what was typed; defaults, environment and file are ``resolve``'s."""
    m = d.meta
    names = m.flags or (d.flag,)
    help_text = m.help
    choices = d.choice_names()
    if choices:
        help_text += f" One of: {', '.join(choices)}."
    if d.base is bool:
        help_text += f" --no-{d.key} turns it off."
    if m.env:
        help_text += f" \\[env var: {m.env}]"
    panel = str(m.panel)
    if d.base is bool:  # a flag; --no-NAME is a hidden twin (a second column cuts names)
        show = m.default_help or ("on" if d.default else "off")
        return Annotated[
            bool, typer.Option(*names, help=help_text, rich_help_panel=panel, show_default=show)
        ], False
    default = d.default if d.default is None or d.base in (int, float) else str(d.default)
    base = int if m.count else str if choices else d.base
    option = typer.Option(
        *names,
        help=help_text,
        rich_help_panel=panel,
        metavar=m.metavar or ("MODE" if choices else None),
        count=m.count,
        show_default=m.default_help or (not m.count and default is not None),
    )
    return Annotated[base if default is not None else base | None, option], default


def with_settings(names: Iterable[str] | None = None) -> Callable[[Callable], Callable]:
    """Decorate a typer command ``func(ctx, ..., **settings)``: one option per declared
    setting (``names``: only those), plus a hidden ``--no-NAME`` per on/off flag."""

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]

        def add(name: str, annotation: Any, default: Any) -> None:
            kind = inspect.Parameter.KEYWORD_ONLY
            params.append(inspect.Parameter(name, kind, default=default, annotation=annotation))

        for d in _chosen(names):
            add(d.name, *_option(d))
            if d.base is bool:
                flag = typer.Option(f"--no-{d.key}", hidden=True)
                add(_negation(d), Annotated[bool, flag], False)
        func.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        func.__annotations__ = {p.name: p.annotation for p in params}
        return func

    return decorate


def resolve_settings(
    ctx: typer.Context, values: dict[str, Any], config: Path | None = None
) -> Settings:
    """The command's Settings: what was typed (not click's defaults) over the environment
    over ``config`` over the defaults. A bad value anywhere is a SpecError."""

    def typed(name: str) -> bool:
        return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"

    given: dict[str, Any] = {}
    for d in declared():
        if d.name not in values:
            continue
        if d.base is bool and typed(_negation(d)):
            if typed(d.name):
                raise SpecError(f"{d.flag} and --no-{d.key} both given; choose one")
            given[d.name] = False
        elif typed(d.name):
            given[d.name] = values[d.name]
    return resolve(given, os.environ, config)
