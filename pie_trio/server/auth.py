"""API keys → tenants.

A tenant is the identity behind an API key; instances belong to the tenant that launched them.
With auth off every client is the one tenant `anonymous` (a single-user server).
"""

from __future__ import annotations

import hmac

ANONYMOUS = "anonymous"


class Authenticator:
    def __init__(self, api_keys: dict[str, str], enabled: bool):
        self.enabled = enabled
        # Encoded once: compare_digest on bytes works for any characters in a key.
        self._keys = [(tenant, key.encode()) for tenant, key in api_keys.items()]

    def tenant_for(self, token: str | None) -> str | None:
        """The tenant owning `token`, or None when it is not a valid key."""
        if not self.enabled:
            return ANONYMOUS
        if not token:
            return None
        candidate = token.encode()
        found = None
        # Compare against every key, without stopping early, so timing does not reveal which
        # (or how many) keys exist.
        for tenant, key in self._keys:
            if hmac.compare_digest(candidate, key):
                found = tenant
        return found

    def tenant_for_header(self, authorization: str | None) -> str | None:
        """The tenant of an HTTP `Authorization: Bearer KEY` header."""
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self.tenant_for(token.strip())
