"""Per-request MSA state in the scheduler, keyed by request id.

A request takes part in MSA through `sampling_params.custom_params["msa"]` (a JSON object that
survives SGLang's IPC), validated here when the scheduler receives the request:

- `{"op": "query", "memory_key": ..., "grant": ..., "routing_spans": [[start, end], ...],
  "template_tokens": T}`: a question over a memory; the tokens of the spans route (role 0 of the
  spec: the question, and in later interleave rounds also the newest injected documents).
  Routing runs once at prefill in every routed layer; the selection is frozen for decode. The
  memory API names the memory incarnation it resolved (`memory_key`) with its grant; without
  API keys, SGLang's own endpoints (the frontend DSL) may name the memory instead (`memory_id`).
- `{"op": "ingest", "memory_key": ..., "gid": ..., "grant": ...}`: the request's prompt is one
  document; its routed layers are pooled and the document staged in the memory when its prefill
  completes (the memory API alone ingests: the grant is required).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from sglang_msa.memory_manager.store import LayerTensors

CUSTOM_PARAMS_KEY = "msa"


class QueryParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["query"] = "query"
    memory_id: str | None = Field(None, min_length=1, description="the memory's name (without API keys)")
    memory_key: str | None = Field(None, min_length=1, description="the memory incarnation (the memory API's)")
    routing_spans: list[tuple[int, int]] | None = Field(
        None, min_length=1,
        description="token index ranges [start, end) whose tokens route; default: every token after the template",
    )
    template_tokens: int = Field(0, ge=0, description="leading prompt tokens that precede the memory")
    grant: str | None = Field(None, description="the memory API's grant for memory_key (grants.py)")
    explain_gids: list[int] = Field(
        default_factory=list, max_length=16,
        description="documents of this memory whose rank and score every routed layer reports",
    )

    @model_validator(mode="after")
    def _one_memory(self):
        if (self.memory_id is None) == (self.memory_key is None):
            raise ValueError("name the memory by exactly one of memory_id and memory_key")
        return self

    def spans_within(self, prompt_len: int) -> list[tuple[int, int]] | str:
        """The routing spans, or why they are invalid for a prompt of prompt_len tokens: each
        non-empty, after the template, inside the prompt, ascending and disjoint."""
        spans = self.routing_spans or [(self.template_tokens, prompt_len)]
        lower = self.template_tokens
        for start, end in spans:
            if not lower <= start < end <= prompt_len:
                return (f"routing_spans {[list(s) for s in spans]} must be ascending, disjoint, non-empty ranges "
                        f"within the prompt's tokens [{self.template_tokens}, {prompt_len})")
            lower = end
        return [tuple(span) for span in spans]


class IngestParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    op: Literal["ingest"]
    memory_key: str = Field(min_length=1)
    gid: int = Field(ge=0)
    grant: str = Field(description="the memory API's grant (grants.py)")


RequestParams = Annotated[Union[QueryParams, IngestParams], Field(discriminator="op")]
_params_adapter = TypeAdapter(RequestParams)


def parse_request_params(value) -> QueryParams | IngestParams:
    return _params_adapter.validate_python(value)


@dataclass(frozen=True)
class SlotRows:
    """Selected rows read in place: a device pool's K and V buffers of one layer, and the rows'
    slots in them (int32, on the device), in selection order."""

    key_buffer: torch.Tensor  # [slots, Hkv, d]
    value_buffer: torch.Tensor
    slots: torch.Tensor  # [M]

    def same_buffers(self, other: "SlotRows") -> bool:
        return (self.key_buffer.data_ptr(), self.value_buffer.data_ptr()) == (
            other.key_buffer.data_ptr(), other.value_buffer.data_ptr())


@dataclass
class LayerSelection:
    """What one routed layer selected for one request, frozen for its decode steps: the rows
    gathered (`memory_k` / `memory_v`), or, for the Triton path over device-tier content, where
    they are (`in_place`). Rows gathered on a GPU are written on a side stream (host-tier content
    crosses PCIe while the layer's dense attention runs); `ready` marks their end, and
    `gathered()` orders the reader's stream after it."""

    gids: list[int]
    scores: list[float]
    memory_k: torch.Tensor | None  # [M, Hkv, d] the selected documents' chunks (or tokens), back to back
    memory_v: torch.Tensor | None
    in_place: SlotRows | None = None
    pinned: list = field(default_factory=list)  # store documents kept from slot reuse while this is read in place
    ready: "torch.cuda.Event | None" = None  # recorded on the side stream after memory_k / memory_v are written
    # every document's score in this layer (the routed view's gids, float32 on the CPU), taken by
    # `QueryState.record_scores` right after routing; None under Memory Parallel (scores are per shard)
    doc_scores: "DocScores | None" = None

    @property
    def num_rows(self) -> int:
        return self.in_place.slots.shape[0] if self.in_place is not None else self.memory_k.shape[0]

    def held_bytes(self) -> int:
        """Bytes of the rows this selection holds as tensors of its own (none when read in place)."""
        if self.memory_k is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.memory_k, self.memory_v))

    def report_only(self) -> "LayerSelection":
        """The documents and scores alone, for a request that finished (no rows, no pins)."""
        return LayerSelection(gids=self.gids, scores=self.scores, memory_k=None, memory_v=None)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows as tensors of their own, readable on the current stream."""
        if self.in_place is None:
            if self.ready is not None:
                torch.cuda.current_stream(self.memory_k.device).wait_event(self.ready)
            return self.memory_k, self.memory_v
        slots = self.in_place.slots.long()
        return self.in_place.key_buffer[slots], self.in_place.value_buffer[slots]


@dataclass(frozen=True)
class DocScores:
    gids: list[int]
    scores: torch.Tensor  # [len(gids)] float32, CPU


RANKED_DOCUMENTS = 64  # documents a report ranks by their standardized scores summed over layers


def standardized(scores: torch.Tensor) -> torch.Tensor:
    """Scores as z-scores over the memory's documents (centred only when they do not vary)."""
    centred = scores - scores.mean()
    spread = scores.std() if scores.numel() > 1 else scores.new_zeros(())
    return centred / spread if float(spread) > 0 else centred


@dataclass
class QueryState:
    params: QueryParams
    prompt_len: int
    position_offset: int
    routing_spans: list[tuple[int, int]]
    selections: dict[int, LayerSelection] = field(default_factory=dict)
    last_access: float = field(default_factory=time.monotonic)
    # the sum over routed layers of every document's standardized score (gids in zsum_gids order)
    zsum_gids: list[int] | None = None
    zsum: torch.Tensor | None = None
    explained: dict[int, dict[str, dict]] = field(default_factory=dict)  # gid -> layer -> rank, score, of
    text_query: torch.Tensor | None = None  # external router: the routing text's embedding [1, 1, dim]

    def record_scores(self, layer_id: int, doc_scores: DocScores) -> None:
        """Fold one layer's scores of every document into the z-sum ranking and the explained ranks."""
        z = standardized(doc_scores.scores)
        if self.zsum is None:
            self.zsum_gids, self.zsum = list(doc_scores.gids), z.clone()
        elif doc_scores.gids == self.zsum_gids:
            self.zsum += z
        else:  # the memory changed between layers: add where the documents match
            index = {gid: i for i, gid in enumerate(self.zsum_gids)}
            for gid, value in zip(doc_scores.gids, z.tolist()):
                if gid in index:
                    self.zsum[index[gid]] += value
        if self.params.explain_gids:
            position = {gid: i for i, gid in enumerate(doc_scores.gids)}
            for gid in self.params.explain_gids:
                if gid in position:
                    score = doc_scores.scores[position[gid]]
                    self.explained.setdefault(gid, {})[str(layer_id)] = {
                        "rank": 1 + int((doc_scores.scores > score).sum()), "score": round(float(score), 6),
                        "num_documents": len(doc_scores.gids)}

    def ranked_gids(self) -> list[int]:
        """Documents for injection, best first: by standardized scores summed over the routed
        layers where every document was scored (the layers' selections alone keep a document's
        evidence from the layers that did not select it); else the union of the selections."""
        if self.zsum is None:
            return ranked_union(self.selections)
        best = torch.argsort(self.zsum, descending=True, stable=True)[:RANKED_DOCUMENTS]
        return [self.zsum_gids[i] for i in best.tolist()]

    def report(self) -> dict:
        """Per routed layer: the selected document ids and scores, best first; the documents
        any layer selected (`retrieved_gids`, what attention read); the documents ranked for
        injection; the explained documents' ranks."""
        return {
            "layers": {
                str(layer): {"doc_gids": sel.gids, "scores": [round(s, 6) for s in sel.scores]}
                for layer, sel in sorted(self.selections.items())
            },
            "retrieved_gids": ranked_union(self.selections),
            "ranked_gids": self.ranked_gids(),
            "explain": self.explained,
        }


@dataclass
class IngestState:
    params: IngestParams
    num_tokens: int
    pooled: dict[int, LayerTensors] = field(default_factory=dict)  # per routed layer, once its prefill completes
    # per routed layer, the router keys of the passes so far (chunked prefill; MSA checkpoints)
    router_keys: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    text_chunk_keys: torch.Tensor | None = None  # external router: per chunk its text's embedding [chunks, 1, dim]
    stored: bool = False  # staged in the memory, awaiting the server's publish or discard
    error: str | None = None  # why it was not stored
    error_status: int | None = None  # and the HTTP status that maps to (404 memory gone, 507 budget, ...)
    last_access: float = field(default_factory=time.monotonic)


def ranked_union(selections: dict[int, LayerSelection]) -> list[int]:
    """Documents selected by any layer: most layers first, then best average rank, then id."""
    votes: dict[int, list[int]] = {}
    for sel in selections.values():
        for rank, gid in enumerate(sel.gids):
            votes.setdefault(gid, []).append(rank)
    return sorted(votes, key=lambda gid: (-len(votes[gid]), sum(votes[gid]) / len(votes[gid]), gid))


class RequestRegistry:
    """rid -> QueryState | IngestState. Entries leave when the server takes the request's report,
    when SGLang aborts the request, or after `ttl_s` without access (requests sent straight to
    /generate have no reader: their query states are cut down to the report when they finish);
    `on_leave` is called with each state that leaves."""

    def __init__(self, ttl_s: float = 3600.0, on_leave: Callable[[QueryState | IngestState], None] | None = None):
        self.ttl_s = ttl_s
        self.on_leave = on_leave
        self._states: dict[str, QueryState | IngestState] = {}
        self._lock = threading.Lock()

    def put(self, rid: str, state: QueryState | IngestState) -> None:
        with self._lock:
            self._expire()
            self._states[rid] = state

    def get(self, rid: str) -> QueryState | IngestState | None:
        with self._lock:
            state = self._states.get(rid)
            if state is not None:
                state.last_access = time.monotonic()
            return state

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def held_bytes(self) -> int:
        """Bytes of selected rows the query states hold (`LayerSelection.held_bytes`)."""
        with self._lock:
            states = list(self._states.values())
        return sum(sel.held_bytes() for state in states if isinstance(state, QueryState)
                   for sel in list(state.selections.values()))

    def pop(self, rid: str) -> QueryState | IngestState | None:
        with self._lock:
            state = self._states.pop(rid, None)
        self._left([state] if state is not None else [])
        return state

    def pop_prefixed(self, prefix: str) -> int:
        """Remove every state whose rid starts with `prefix` (SGLang's abort matching; "" is all
        of them); how many left."""
        with self._lock:
            rids = [rid for rid in self._states if rid.startswith(prefix)]
            states = [self._states.pop(rid) for rid in rids]
        self._left(states)
        return len(states)

    def _left(self, states: list) -> None:
        if self.on_leave is not None:
            for state in states:
                self.on_leave(state)

    def _expire(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        self._left([self._states.pop(rid) for rid in
                    [rid for rid, state in self._states.items() if state.last_access < deadline]])
