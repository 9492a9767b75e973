"""Human sizes and durations, both ways."""

from __future__ import annotations

import re

from .errors import InvalidInputError

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", re.IGNORECASE)
_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str) -> int:
    """'1MiB', '512K', '4m', '1048576' -> bytes. Units are binary (K = 1024)."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise InvalidInputError(f"not a size: {text!r} (examples: 1MiB, 512K, 1048576)")
    number, unit = match.groups()
    return int(float(number) * _FACTORS[unit[:1].upper()])


def format_size(n: float) -> str:
    """Bytes as a short binary-unit string: '1.5 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_duration(text: str) -> float:
    """'6h', '90m', '1h30m', '0', '45s' -> seconds."""
    stripped = text.strip()
    if stripped.isascii() and stripped.replace(".", "", 1).isdigit():
        return float(stripped)
    pos, total = 0, 0.0
    for match in _DURATION.finditer(stripped):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(stripped) or not stripped:
        raise InvalidInputError(f"not a duration: {text!r} (examples: 6h, 90m, 1h30m, 0)")
    return total


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """'1 file', '2 files', '0 files': a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
