"""Optional API keys per tenant for the memory API (`api_keys_file` option).

The file maps keys to tenant names: `{"keys": {"<api key>": "<tenant>", ...}}`. With it, every
`/v1/memories` request needs `Authorization: Bearer <key>` (401 otherwise); a memory belongs to
the tenant that created it, other tenants get 403, and listing shows the caller's memories only.
"""

from __future__ import annotations

import hmac
import json
import re
from contextvars import ContextVar
from pathlib import Path

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from sglang_msa.server.errors import APIError

TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

# the tenant of the request being served (None: keys disabled, or an in-process Engine caller)
caller_tenant: ContextVar[str | None] = ContextVar("sglang_msa_caller_tenant", default=None)


class APIKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: dict[str, str] = Field(min_length=1)

    def tenant_of(self, presented: str) -> str | None:
        """The key's tenant; every key is compared in constant time."""
        found = None
        for key, tenant in self.keys.items():
            if hmac.compare_digest(key.encode(), presented.encode()):
                found = tenant
        return found


def load_api_keys(path: str | Path) -> APIKeys:
    keys = APIKeys.model_validate(json.loads(Path(path).read_text()))
    bad = [tenant for tenant in keys.keys.values() if not re.match(TENANT_PATTERN, tenant)]
    short = [key for key in keys.keys if len(key) < 16]
    if bad or short:
        raise ValueError(f"api_keys_file {path}: tenant names must match {TENANT_PATTERN} and keys be at least "
                         f"16 characters ({len(bad)} bad names, {len(short)} short keys)")
    return keys


def authenticate_request(request: Request, keys: APIKeys | None) -> str | None:
    """The caller's tenant (None with keys disabled); raises 401 without a known key."""
    if keys is None:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    tenant = keys.tenant_of(presented.strip()) if scheme.lower() == "bearer" and presented.strip() else None
    if tenant is None:
        raise APIError(401, "a valid API key is required: Authorization: Bearer <key>", "authorization")
    return tenant
