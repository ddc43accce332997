"""Start and stop an SGLang HTTP server in a child process (used by the demo and the tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_device(ranks: int = 1) -> str:
    """A GPU when there are enough for `ranks` tensor-parallel ranks, else SGLang's CPU engine."""
    import torch

    return "cuda" if torch.cuda.device_count() >= ranks else "cpu"


@dataclass
class ServerProcess:
    """A running `sglang serve` (or `python -m sglang.launch_server`) child process."""

    process: subprocess.Popen
    base_url: str
    log_path: Path
    started_in_s: float = field(default=0.0)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL the server and every process it started (a crash, for tests)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


PORT_TAKEN = "address already in use"


def start_server(
    model_path: str | Path,
    attention_backend: str = "msa",
    *,
    launcher: str = "serve",
    port: int | None = None,
    extra_args: list[str] | None = None,
    log_path: Path | None = None,
    startup_timeout_s: float = 300.0,
    device: str | None = None,
) -> ServerProcess:
    """Launch a server and wait until GET /health answers 200.

    launcher: "serve" runs `sglang serve`, "launch_server" runs `python -m sglang.launch_server`.
    On a machine without a GPU the CPU engine is selected (`--device cpu`, and
    SGLANG_USE_CPU_ENGINE=1 in the child's environment). Without a given `port`, a free one is
    picked; if another process binds it before the server does, the server is started again on
    another (up to 3 tries).
    """
    for attempt in range(3):
        chosen = port or free_port()
        try:
            return _start_once(model_path, attention_backend, launcher, chosen, extra_args, log_path,
                               startup_timeout_s, device or default_device())
        except PortTakenError:
            if port is not None or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _listens_on(pid: int, port: int) -> bool:
    """Whether the process `pid` or one of its children listens on TCP `port`."""
    import psutil

    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp")):
                return True
        except psutil.Error:  # a child that exited meanwhile
            continue
    return False


class PortTakenError(RuntimeError):
    """The server could not bind its HTTP port."""


def _start_once(model_path, attention_backend: str, launcher: str, port: int, extra_args: list[str] | None,
                log_path: Path | None, startup_timeout_s: float, device: str) -> ServerProcess:
    if launcher == "serve":
        command = [str(Path(sys.executable).with_name("sglang")), "serve"]
    elif launcher == "launch_server":
        command = [sys.executable, "-m", "sglang.launch_server"]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    command += [
        "--model-path", str(model_path),
        "--attention-backend", attention_backend,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--device", device,
        *(extra_args or []),
    ]
    env = dict(os.environ)
    if device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    log_path = Path(log_path or f"/tmp/sglang-msa-server-{port}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = ServerProcess(process=process, base_url=f"http://127.0.0.1:{port}", log_path=log_path)
    started = time.monotonic()
    while time.monotonic() - started < startup_timeout_s:
        if process.poll() is not None:
            tail = server.log_tail()
            error = PortTakenError if PORT_TAKEN in tail else RuntimeError
            raise error(f"server exited with code {process.returncode}:\n{tail}")
        try:
            healthy = requests.get(f"{server.base_url}/health", timeout=2).status_code == 200
            if healthy and _listens_on(process.pid, port):  # not another server that took the port
                server.started_in_s = time.monotonic() - started
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"server not healthy after {startup_timeout_s:.0f}s:\n{server.log_tail()}")
