"""Control messages between the HTTP server process and the scheduler (JSON over ZMQ)."""

from __future__ import annotations

import os
import tempfile
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateMemory(_Message):
    op: Literal["create_memory"] = "create_memory"
    memory_id: str


class DropMemory(_Message):
    op: Literal["drop_memory"] = "drop_memory"
    memory_id: str


class RemoveDocument(_Message):
    op: Literal["remove_document"] = "remove_document"
    memory_id: str
    gid: int


class MemoryStats(_Message):
    op: Literal["memory_stats"] = "memory_stats"
    memory_id: str


class TakeReport(_Message):
    """The finished request's MSA outcome: a query's selections, or an ingestion's status."""

    op: Literal["take_report"] = "take_report"
    rid: str


ControlMessage = Annotated[
    Union[CreateMemory, DropMemory, RemoveDocument, MemoryStats, TakeReport],
    Field(discriminator="op"),
]
control_message_adapter = TypeAdapter(ControlMessage)


class ControlReply(_Message):
    ok: bool
    status: int = 200
    error: str | None = None
    result: dict = Field(default_factory=dict)


def control_address(port: int) -> str:
    """The scheduler's control socket for the server listening on `port`."""
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'sglang-msa-control-{port}.ipc')}"
