"""Pydantic schemas of the memory API (requests are validated; errors name the field)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sglang_msa.memory_manager.protocol import MEMORY_ID_PATTERN

DOC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$"
JOB_ID_PATTERN = r"^[0-9a-f]{1,64}$"


class CreateMemoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    memory_id: str = Field(pattern=MEMORY_ID_PATTERN)
    placement: Literal["auto", "device", "host"] = Field(
        "auto",
        description="where the documents' content lives: 'device' (with the router keys), 'host' (host memory, "
        "copied to the device for the selected documents only; needs host_memory_budget_mb), or 'auto' (the "
        "device while it has room, then the host)",
    )


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    doc_id: str | None = Field(None, pattern=DOC_ID_PATTERN)


class AddDocumentsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    documents: list[DocumentIn] = Field(min_length=1)
    replace: bool = Field(
        False, description="a doc_id already stored with another text: replace it (default: 409). The same "
        "text is never stored twice either way",
    )


class DocumentOut(BaseModel):
    doc_id: str
    gid: int
    num_tokens: int
    existing: bool = Field(False, description="already stored with this text: not encoded again")
    replaced: bool = Field(False, description="replaced a stored document of this doc_id")


class AddDocumentsResponse(BaseModel):
    memory_id: str
    documents: list[DocumentOut]


class MemoryOptions(BaseModel):
    """Per-request memory options (the `msa` field of chat and generate requests)."""

    model_config = ConfigDict(extra="forbid")
    routing_text: str | None = Field(
        None, min_length=1, description="the prompt text whose tokens route (default: the last user message)"
    )
    routing_details: bool = Field(False, description="report each routed layer's selected documents and scores")
    explain_doc_ids: list[str] = Field(
        default_factory=list, max_length=16,
        description="documents of this memory to explain: their rank among all documents and score in every routed "
        "layer (why a document was or was not retrieved); single-rank servers",
    )
    routing_spans: list[tuple[int, int]] | None = Field(
        None, min_length=1,
        description="with input_ids: ascending, disjoint token index ranges [start, end) whose tokens route "
        "(default: all after the template)",
    )
    template_tokens: int | None = Field(
        None, ge=0, description="with input_ids: leading tokens that precede the memory (MSA template head)"
    )
    inject_documents: int = Field(
        0, ge=0, le=64,
        description="chat, training-free models: inject the original text of this many top-routed documents "
        "before the question (0: off)",
    )
    inject_rounds: int = Field(
        1, ge=1, le=4, description="injection rounds; a later round routes on the documents injected last"
    )
    interleave: bool = Field(
        False,
        description="MSA checkpoints: Memory Interleave — the model generates document ids, the server injects "
        "those documents' original text and routes again, round after round, then the model answers",
    )
    max_rounds: int | None = Field(
        None, ge=1, description="interleave: retrieval rounds at most (default and cap: the server's "
        "max_interleave_rounds)",
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str


class MemoryChatRequest(BaseModel):
    """The OpenAI chat-completions fields the memory endpoint honours (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str = "default"
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1
    msa: MemoryOptions = Field(default_factory=MemoryOptions)


class MemoryGenerateRequest(BaseModel):
    """SGLang-native generate over a memory: the prompt is text or token ids."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1)
    input_ids: list[int] | None = Field(None, min_length=1)
    sampling_params: dict = Field(default_factory=dict)
    return_logprob: bool = False
    logprob_start_len: int = Field(
        -1, ge=-1, description="with return_logprob: the first prompt position whose log-prob is returned "
        "(meta_info.input_token_logprobs; -1: output tokens only, as SGLang's /generate)",
    )
    top_logprobs_num: int = Field(0, ge=0, le=64)
    stream: Literal[False] = False
    msa: MemoryOptions = Field(default_factory=MemoryOptions)


class JobDocumentCounts(BaseModel):
    total: int
    stored: int = Field(description="encoded and acknowledged by this job")
    existing: int = Field(description="already stored with the same text (skipped)")
    failed: int
    pending: int


class JobTokens(BaseModel):
    total: int | None = Field(description="the submitted texts' tokens, counted when the job starts")
    done: int = Field(description="tokens of the documents stored or found existing")


class JobFailure(BaseModel):
    index: int
    doc_id: str
    status: int | None
    error: str | None


class IngestionJobStatus(BaseModel):
    """An ingestion job (`POST /v1/memories/{id}/documents?wait=false`)."""

    job_id: str
    memory_id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    documents: JobDocumentCounts
    tokens: JobTokens
    tokens_per_s: float | None = Field(description="encoding rate since this server process started the job")
    eta_s: float | None
    failures: list[JobFailure] = Field(description="the first failed documents, in submission order")
    created_at: float
    finished_at: float | None
