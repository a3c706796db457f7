"""Workspace keys and agent tokens: minted once, stored only as SHA-256 digests."""

from __future__ import annotations

import hashlib
import secrets

WORKSPACE_KEY_PREFIX = "rk_live_"
AGENT_TOKEN_PREFIX = "at_live_"
NODE_TOKEN_PREFIX = "nt_live_"


def mint(prefix: str) -> str:
    """A new secret with its kind prefix and 256 bits of randomness."""
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> bytes:
    """The SHA-256 digest stored in place of the secret."""
    return hashlib.sha256(secret.encode()).digest()
