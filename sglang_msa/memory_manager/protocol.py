"""Control messages between the HTTP server process and the scheduler (JSON over ZMQ)."""

from __future__ import annotations

import os
import tempfile
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


# memory ids name directories of a memory directory: no separators, no leading dot
MEMORY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
MemoryId = Annotated[str, Field(pattern=MEMORY_ID_PATTERN)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateMemory(_Message):
    op: Literal["create_memory"] = "create_memory"
    memory_id: MemoryId
    owner: str | None = None  # the tenant whose grants reach it (API keys enabled)
    placement: Literal["auto", "device", "host"] = "auto"  # where its documents' content lives


class DropMemory(_Message):
    op: Literal["drop_memory"] = "drop_memory"
    memory_id: MemoryId


class RemoveDocument(_Message):
    op: Literal["remove_document"] = "remove_document"
    memory_id: MemoryId
    gid: int


class MemoryStats(_Message):
    op: Literal["memory_stats"] = "memory_stats"
    memory_id: MemoryId


class TakeReport(_Message):
    """The finished request's MSA outcome: a query's selections, or an ingestion's status."""

    op: Literal["take_report"] = "take_report"
    rid: str


class StoreStats(_Message):
    """Per memory: documents, tokens, chunks and bytes the scheduler holds."""

    op: Literal["store_stats"] = "store_stats"


class ListContents(_Message):
    """Every memory the scheduler holds and its document ids (start-up reconciliation)."""

    op: Literal["list_contents"] = "list_contents"


ControlMessage = Annotated[
    Union[CreateMemory, DropMemory, RemoveDocument, MemoryStats, TakeReport, ListContents, StoreStats],
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
