"""Per-tenant grants: proof, checked by the scheduler, that the memory API let a request in.

With API keys enabled (`api_keys_file`), every memory request the HTTP process sends carries
`grant = HMAC(secret, caller tenant, memory id)`. The scheduler recomputes it from the owner it
recorded when the memory was created and refuses a mismatch, so a request can only reach a
memory of its own tenant even if it bypasses the HTTP checks (SGLang's own `/generate` with
`custom_params`, which cannot know the secret). The secret is made by the launcher and reaches
the scheduler through the environment of the processes it starts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

GRANT_SECRET_ENV = "SGLANG_MSA_GRANT_SECRET"


def ensure_secret() -> None:
    """Create this server's secret (launcher, before it starts the scheduler)."""
    os.environ.setdefault(GRANT_SECRET_ENV, secrets.token_hex(32))


def _secret() -> bytes:
    value = os.environ.get(GRANT_SECRET_ENV)
    if not value:
        raise RuntimeError(f"sglang-msa: API keys are enabled but {GRANT_SECRET_ENV} is not set "
                           "(start the server with `sglang serve` / `launch_server`)")
    return value.encode()


def grant(owner: str | None, memory_id: str) -> str:
    message = f"{owner or ''}\x00{memory_id}".encode()
    return hmac.new(_secret(), message, hashlib.sha256).hexdigest()


def verify(owner: str | None, memory_id: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(grant(owner, memory_id), presented)
