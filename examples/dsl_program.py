"""A frontend-DSL program over a memory: the program retrieves, reads, then answers; a second
program runs its gen/select calls over the memory directly (MemoryEndpoint).
Usage: python examples/dsl_program.py --url http://127.0.0.1:30000"""

import argparse

import requests
import sglang as sgl

from sglang_msa.frontend import MemoryEndpoint, retrieve

parser = argparse.ArgumentParser()
parser.add_argument("--url", default="http://127.0.0.1:30000")
url = parser.parse_args().url

requests.post(f"{url}/v1/memories", json={"memory_id": "garden"}).raise_for_status()
requests.post(f"{url}/v1/memories/garden/documents", json={"documents": [
    {"doc_id": "roses", "text": "The roses in the east bed are yellow."},
    {"doc_id": "pond", "text": "The pond has six orange koi fish."},
]}).raise_for_status()


@sgl.function
def read_then_answer(s, question, documents):
    s += "Documents:\n" + "\n".join(documents) + "\nQuestion: " + question + "\nAnswer:"
    s += sgl.gen("answer", max_tokens=16, temperature=0)


@sgl.function
def over_memory(s, question):
    s += question + sgl.gen("answer", max_tokens=8, temperature=0)
    s += " Is that right? " + sgl.select("verdict", choices=["yes", "no"])


endpoint = MemoryEndpoint(url, "garden")
question = "What colour are the roses?"
documents = retrieve(endpoint, question, k=1)
state = read_then_answer.run(question=question, documents=[d["text"] for d in documents], backend=endpoint)
print("retrieved:", [d["doc_id"] for d in documents])
print("answer:", state["answer"].strip())
states = over_memory.run_batch([{"question": question}, {"question": "How many fish are in the pond?"}],
                               backend=endpoint)
print("over memory:", [(st["answer"].strip(), st["verdict"]) for st in states])
requests.delete(f"{url}/v1/memories/garden").raise_for_status()
