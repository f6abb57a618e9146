"""Client authentication and tenant identity.

With ``FAMA_API_KEYS`` set, every ``/v1`` request needs ``Authorization: Bearer <key>`` matching one of
them (compared in constant time). The tenant is a short sha256 prefix of the key, never the key itself;
``default`` when authentication is off. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from proxy.errors import AuthenticationFailed

DEFAULT_TENANT = "default"


def tenant_id(key: str) -> str:
    return "t-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, keys: list[SecretStr]) -> None:
        self._keys = [(k.get_secret_value().encode(), tenant_id(k.get_secret_value())) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def tenant(self, authorization: str | None) -> str:
        if not self._keys:
            return DEFAULT_TENANT
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.")
        candidate = presented.strip().encode()
        found = None
        for key, tenant in self._keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(key, candidate):
                found = tenant
        if found is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return found
