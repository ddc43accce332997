"""The official OpenAI client with base_url pointing at a memory.
Usage: python examples/openai_client.py --url http://127.0.0.1:30000"""

import argparse

import openai
import requests

parser = argparse.ArgumentParser()
parser.add_argument("--url", default="http://127.0.0.1:30000")
url = parser.parse_args().url

requests.post(f"{url}/v1/memories", json={"memory_id": "handbook"}).raise_for_status()
requests.post(f"{url}/v1/memories/handbook/documents", json={"documents": [
    {"text": "Holiday requests go to the people team two weeks ahead."},
    {"text": "Expenses are reimbursed on the last working day of each month."},
]}).raise_for_status()

client = openai.OpenAI(base_url=f"{url}/v1/memories/handbook", api_key="not-needed")
completion = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": "When are expenses reimbursed?"}],
    max_tokens=32, temperature=0, extra_body={"msa": {"inject_documents": 1}},
)
print("answer:", completion.choices[0].message.content)
print("retrieved:", completion.model_extra["msa"]["retrieved"])
stream = client.chat.completions.create(
    model="default", messages=[{"role": "user", "content": "When are expenses reimbursed?"}],
    max_tokens=32, temperature=0, stream=True,
)
print("streamed:", "".join(chunk.choices[0].delta.content or "" for chunk in stream))
requests.delete(f"{url}/v1/memories/handbook").raise_for_status()
