"""A streaming chat client for the quality benchmark: the answer, the time to its first token, and
the final event's `msa` report (memory chats), over SGLang's and the memory API's OpenAI routes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

import requests


@dataclass(frozen=True)
class StreamedChat:
    text: str
    ttft_s: float | None  # None: no content arrived
    msa: dict  # the memory API's report from the last event ({} for plain chats)


def parse_events(lines: Iterable[bytes | str], started: float, clock=time.perf_counter) -> StreamedChat:
    """Read `data: {...}` server-sent events until `[DONE]`; an error event raises RuntimeError."""
    text, ttft, msa = "", None, {}
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):].strip()
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"stream error: {event['error']}")
        for choice in event.get("choices", []):
            content = (choice.get("delta") or {}).get("content") or ""
            if content and ttft is None:
                ttft = clock() - started
            text += content
        msa = event.get("msa", msa)
    return StreamedChat(text, ttft, msa)


class ChatClient:
    """Streams chats; asks for `msa.explain_doc_ids` until a server refuses the field (HTTP 422
    naming it), then goes on without it (`explains` turns False)."""

    def __init__(self, base_url: str, max_tokens: int):
        self.base_url, self.max_tokens, self.explains = base_url, max_tokens, True

    def chat(self, path: str, content: str, msa: dict | None = None) -> StreamedChat:
        payload = {"model": "default", "messages": [{"role": "user", "content": content}], "temperature": 0,
                   "max_tokens": self.max_tokens, "stream": True}
        if msa is not None:
            if not self.explains:
                msa = {k: v for k, v in msa.items() if k != "explain_doc_ids"}
            payload["msa"] = msa
        started = time.perf_counter()
        with requests.post(f"{self.base_url}{path}", json=payload, stream=True, timeout=3600) as response:
            if response.status_code == 422 and "explain_doc_ids" in response.text and self.explains:
                self.explains = False
                return self.chat(path, content, msa)
            response.raise_for_status()
            return parse_events(response.iter_lines(), started)
