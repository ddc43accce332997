"""Client side of the control channel (the process serving the memory API: HTTP server or Engine)."""

from __future__ import annotations

import zmq.asyncio

from sglang_msa.memory_manager import protocol
from sglang_msa.memory_manager.store import MemoryOperationError


def _decode(raw: bytes) -> dict:
    reply = protocol.ControlReply.model_validate_json(raw)
    if not reply.ok:
        raise MemoryOperationError(reply.error or "control request failed", reply.status)
    return reply.result


class AsyncControlClient:
    """Request/reply to the scheduler's MSA service over asyncio (one socket per call: REQ
    sockets are strict)."""

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
