"""``BNPassError``, the one exception bnpass raises to users (also ``bnpass.BNPassError`` and
``bnpass.options.BNPassError``). A module of its own, importing nothing of bnpass, so that every
other module can raise it without importing another's dependencies."""

from __future__ import annotations

__all__ = ["BNPassError"]


class BNPassError(RuntimeError):
    """A bnpass error; the message starts with "bnpass:" and says how to fix it."""

    def __init__(self, message: str):
        super().__init__(message if message.startswith("bnpass:") else f"bnpass: {message}")
