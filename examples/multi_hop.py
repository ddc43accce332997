"""Multi-hop over a memory with two injection rounds: the second round routes on the text the
first one injected, so a chain "X's mentor is Y" -> "Y was born in Z" can be followed.
Usage: python examples/multi_hop.py --url http://127.0.0.1:30000"""

import argparse

import requests

from sglang_msa.evaluation.generators import multihop_task

parser = argparse.ArgumentParser()
parser.add_argument("--url", default="http://127.0.0.1:30000")
url = parser.parse_args().url

task = multihop_task(num_chains=3, filler_docs=6, seed=0)
requests.post(f"{url}/v1/memories", json={"memory_id": "chains"}).raise_for_status()
requests.post(f"{url}/v1/memories/chains/documents", json={
    "documents": [{"doc_id": d.doc_id, "text": d.text} for d in task.documents]}).raise_for_status()
for question in task.questions:
    reply = requests.post(f"{url}/v1/memories/chains/chat/completions", json={
        "messages": [{"role": "user", "content": question.question}], "max_tokens": 24, "temperature": 0,
        "msa": {"inject_documents": 2, "inject_rounds": 2},
    }).json()
    rounds = [[d["doc_id"] for d in round_docs] for round_docs in reply["msa"]["injection_rounds"]]
    print(f"{question.question} gold={question.gold_doc_ids} rounds={rounds}")
    print(f"  answer: {reply['choices'][0]['message']['content']!r} (expected {question.answers[0]})")
requests.delete(f"{url}/v1/memories/chains").raise_for_status()
