"""Two memories with conflicting facts on one server: each answer comes from its own memory.
Usage: python examples/multi_tenant.py --url http://127.0.0.1:30000"""

import argparse

import requests

parser = argparse.ArgumentParser()
parser.add_argument("--url", default="http://127.0.0.1:30000")
url = parser.parse_args().url

for tenant, colour in (("tenant-red", "red"), ("tenant-blue", "blue")):
    requests.post(f"{url}/v1/memories", json={"memory_id": tenant}).raise_for_status()
    requests.post(f"{url}/v1/memories/{tenant}/documents", json={"documents": [
        {"doc_id": f"{tenant}-car", "text": f"The company car is {colour}."},
        {"doc_id": f"{tenant}-door", "text": f"The office door is painted {colour}."},
    ]}).raise_for_status()
for tenant in ("tenant-red", "tenant-blue"):
    reply = requests.post(f"{url}/v1/memories/{tenant}/chat/completions", json={
        "messages": [{"role": "user", "content": "What colour is the company car?"}], "max_tokens": 16,
        "temperature": 0, "msa": {"inject_documents": 1},
    }).json()
    retrieved = [d["doc_id"] for d in reply["msa"]["retrieved"]]
    assert all(doc_id.startswith(tenant) for doc_id in retrieved), retrieved
    print(f"{tenant}: {reply['choices'][0]['message']['content']!r} from {retrieved}")
    requests.delete(f"{url}/v1/memories/{tenant}").raise_for_status()
