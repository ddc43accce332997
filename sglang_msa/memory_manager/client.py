"""Client side of the control channel (HTTP server process, or a Python program beside an Engine)."""

from __future__ import annotations

import zmq
import zmq.asyncio

from sglang_msa.memory_manager import protocol
from sglang_msa.memory_manager.store import MemoryOperationError


def _decode(raw: bytes) -> dict:
    reply = protocol.ControlReply.model_validate_json(raw)
    if not reply.ok:
        raise MemoryOperationError(reply.error or "control request failed", reply.status)
    return reply.result


class ControlClient:
    """Blocking request/reply to the scheduler's MSA service. One request at a time."""

    def __init__(self, port: int, timeout_s: float = 60.0):
        self.address = protocol.control_address(port)
        self.timeout_ms = int(timeout_s * 1000)
        self._context = zmq.Context.instance()

    def request(self, message: protocol._Message) -> dict:
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        try:
            socket.connect(self.address)
            socket.send(message.model_dump_json().encode())
            return _decode(socket.recv())
        except zmq.Again as exc:
            raise MemoryOperationError(f"the scheduler's MSA service did not answer at {self.address}", 503) from exc
        finally:
            socket.close()


class AsyncControlClient:
    """The same over asyncio, for the HTTP routes (one socket per call: REQ sockets are strict)."""

    def __init__(self, port: int, timeout_s: float = 60.0):
        self.address = protocol.control_address(port)
        self.timeout_s = timeout_s
        self._context = zmq.asyncio.Context.instance()

    async def request(self, message: protocol._Message) -> dict:
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(self.address)
            await socket.send(message.model_dump_json().encode())
            if not await socket.poll(int(self.timeout_s * 1000)):
                raise MemoryOperationError(f"the scheduler's MSA service did not answer at {self.address}", 503)
            return _decode(await socket.recv())
        finally:
            socket.close()
