"""Text from outside (command-line arguments, JSON bodies, files) checked before a model sees it."""

from __future__ import annotations

from typing import Any

from mag.errors import InputError

__all__ = ["check_text"]


def check_text(value: Any, what: str, max_chars: int | None = None) -> str:
    """``value`` stripped, if it is a non-empty string (of at most ``max_chars`` characters) that
    UTF-8 can encode; InputError otherwise. A lone surrogate (``"\\ud800"`` in JSON, or a non-UTF-8
    byte of a command-line argument, which Python decodes to one) cannot be encoded."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{what} must be a non-empty string, got {value!r:.60}")
    if max_chars is not None and len(value) > max_chars:
        raise InputError(f"{what} has {len(value)} characters; at most {max_chars} are accepted")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f"{what} is not valid UTF-8 text ({err.reason} at character {err.start})"
        ) from err
    return value.strip()
