"""Control messages between the HTTP server process and the scheduler (JSON over ZMQ)."""

from __future__ import annotations

import os
import tempfile
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


# memory ids (a tenant's names) and memory keys (an incarnation's key: the scheduler's and the
# memory directory's name for it): no separators, no leading dot
MEMORY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
MemoryId = Annotated[str, Field(pattern=MEMORY_ID_PATTERN)]
MemoryKey = Annotated[str, Field(pattern=MEMORY_ID_PATTERN)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateMemory(_Message):
    op: Literal["create_memory"] = "create_memory"
    memory_key: MemoryKey
    memory_id: MemoryId  # its name in its owner's namespace
    owner: str | None = None  # the tenant whose grants reach it (None: no API keys)
    placement: Literal["auto", "device", "host"] = "auto"  # where its documents' content lives


class DropMemory(_Message):
    op: Literal["drop_memory"] = "drop_memory"
    memory_key: MemoryKey


class RemoveDocument(_Message):
    """Forget a document, published or staged; its gid is never staged again."""

    op: Literal["remove_document"] = "remove_document"
    memory_key: MemoryKey
    gid: int


class PublishDocuments(_Message):
    """Staged documents whose acknowledgement is recorded: routing may select them now."""

    op: Literal["publish_documents"] = "publish_documents"
    memory_key: MemoryKey
    gids: list[int]


class DiscardDocuments(_Message):
    """Documents whose ingestion failed or will not be acknowledged: whatever was staged goes,
    and a request still under way for them can no longer stage them."""

    op: Literal["discard_documents"] = "discard_documents"
    memory_key: MemoryKey
    gids: list[int]


class MemoryStats(_Message):
    op: Literal["memory_stats"] = "memory_stats"
    memory_key: MemoryKey


class TakeReport(_Message):
    """The finished request's MSA outcome: a query's selections, or an ingestion's status."""

    op: Literal["take_report"] = "take_report"
    rid: str


class StoreStats(_Message):
    """Per memory: documents, tokens, chunks and bytes the scheduler holds."""

    op: Literal["store_stats"] = "store_stats"


class ListContents(_Message):
    """Every memory the scheduler holds (by key) and its document ids (start-up reconciliation)."""

    op: Literal["list_contents"] = "list_contents"


ControlMessage = Annotated[
    Union[CreateMemory, DropMemory, RemoveDocument, PublishDocuments, DiscardDocuments, MemoryStats, TakeReport,
          ListContents, StoreStats],
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
