"""Run token prompts through `sglang.Engine` in a fresh process, one engine after another in the
same interpreter; print each one's greedy output ids as JSON.

Usage: python engine_runner.py BACKEND MAX_NEW_TOKENS 'JSON {name: [model_dir, list of input-id lists]}'
(prints the JSON {name: {"attention_backend", "output_ids"}} last)
(The Engine spawns processes, so it runs here under a __main__ guard, not inside pytest.)
"""

from __future__ import annotations

import json
import sys


def greedy(model_dir: str, backend: str, max_new_tokens: int, input_ids: list[list[int]]) -> dict:
    import sglang

    engine = sglang.Engine(
        model_path=model_dir,
        attention_backend=backend,
        device="cpu",
        max_total_tokens=4096,
        log_level="warning",
    )
    try:
        params = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}
        outputs = engine.generate(input_ids=input_ids, sampling_params=params)
        return {"attention_backend": engine.server_args.attention_backend,
                "output_ids": [out["output_ids"] for out in outputs]}
    finally:
        engine.shutdown()


def main() -> None:
    backend, max_new_tokens = sys.argv[1], int(sys.argv[2])
    runs = json.loads(sys.argv[3])
    print(json.dumps({name: greedy(model_dir, backend, max_new_tokens, input_ids)
                      for name, (model_dir, input_ids) in runs.items()}))


if __name__ == "__main__":
    main()
