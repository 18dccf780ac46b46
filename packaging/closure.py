"""Which installed modules the single binary may carry: those of dynamo-run's own dependency
closure, read from the installed distributions' metadata.

The binary is built from whatever environment runs PyInstaller, and that one is usually the
test environment: vLLM's CPU build brings OpenCV, transformers, torch, the anthropic SDK and
more into it, and PyInstaller follows every optional ``try: import X`` of the packages we do
need (and their hooks collect whole packages), so all of that ended up in the binary. A
deny-list grows with every new package in the venv; this allow-list does not: anything
installed that no distribution of the closure requires is excluded by name.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions

from packaging.requirements import Requirement

# What the binary runs: the core and the llama.cpp engine (no extras: GPU engines, tests and
# tools are not part of it).
ROOTS = ("dynamo-run", "dynamo-run-llamacpp")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(roots: Iterable[str] = ROOTS) -> set[str]:
    """Canonical names of ``roots`` and every installed distribution they require, with the
    extras each requirement asks for and the markers of this interpreter and platform."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [(name, frozenset()) for name in roots]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in done:
            continue
        done.add((canonical(name), extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional requirement that is not installed
        seen.add(canonical(dist.metadata["Name"]))
        for text in dist.requires or ():
            req = Requirement(text)
            envs = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def excluded_modules(roots: Iterable[str] = ROOTS) -> list[str]:
    """Top-level modules installed here that no distribution of the closure provides (a name
    that several distributions share, as ``google`` is, is kept when one of them is in it)."""
    allowed = dependency_closure(roots)
    excluded = []
    for module, dists in packages_distributions().items():
        if module in sys.stdlib_module_names or not module.isidentifier():
            continue
        if not any(canonical(d) in allowed for d in dists):
            excluded.append(module)
    return sorted(excluded)


if __name__ == "__main__":  # what a build would leave out, for a look before building
    print("closure:", " ".join(sorted(dependency_closure())))
    print("excluded:", " ".join(excluded_modules()))
