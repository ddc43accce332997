"""SGLang frontend DSL over a memory.

`MemoryEndpoint` is a `RuntimeEndpoint` whose every request (`sgl.gen`, `sgl.select`, forks)
runs over one memory of the msa server; `retrieve` lets a program drive retrieval itself:

    import sglang as sgl
    from sglang_msa.frontend import MemoryEndpoint, retrieve

    @sgl.function
    def answer(s, question, documents):
        s += "Documents:\\n" + "\\n".join(documents) + "\\nQuestion: " + question + "\\nAnswer:"
        s += sgl.gen("answer", max_tokens=32, temperature=0)

    endpoint = MemoryEndpoint("http://127.0.0.1:30000", "notes")
    documents = [d["text"] for d in retrieve(endpoint, "When is the meeting?", k=2)]
    state = answer.run(question="When is the meeting?", documents=documents, backend=endpoint)
"""

from __future__ import annotations

import requests
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint


class MemoryEndpoint(RuntimeEndpoint):
    """A RuntimeEndpoint bound to `memory_id`: requests carry `custom_params["msa"]`."""

    def __init__(self, base_url: str, memory_id: str, **kwargs):
        super().__init__(base_url, **kwargs)
        self.memory_id = memory_id

    def _add_images(self, s, data):  # every /generate payload of the endpoint passes here
        super()._add_images(s, data)
        params = data.setdefault("sampling_params", {})
        params["custom_params"] = {**(params.get("custom_params") or {}),
                                   "msa": {"op": "query", "memory_id": self.memory_id}}


def retrieve(endpoint: MemoryEndpoint, query: str, k: int = 4, timeout_s: float = 300) -> list[dict]:
    """The memory's top-k documents for `query` by the server's routing (one routing prefill):
    each as {"doc_id", "gid", "text"}, best first."""
    base = f"{endpoint.base_url}/v1/memories/{endpoint.memory_id}"
    response = requests.post(f"{base}/generate", json={
        "text": query, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}, timeout=timeout_s)
    response.raise_for_status()
    documents = []
    for doc in response.json()["msa"]["retrieved"][:k]:
        record = requests.get(f"{base}/documents/{doc['doc_id']}", timeout=timeout_s)
        record.raise_for_status()
        documents.append({"doc_id": doc["doc_id"], "gid": doc["gid"], "text": record.json()["text"]})
    return documents
