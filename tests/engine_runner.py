"""Run token prompts through `sglang.Engine` in a fresh process; print greedy output ids as JSON.

Usage: python engine_runner.py MODEL_DIR BACKEND MAX_NEW_TOKENS 'JSON list of input-id lists'
(The Engine spawns processes, so it runs here under a __main__ guard, not inside pytest.)
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import sglang

    model_dir, backend, max_new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    input_ids = json.loads(sys.argv[4])
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
        print(json.dumps({
            "attention_backend": engine.server_args.attention_backend,
            "output_ids": [out["output_ids"] for out in outputs],
        }))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
