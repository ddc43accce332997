"""The entry point really registers `msa` (SGLang swallows plugin errors, so assert it here)."""

from __future__ import annotations

import importlib.metadata


def test_entry_point_is_declared():
    entry_points = importlib.metadata.entry_points(group="sglang.srt.plugins")
    assert "sglang_msa.plugin:register" in {ep.value for ep in entry_points if ep.name == "msa"}


def test_load_plugins_registers_msa_idempotently():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins

    from sglang_msa import plugin

    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry
    from transformers import AutoConfig

    from sglang_msa.models.msa import MSAForCausalLM
    from sglang_msa.models.msa_config import MSAConfig

    load_plugins()
    assert "msa" in ATTENTION_BACKEND_CHOICES
    assert ATTENTION_BACKENDS["msa"] is plugin.create_msa_backend
    assert ModelRegistry.models["MSAForCausalLM"] is MSAForCausalLM
    assert type(AutoConfig.for_model("msa")) is MSAConfig
    # hooks that failed to apply would only be logged by SGLang
    assert {plugin._COMPATIBILITY_TARGET, plugin._ADMISSION_TARGET, plugin._CLI_ARGS_TARGET,
            plugin._FROM_CLI_TARGET, plugin._GROUP_TARGET, plugin._LOCAL_REQUESTS_TARGET,
            plugin._PROCESS_INPUT_TARGET, plugin._ABORT_TARGET} <= HookRegistry._patched
    plugin.register()  # SGLang runs it once per process; a second call must change nothing
    plugin.register()
    assert ATTENTION_BACKEND_CHOICES.count("msa") == 1


def resolve_case(*args: str) -> dict:
    return {"kind": "resolve", "args": ["--model-path", "{tiny_llama}", "--device", "cpu", *args]}


# Resolved in one fresh interpreter for the whole session (conftest.py, server_args_runner.py).
PREFILL_DECODE_CASES = {("msa",): "1", ("msa", "--prefill-decode-interval", "0"): "0",
                        ("msa", "--prefill-decode-interval", "4"): "4", ("triton",): "0"}
REFUSAL_CASES = {("--dp", "2"): "--dp 2 is not supported", ("--pp-size", "2"): "--pp-size 2 is not supported",
                 ("--tp", "2"): None, ("--tp", "2", "--msa-memory-dir", "/tmp/sglang-msa-unused"): None}
SERVER_ARGS_CASES = {
    "cli": {"kind": "parse", "args": ["--model-path", "x", "--attention-backend", "msa"]},
    **{f"cuda-graphs {name}": resolve_case("--attention-backend", name) for name in ("msa", "triton")},
    **{f"interval {' '.join(args)}": resolve_case("--attention-backend", args[0], *args[1:])
       for args in PREFILL_DECODE_CASES},
    **{f"refusal {' '.join(args)}": resolve_case("--attention-backend", "msa", *args)
       for args in REFUSAL_CASES},
}


def resolved(server_args: dict, name: str) -> dict:
    outputs = server_args[name]
    assert "error" not in outputs, outputs.get("error", "")[-2000:]
    return outputs


def test_cli_accepts_msa_only_through_the_plugin(server_args):
    """`--attention-backend msa` parses with the plugin loaded (a fresh process, as SGLang runs it)."""
    assert resolved(server_args, "cli")["attention_backend"] == "msa"


def test_msa_resolves_cuda_graphs_off(server_args):
    """SGLang keeps decode CUDA graphs on for unknown backends; the plugin turns them off for msa."""
    outputs = {name: resolved(server_args, f"cuda-graphs {name}")["cuda_graphs"]
               for name in ("msa", "triton")}
    assert outputs["msa"] == ["disabled", "disabled"]
    assert outputs["triton"][0] != "disabled"  # the hook touches msa only


def test_msa_decodes_between_prefills_unless_told_otherwise(server_args):
    """A stream of ingestions (prefills) must not starve running queries' decode: for msa the
    plugin resolves --prefill-decode-interval to 1 when the user left it unset, and keeps the
    user's value otherwise; other backends keep SGLang's default (0)."""
    for args, expected in PREFILL_DECODE_CASES.items():
        outputs = resolved(server_args, f"interval {' '.join(args)}")
        assert outputs["prefill_decode_interval"] == expected, (args, outputs)


def test_msa_refuses_what_memory_parallel_does_not_cover_with_a_clear_message(server_args):
    """Memories shard over the tensor-parallel group only: --dp 2 and --pp-size 2 are refused at
    start-up naming the flag (instead of failing later in a scheduler); --tp 2, with or without a
    memory directory, resolves."""
    for args, refusal in REFUSAL_CASES.items():
        outputs = server_args[f"refusal {' '.join(args)}"]
        if refusal is None:
            assert "error" not in outputs, (args, outputs.get("error", "")[-1500:])
        else:
            assert refusal in outputs.get("error", ""), (args, outputs)
