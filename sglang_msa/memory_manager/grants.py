"""Grants: proof, checked by the scheduler, that the memory API let a request in.

Every memory request the memory API sends (HTTP server or Engine) carries
`grant = HMAC(secret, owner tenant, memory key, request id)`. The scheduler recomputes it from
the owner it recorded when the memory incarnation was created and refuses a mismatch, so a
request reaches only the memory incarnation, of its own tenant, that the API resolved for it,
even if it bypasses the HTTP checks (SGLang's own `/generate` with `custom_params`, which cannot
know the secret). Binding the request id lets the scheduler reserve the memory API's request ids
(`RESERVED_RID_PREFIX`) for requests that carry a grant. The secret is made by the launcher
(`plugin.register`) and reaches the scheduler through the environment of the processes it starts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import uuid

GRANT_SECRET_ENV = "SGLANG_MSA_GRANT_SECRET"
RESERVED_RID_PREFIX = "msa-"  # request ids of the memory API: "msa-<kind>-<uuid hex>"
MEMORY_API_RID = re.compile(r"msa-[a-z]+-[0-9a-f]{32}")  # all of one length per kind: none prefixes another


def new_rid(kind: str) -> str:
    """A fresh, unguessable request id of the memory API."""
    return f"{RESERVED_RID_PREFIX}{kind}-{uuid.uuid4().hex}"


def is_reserved_rid(rid: str) -> bool:
    """Whether `rid` is, or could prefix-match (SGLang aborts by rid prefix), a memory API rid."""
    return rid.startswith(RESERVED_RID_PREFIX) or RESERVED_RID_PREFIX.startswith(rid)


def names_one_request(rid: str) -> bool:
    """Whether an abort by `rid` can only match the memory API request of exactly that rid."""
    return MEMORY_API_RID.fullmatch(rid) is not None


def ensure_secret() -> None:
    """Create this server's secret (launcher, before it starts the scheduler)."""
    os.environ.setdefault(GRANT_SECRET_ENV, secrets.token_hex(32))


def _secret() -> bytes:
    value = os.environ.get(GRANT_SECRET_ENV)
    if not value:
        raise RuntimeError(f"sglang-msa: {GRANT_SECRET_ENV} is not set (the launcher sets it when it loads the "
                           "plugin: start the server with `sglang serve`, `launch_server` or `sglang.Engine`)")
    return value.encode()


def grant(owner: str | None, memory_key: str, rid: str) -> str:
    message = f"{owner or ''}\x00{memory_key}\x00{rid}".encode()
    return hmac.new(_secret(), message, hashlib.sha256).hexdigest()


def verify(owner: str | None, memory_key: str, rid: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(grant(owner, memory_key, rid), presented)
