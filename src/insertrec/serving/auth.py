"""Bearer keys with roles: who may decide, who may post feedback, who may administer.

Keys are compared with `hmac.compare_digest` against every configured key, so
the time a refusal takes says nothing about how close a guess was. ``admin``
may do everything. A missing or unknown key is 401 (with
``WWW-Authenticate: Bearer``), a known key without the role 403.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from insertrec.errors import InsertrecError

__all__ = ["AuthError", "KeyRing"]


class AuthError(InsertrecError):
    """A request refused for its credentials; ``status`` is 401 or 403."""

    def __init__(self, status: int, reason: str):
        self.status = status
        super().__init__(reason)


class KeyRing:
    """The configured keys; ``insecure`` lets every request through (``--insecure-dev`` only)."""

    def __init__(self, keys: Mapping[str, frozenset[str]], insecure: bool = False):
        self._keys = [(k.encode(), roles) for k, roles in keys.items()]
        self.insecure = insecure

    def __bool__(self) -> bool:
        return bool(self._keys)

    def roles(self, authorization: str | None) -> frozenset[str]:
        """The roles of the key in an ``Authorization`` header; raises AuthError(401) if none."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "missing bearer key: send 'Authorization: Bearer KEY'")
        presented = token.strip().encode()
        found: frozenset[str] = frozenset()
        for key, roles in self._keys:
            if hmac.compare_digest(presented, key):
                found = roles
        if not found:
            raise AuthError(401, "unknown API key")
        return found

    def check(self, authorization: str | None, role: str) -> None:
        """Pass if the key may act as ``role``; raises AuthError otherwise."""
        if self.insecure:
            return
        roles = self.roles(authorization)
        if role not in roles and "admin" not in roles:
            raise AuthError(403, f"this key lacks the {role!r} role")
