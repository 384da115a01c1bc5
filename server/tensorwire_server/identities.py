"""Whom per-identity limits count for: a token's name, or, on a server that checks no
tokens, the one anonymous identity (the empty name) that every caller shares. The
server cannot tell callers without tokens apart, so the anonymous identity is bounded
by the server's own caps only: fairness between tenants needs tokens."""

from __future__ import annotations

from typing import Final

from tensorwire.errors import shown

#: The identity of every caller of a server without tokens.
ANONYMOUS: Final = ""


def who(identity: str) -> str:
    """``identity`` as a refusal names it."""
    return f"token {shown(identity)}" if identity else "the anonymous caller (no tokens)"


__all__ = ["ANONYMOUS", "who"]
