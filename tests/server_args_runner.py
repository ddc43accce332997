"""Resolve SGLang server arguments with the plugin loaded, in a fresh process, as SGLang runs it:
every case of the session in ONE interpreter (importing SGLang is most of the cost).

Test modules declare `SERVER_ARGS_CASES = {name: case}`; the session fixture `server_args`
(conftest.py) runs the cases of every collected module here once and hands each test its own.
A case is a dict:
- "kind": "parse" (argparse with SGLang's CLI: the parsed `attention_backend`), "prepare"
  (`prepare_server_args`: the `SGLANG_MSA_CONFIG` it leaves in the environment) or "resolve"
  (`prepare_server_args` + `resolve_once`: the resolved CUDA graph backends and
  prefill-decode interval);
- "args": the command line; "env": variables set for this case only.
A case answers its outputs, or {"error": the traceback and what it wrote to stderr}; the
environment is restored after each case.

Usage: python server_args_runner.py 'JSON {name: case}'  (prints the JSON {name: result} last)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback


def run_case(case: dict) -> dict:
    from sglang.srt.arg_groups.overrides import resolved_view
    from sglang.srt.server_args import ServerArgs, prepare_server_args

    if case["kind"] == "parse":
        import argparse

        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        return {"attention_backend": parser.parse_args(case["args"]).attention_backend}
    server_args = prepare_server_args(case["args"])
    if case["kind"] == "prepare":
        return {"msa_config_env": os.environ.get("SGLANG_MSA_CONFIG")}
    server_args.resolve_once()
    view = resolved_view(server_args)
    graphs = view.cuda_graph_config
    return {"cuda_graphs": [str(graphs.decode.backend), str(graphs.prefill.backend)],
            "prefill_decode_interval": str(view.prefill_decode_interval)}


def main() -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()
    results = {}
    for name, case in json.loads(sys.argv[1]).items():
        saved = dict(os.environ)
        os.environ.update(case.get("env", {}))
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                results[name] = run_case(case)
        except BaseException:  # noqa: BLE001 - argparse exits, the plugin raises: both are answers
            results[name] = {"error": traceback.format_exc() + stderr.getvalue()}
        finally:
            os.environ.clear()
            os.environ.update(saved)
    print(json.dumps(results))


def resolve_all(cases: dict[str, dict]) -> dict[str, dict]:
    """Run `cases` in one fresh interpreter; their results by name."""
    result = subprocess.run([sys.executable, __file__, json.dumps(cases)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
