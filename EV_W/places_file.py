"""The `file` provider's file: place -> temperature in °C, a JSON object an operator edits.

    {"Alicante": 14.5, "Elche": -2}

Pure parsing and formatting, and the atomic rewrite `python -m EV_W set` does: the new text is
written beside the file and renamed over it, so the service never reads half a file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from shared.errors import EVError
from shared.weather_api import MAX_PLACE

MAX_FILE_BYTES = 64 * 1024
MIN_C, MAX_C = -100.0, 70.0  # the range Central accepts (shared/weather_api.py)


class PlacesFileError(EVError):
    """The places file, or a value for it, is not usable."""


def parse_temperature(text: str) -> float:
    """A temperature typed by a person: a finite number of °C within Central's range."""
    try:
        value = float(text.replace(",", ".") if text.count(",") == 1 else text)
    except ValueError:
        raise PlacesFileError(f"not a temperature: {text!r} (expected a number of °C)") from None
    return check_temperature(value, repr(text))


def check_temperature(value: float, what: str) -> float:
    if not math.isfinite(value) or not MIN_C <= value <= MAX_C:
        raise PlacesFileError(f"{what}: a temperature must be from {MIN_C:g} to {MAX_C:g} °C")
    return value


def parse_places(text: str, source: str) -> dict[str, float]:
    """The file's places and temperatures; PlacesFileError naming what is wrong."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PlacesFileError(f"{source} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PlacesFileError(f"{source} must hold a JSON object of place: temperature")
    places: dict[str, float] = {}
    for place, value in data.items():
        if not place.strip() or len(place) > MAX_PLACE:
            raise PlacesFileError(f"{source}: place names are 1 to {MAX_PLACE} characters")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PlacesFileError(f"{source}: the temperature of {place!r} is not a number")
        places[place] = check_temperature(float(value), f"{source}: {place!r}")
    return places


def find(places: dict[str, float], place: str) -> str | None:
    """The file's spelling of `place` (case is ignored), or None."""
    wanted = place.strip().casefold()
    return next((name for name in places if name.casefold() == wanted), None)


def read_places(path: Path) -> dict[str, float]:
    """Read and parse the file (blocking: the service calls it in a thread)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PlacesFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise PlacesFileError(f"{path} is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlacesFileError(f"{path} is not UTF-8: {exc}") from None
    return parse_places(text, str(path))


def write_places(path: Path, places: dict[str, float]) -> None:
    """Replace the file atomically with `places` (a temporary file renamed over it)."""
    text = json.dumps(places, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def set_place(path: Path, place: str, temperature: float, *, add: bool) -> str:
    """Set one place's temperature in the file; return the place as the file spells it.

    A place the file does not have is refused unless `add` (a typo must not go unnoticed).
    """
    if not add and not path.exists():
        raise PlacesFileError(f"{path} does not exist; --add creates it with this place")
    places = read_places(path) if path.exists() else {}
    name = find(places, place)
    if name is None:
        if not add:
            known = ", ".join(sorted(places)) or "none"
            raise PlacesFileError(
                f"unknown location {place!r} in {path} (known: {known}); --add adds it"
            )
        name = place.strip()
        if not name or len(name) > MAX_PLACE:
            raise PlacesFileError(f"place names are 1 to {MAX_PLACE} characters")
    places[name] = temperature
    write_places(path, places)
    return name
