"""Resume support: which input is being run, and how much of it the output already holds.

Output lines are written in input order and flushed one by one, so the done lines are
always a prefix of the input. A sidecar ``OUTPUT.state`` records the input's size and
SHA-256 (and the engine and model) so that a rerun resumes only the same batch; a line cut
short by ``kill -9`` (no trailing newline) is dropped and redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_run.inputs.batch.lines import FORM_TEXT, peek_custom_id, peek_form
from dynamo_run.inputs.batch.records import outcome, record_matches
from dynamo_run.spec import SpecError

STATE_SUFFIX = ".state"
STATE_VERSION = 1
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class InputInfo:
    """What identifies an input file, and how many requests it holds."""

    path: Path
    size: int
    sha256: str
    requests: int  # non-blank lines
    default_form: str  # form of the first readable line; used for lines that do not parse


def iter_requests(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, stripped bytes) for every non-blank line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            text = raw.strip()
            if text:
                yield number, text


def scan_input(path: Path) -> InputInfo:
    """Hash and count the input in one pass. Raises SpecError if it cannot be read."""
    if not path.exists():
        raise SpecError(f"in=batch:{path}: no such file")
    if not path.is_file():
        raise SpecError(f"in=batch:{path}: not a file; expected a JSON Lines file")
    digest = hashlib.sha256()
    size = 0
    requests = 0
    default_form: str | None = None
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                digest.update(raw)
                size += len(raw)
                text = (raw[len(_BOM) :] if number == 1 and raw.startswith(_BOM) else raw).strip()
                if text:
                    requests += 1
                    if default_form is None:
                        default_form = peek_form(text)
    except OSError as exc:
        raise SpecError(f"in=batch:{path}: cannot read: {exc.strerror or exc}") from None
    return InputInfo(path, size, digest.hexdigest(), requests, default_form or FORM_TEXT)


@dataclass
class BatchState:
    """The sidecar that ties an output file to the batch that wrote it."""

    input_sha256: str
    input_bytes: int
    out: str
    model: str | None
    input_path: str = ""

    @classmethod
    def for_run(cls, info: InputInfo, out: str, model: str | None) -> BatchState:
        return cls(info.sha256, info.size, out, model, str(info.path.resolve()))

    def to_json(self) -> dict[str, Any]:
        return {
            "dynamo_run_batch": STATE_VERSION,
            "input_path": self.input_path,
            "input_bytes": self.input_bytes,
            "input_sha256": self.input_sha256,
            "out": self.out,
            "model": self.model,
        }

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> BatchState | None:
        """The saved state, or None if there is none or it is not ours."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("dynamo_run_batch") != STATE_VERSION:
            return None
        try:
            return cls(
                str(data["input_sha256"]),
                int(data["input_bytes"]),
                str(data["out"]),
                data.get("model"),
                str(data.get("input_path", "")),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def differences(self, other: BatchState) -> list[str]:
        """What makes ``other`` (this run) a different batch from the one saved."""
        diffs = []
        if (self.input_sha256, self.input_bytes) != (other.input_sha256, other.input_bytes):
            where = f" ({self.input_path})" if self.input_path else ""
            diffs.append(f"it was written for different input content{where}")
        if self.out != other.out:
            diffs.append(f"it was written by out={self.out}")
        if self.model != other.model:
            diffs.append(f"it was written with model {self.model or 'default'}")
        return diffs


@dataclass
class Resume:
    """What an existing output file already holds."""

    done: int = 0  # input requests already answered (a prefix of the input)
    ok: int = 0
    failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    valid_bytes: int = 0  # the output is truncated to this length before appending
    dropped_bytes: int = 0  # partial or damaged tail that will be redone
    custom_ids: set[str] = field(default_factory=set)


def read_resume(info: InputInfo, output: Path) -> Resume:
    """Walk the output beside the input; stop at the first partial or unreadable line.

    Raises SpecError when a complete output line does not belong to its input line (the
    file was edited, or the input changed without changing size and hash)."""
    resume = Resume()
    size = output.stat().st_size
    inputs = iter_requests(info.path)
    with output.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a line cut short by kill -9
            try:
                record = json.loads(raw)
            except ValueError:
                break
            if not isinstance(record, dict):
                break
            expected = next(inputs, None)
            if expected is None:
                raise SpecError(
                    f"{output}: has more lines than {info.path} has requests; "
                    "pass --overwrite to start afresh or --output to write elsewhere"
                )
            number, text = expected
            if not record_matches(record, number, peek_custom_id(text)):
                raise SpecError(
                    f"{output}: output line {resume.done + 1} does not belong to input line "
                    f"{number}; pass --overwrite to start afresh or --output to write elsewhere"
                )
            result = outcome(record)
            resume.done += 1
            resume.ok += result.ok
            resume.failed += not result.ok
            resume.tokens_in += result.tokens_in
            resume.tokens_out += result.tokens_out
            if isinstance(record.get("custom_id"), str):
                resume.custom_ids.add(record["custom_id"])
            resume.valid_bytes += len(raw)
    resume.dropped_bytes = size - resume.valid_bytes
    return resume
