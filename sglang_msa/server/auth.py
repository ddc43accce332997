"""Optional API keys per tenant for the memory API (`api_keys_file` option).

The file maps keys to tenant names: `{"keys": {"<api key>": "<tenant>", ...}}`. With it, every
`/v1/memories` request needs `Authorization: Bearer <key>` (401 otherwise). Each tenant has its
own namespace of memory ids; another tenant's memories do not exist for it (404). The server's
admin key (`--admin-api-key`, required with tenants) reads the server-wide statistics.
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
# whether the request being served presented the server's admin key (with API keys)
caller_is_admin: ContextVar[bool] = ContextVar("sglang_msa_caller_is_admin", default=False)


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


def authenticate_request(request: Request, keys: APIKeys | None, admin_key: str | None) -> tuple[str | None, bool]:
    """(the caller's tenant, whether it presented the admin key); (None, False) with keys
    disabled; raises 401 without a known key."""
    if keys is None:
        return None, False
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    presented = presented.strip() if scheme.lower() == "bearer" else ""
    if presented and admin_key and hmac.compare_digest(admin_key.encode(), presented.encode()):
        return None, True
    tenant = keys.tenant_of(presented) if presented else None
    if tenant is None:
        raise APIError(401, "a valid API key is required: Authorization: Bearer <key>", "authorization")
    return tenant, False
