"""The file of supply requests: one CP id a line, `#` comments and blank lines skipped.

Pure parsing (text in, CP ids and problems out) plus a small bounded reader that opens
regular files only: a named pipe would block until something writes to it, and a device or a
socket is never a list of requests.
"""

from __future__ import annotations

import codecs
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from shared.errors import ConfigError
from shared.messages import Identifier

MAX_LINES = 1000
MAX_BYTES = 64 * 1024

_IDENTIFIER: TypeAdapter[str] = TypeAdapter(Identifier)

# O_NONBLOCK: if the path became a named pipe after it was checked, opening it returns at once
# instead of waiting for a writer (it changes nothing for a regular file). O_NOCTTY: a terminal
# swapped in at that moment does not become the app's controlling terminal. Both are POSIX only.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
)

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


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


def _too_large(source: str, size: int | None = None) -> RequestsFileError:
    actual = f" ({size} bytes)" if size is not None else ""
    return RequestsFileError(f"{source}: larger than the {MAX_BYTES // 1024} KiB limit{actual}")


def _where_not_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    """Where the bad byte is, as a person finds it in an editor: line and column (1-based).

    Lines are counted as parse_requests counts them (str.splitlines); everything before the
    bad byte is valid UTF-8, so columns are characters, not bytes.
    """
    # A stand-in for the bad byte ends up on its line, at its column.
    lines = (data[: error.start].decode("utf-8") + "?").splitlines()
    column = len(lines[-1])
    return f"line {len(lines)}: not UTF-8 (byte 0x{data[error.start]:02x} at column {column})"


def decode_requests(data: bytes, source: str = "requests file") -> RequestsFile:
    """Check the size and encoding of raw file content, then parse it."""
    if len(data) > MAX_BYTES:
        raise _too_large(source)
    # A byte order mark, as some editors write, is not part of the first line.
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestsFileError(f"{source} {_where_not_utf8(data, exc)}") from None
    return parse_requests(text, source)


def _check_regular(info: os.stat_result, source: str) -> None:
    """Refuse anything but a regular file (a symbolic link counts as what it points to)."""
    if stat.S_ISREG(info.st_mode):
        if info.st_size > MAX_BYTES:
            raise _too_large(source, info.st_size)
        return
    kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
    raise RequestsFileError(f"cannot read {source}: {kind}, not a regular file")


def load_requests(path: str | Path) -> RequestsFile:
    """Read and parse a requests file (small and local: read once at start-up).

    The path is checked before it is opened, and what was opened is checked again, since the
    path may have been replaced in between.
    """
    source = str(path)
    try:
        _check_regular(os.stat(path), source)
        with os.fdopen(os.open(path, _OPEN_FLAGS), "rb") as stream:
            _check_regular(os.fstat(stream.fileno()), source)
            data = stream.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RequestsFileError(f"cannot read {source}: {exc.strerror or exc}") from None
    return decode_requests(data, source)
