"""Exercise `EngineMemories` (the in-process Python API) on an sglang.Engine; print JSON results.

Usage: python engine_memories_runner.py MODEL_DIR PORT
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import sglang

    from sglang_msa.engine_memories import EngineMemories
    from sglang_msa.server.errors import APIError

    engine = sglang.Engine(model_path=sys.argv[1], attention_backend="msa", device="cpu", max_total_tokens=8192,
                           log_level="warning", port=int(sys.argv[2]))
    try:
        memories = EngineMemories(engine)
        results = {"create": memories.create("notes")}
        results["add"] = memories.add_documents(
            "notes", ["The meeting is on Monday.", {"text": "The budget is 42 coins.", "doc_id": "budget"}]
        )
        results["info"] = memories.info("notes")
        results["chat"] = memories.chat("notes", [{"role": "user", "content": "When is the meeting?"}],
                                        max_tokens=4, temperature=0, msa={"routing_details": True})
        generated = memories.generate("notes", text="The budget is", sampling_params={
            "max_new_tokens": 3, "temperature": 0}, return_logprob=True, logprob_start_len=0)
        results["generate"] = generated["msa"]
        results["prompt_logprobs"] = [len(generated["meta_info"]["input_token_logprobs"]),
                                      generated["meta_info"]["prompt_tokens"]]
        results["delete_doc"] = memories.delete_document("notes", "budget")
        results["after_delete"] = memories.generate("notes", text="The budget is", sampling_params={
            "max_new_tokens": 3, "temperature": 0})["msa"]
        try:
            memories.info("missing")
        except APIError as exc:
            results["missing"] = exc.body()
        results["list"] = memories.list()
        print(json.dumps(results))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
