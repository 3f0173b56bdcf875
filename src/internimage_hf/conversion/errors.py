"""The one error type of the conversion tool (and its pickle refusal), and how error messages list keys."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says why in one sentence (plus the offending keys)."""


class PickleRefused(ConversionError):
    """A `.pth` holds Python objects besides tensors, and unpickling it was not allowed."""


def format_keys(keys, limit: int = 20) -> str:
    """`keys` sorted and comma-separated, the first `limit` of them, with a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
