"""The entry point really registers `msa` (SGLang swallows plugin errors, so assert it here)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


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


def test_cli_accepts_msa_only_through_the_plugin():
    """`--attention-backend msa` parses with the plugin loaded (a fresh process, as SGLang runs it)."""
    code = (
        "from sglang.srt.plugins import load_plugins; load_plugins();"
        "import argparse; from sglang.srt.server_args import ServerArgs;"
        "p = argparse.ArgumentParser(); ServerArgs.add_cli_args(p);"
        "a = p.parse_args(['--model-path', 'x', '--attention-backend', 'msa']);"
        "print(a.attention_backend)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "msa"


def test_msa_resolves_cuda_graphs_off(tiny_llama):
    """SGLang keeps decode CUDA graphs on for unknown backends; the plugin turns them off for msa."""
    code = (
        "import sys; from sglang.srt.plugins import load_plugins; load_plugins();"
        "from sglang.srt.server_args import prepare_server_args;"
        "from sglang.srt.arg_groups.overrides import resolved_view;"
        "sa = prepare_server_args(['--model-path', sys.argv[1], '--attention-backend', sys.argv[2], '--device', 'cpu']);"
        "sa.resolve_once(); cfg = resolved_view(sa).cuda_graph_config;"
        "print(cfg.decode.backend, cfg.prefill.backend)"
    )
    outputs = {}
    for backend in ("msa", "triton"):
        result = subprocess.run(
            [sys.executable, "-c", code, str(tiny_llama), backend], capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[backend] = result.stdout.strip().splitlines()[-1].split()
    assert outputs["msa"] == ["disabled", "disabled"]
    assert outputs["triton"][0] != "disabled"  # the hook touches msa only


def test_msa_decodes_between_prefills_unless_told_otherwise(tiny_llama):
    """A stream of ingestions (prefills) must not starve running queries' decode: for msa the
    plugin resolves --prefill-decode-interval to 1 when the user left it unset, and keeps the
    user's value otherwise; other backends keep SGLang's default (0)."""
    code = (
        "import sys; from sglang.srt.plugins import load_plugins; load_plugins();"
        "from sglang.srt.server_args import prepare_server_args;"
        "from sglang.srt.arg_groups.overrides import resolved_view;"
        "sa = prepare_server_args(['--model-path', sys.argv[1], '--attention-backend', sys.argv[2], '--device', 'cpu']"
        " + sys.argv[3:]);"
        "sa.resolve_once(); print(resolved_view(sa).prefill_decode_interval)"
    )
    cases = {("msa",): "1", ("msa", "--prefill-decode-interval", "0"): "0",
             ("msa", "--prefill-decode-interval", "4"): "4", ("triton",): "0"}
    for args, expected in cases.items():
        result = subprocess.run([sys.executable, "-c", code, str(tiny_llama), *args], capture_output=True, text=True,
                                timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == expected, (args, result.stdout[-500:])


def test_msa_refuses_what_memory_parallel_does_not_cover_with_a_clear_message(tiny_llama):
    """Memories shard over the tensor-parallel group only: --dp 2 and --pp-size 2 are refused at
    start-up naming the flag (instead of failing later in a scheduler); --tp 2, with or without a
    memory directory, resolves."""
    code = (
        "import sys; from sglang.srt.plugins import load_plugins; load_plugins();"
        "from sglang.srt.server_args import prepare_server_args;"
        "sa = prepare_server_args(['--model-path', sys.argv[1], '--attention-backend', 'msa', '--device', 'cpu']"
        " + sys.argv[2:]); sa.resolve_once(); print('resolved')"
    )
    cases = {("--dp", "2"): "--dp 2 is not supported", ("--pp-size", "2"): "--pp-size 2 is not supported",
             ("--tp", "2"): None, ("--tp", "2", "--msa-memory-dir", "/tmp/sglang-msa-unused"): None}
    for args, refusal in cases.items():
        result = subprocess.run([sys.executable, "-c", code, str(tiny_llama), *args], capture_output=True,
                                text=True, timeout=180)
        if refusal is None:
            assert result.returncode == 0 and "resolved" in result.stdout, result.stderr[-1500:]
        else:
            assert result.returncode != 0 and refusal in result.stderr, (args, result.stderr[-1500:])
