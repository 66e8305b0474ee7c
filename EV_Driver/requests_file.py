"""The file of supply requests: one CP id a line, `#` comments and blank lines skipped.

Pure parsing (text in, CP ids and problems out) plus a small bounded reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from shared.errors import ConfigError
from shared.messages import Identifier

MAX_LINES = 1000
MAX_BYTES = 64 * 1024

_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)


class RequestsFileError(ConfigError):
    """The file cannot be used at all (unreadable, too large, not text, no valid line)."""


@dataclass(frozen=True, slots=True)
class LineProblem:
    """One line that is not a valid CP id; it is skipped."""

    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True, slots=True)
class RequestsFile:
    cp_ids: tuple[str, ...]
    problems: tuple[LineProblem, ...] = ()


def identifier_problem(value: str, what: str = "CP id") -> str | None:
    """Why `value` is not a valid identifier (as shared.messages.Identifier), or None."""
    try:
        _IDENTIFIER.validate_python(value)
    except ValidationError:
        shown = value if len(value) <= 40 else value[:40] + "..."
        return f"{shown!r} is not a valid {what} (1-32 letters, digits, '_', '.', '-')"
    return None


def parse_requests(text: str, source: str = "requests file") -> RequestsFile:
    """Parse the text of a requests file; raise RequestsFileError when nothing is usable."""
    lines = text.splitlines()
    if len(lines) > MAX_LINES:
        raise RequestsFileError(f"{source}: more than {MAX_LINES} lines")
    cp_ids: list[str] = []
    problems: list[LineProblem] = []
    for number, raw in enumerate(lines, start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        reason = identifier_problem(entry)
        if reason is None:
            cp_ids.append(entry)
        else:
            problems.append(LineProblem(number, entry, reason))
    if not cp_ids:
        if problems:
            raise RequestsFileError(f"{source}: no valid CP id ({problems[0]})")
        raise RequestsFileError(f"{source}: no CP ids (only blank lines or comments)")
    return RequestsFile(tuple(cp_ids), tuple(problems))


def decode_requests(data: bytes, source: str = "requests file") -> RequestsFile:
    """Check the size and encoding of raw file content, then parse it."""
    if len(data) > MAX_BYTES:
        raise RequestsFileError(f"{source}: larger than {MAX_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestsFileError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    return parse_requests(text, source)


def load_requests(path: str | Path) -> RequestsFile:
    """Read and parse a requests file (small and local: read once at start-up)."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RequestsFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode_requests(data, str(path))
