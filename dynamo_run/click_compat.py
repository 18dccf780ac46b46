"""click's exceptions, wherever this typer keeps them (a leaf for cli.py and ps.py)."""

from __future__ import annotations

try:  # typer >= 0.20 vendors its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors  # type: ignore[no-redef]

__all__ = ["click_errors"]
