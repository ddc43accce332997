"""One memory, one question, over HTTP.  Usage: python examples/quickstart.py --url http://127.0.0.1:30000"""

import argparse

import requests

parser = argparse.ArgumentParser()
parser.add_argument("--url", default="http://127.0.0.1:30000")
url = parser.parse_args().url

requests.post(f"{url}/v1/memories", json={"memory_id": "quickstart"}).raise_for_status()
requests.post(f"{url}/v1/memories/quickstart/documents", json={"documents": [
    {"doc_id": "meeting", "text": "The team meeting is on Monday at ten in room 4."},
    {"doc_id": "lunch", "text": "Lunch on Fridays is pizza in the courtyard."},
]}).raise_for_status()
reply = requests.post(f"{url}/v1/memories/quickstart/chat/completions", json={
    "messages": [{"role": "user", "content": "When is the team meeting?"}],
    "max_tokens": 32, "temperature": 0, "msa": {"inject_documents": 1},
}).json()
print("answer:", reply["choices"][0]["message"]["content"])
print("retrieved:", [d["doc_id"] for d in reply["msa"]["retrieved"]])
requests.delete(f"{url}/v1/memories/quickstart").raise_for_status()
