"""The scheduler's per-request MSA states: what leaves on an abort (SGLang's rid-prefix matching)
and that every state leaving releases its selections' pins through `on_leave`."""

from __future__ import annotations

from sglang_msa.memory_manager.requests import IngestParams, IngestState, RequestRegistry


def registry_with(rids: list[str]) -> tuple[RequestRegistry, list[int]]:
    left: list[int] = []
    registry = RequestRegistry(on_leave=lambda state: left.append(state.params.gid))
    for gid, rid in enumerate(rids):
        registry.put(rid, IngestState(IngestParams(op="ingest", memory_key="m", gid=gid, grant="-"), num_tokens=1))
    return registry, left


def test_an_abort_removes_the_states_its_rid_prefixes():
    registry, left = registry_with(["chat-1", "chat-1-round2", "chat-10", "chat-2"])
    assert registry.pop_prefixed("chat-1") == 3  # SGLang aborts every rid starting with the given one
    assert sorted(left) == [0, 1, 2] and len(registry) == 1 and registry.get("chat-2") is not None
    assert registry.pop_prefixed("nothing") == 0 and len(registry) == 1


def test_abort_all_removes_every_state():
    registry, left = registry_with(["a", "b", "c"])
    assert registry.pop_prefixed("") == 3 and len(registry) == 0 and sorted(left) == [0, 1, 2]
