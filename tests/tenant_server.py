"""The server of the tenant tests: tenants' API keys, an admin key, a memory directory; a test
can kill it hard and start it again on the same directory."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from sglang_msa.server_process import start_server

ADMIN_KEY = "admin-key-of-this-server-0000"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


class TenantServer:
    """`restart` kills the server (SIGKILL) and starts it again on the same directory."""

    def __init__(self, model: Path, root: Path, keys: dict[str, str], options: dict, extra_args: tuple[str, ...] = ()):
        self.model, self.root, self.options, self.extra_args, self.runs = model, root, options, extra_args, 0
        (root / "keys.json").write_text(json.dumps({"keys": keys}))
        self.process = self._launch()

    def _launch(self):
        options = {**self.options, "api_keys_file": str(self.root / "keys.json")}
        args = ["--max-total-tokens", "16384", "--log-level", "warning", "--msa-config", json.dumps(options),
                "--msa-memory-dir", str(self.root / "memories"), "--admin-api-key", ADMIN_KEY, *self.extra_args]
        self.runs += 1
        return start_server(self.model, "msa", extra_args=args, log_path=self.root / f"server-{self.runs}.log")

    @property
    def url(self) -> str:
        return self.process.base_url

    def restart(self) -> None:
        self.process.kill()
        self.process = self._launch()

    def alive(self) -> bool:
        return requests.get(f"{self.url}/health_generate", timeout=60).status_code == 200
