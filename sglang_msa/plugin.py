"""Registration of sglang-msa with SGLang (entry point `sglang.srt.plugins: msa`).

SGLang calls `register()` in every process it starts (launcher, scheduler, detokenizer), and
swallows exceptions raised here, so every step is idempotent and the tests assert the result.
Heavy modules (the backend itself) are imported lazily inside the factories.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os

from sglang_msa import BACKEND_NAME

logger = logging.getLogger(__name__)

_COMPATIBILITY_TARGET = "sglang.srt.arg_groups.attention_hook.handle_attention_backend_compatibility"
_ADMISSION_TARGET = "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue"
_CLI_ARGS_TARGET = "sglang.srt.server_args.ServerArgs.add_cli_args"
_FROM_CLI_TARGET = "sglang.srt.server_args.ServerArgs.from_cli_args"
_HTTP_LAUNCH_TARGET = "sglang.srt.entrypoints.http_server.launch_server"
_LOCAL_REQUESTS_TARGET = "sglang.srt.managers.scheduler.Scheduler._poll_timeout_aborts"
_ABORT_TARGET = "sglang.srt.managers.scheduler.Scheduler.abort_request"
_RELEASE_TARGET = "sglang.srt.mem_cache.common.release_kv_cache"
_PROCESS_INPUT_TARGET = "sglang.srt.managers.scheduler.Scheduler.process_input_requests"
_GROUP_TARGET = "sglang.srt.distributed.parallel_state.init_model_parallel_group"


def register() -> None:
    """Make `--attention-backend msa` exist: CLI choice, backend factory, start-up resolution,
    and admission of MSA requests in the scheduler."""
    _register_backend_choice()
    _register_backend_factory()
    _register_model()
    _register_hooks()
    if multiprocessing.parent_process() is None:  # the launcher: its children inherit the secret
        from sglang_msa.memory_manager.grants import ensure_secret

        ensure_secret()


def _register_backend_choice() -> None:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:  # the helper is list.extend: guard duplicates
        add_attention_backend_choices([BACKEND_NAME])


def _register_backend_factory() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    if BACKEND_NAME not in ATTENTION_BACKENDS:
        ATTENTION_BACKENDS[BACKEND_NAME] = create_msa_backend


def _register_model() -> None:
    """The released MSA checkpoint format: `model_type: "msa"`, `MSAForCausalLM`."""
    from sglang.srt.models.registry import ModelRegistry
    from transformers import AutoConfig

    from sglang_msa.models.msa_config import MSA_ARCHITECTURE, MSA_MODEL_TYPE, MSAConfig

    AutoConfig.register(MSA_MODEL_TYPE, MSAConfig, exist_ok=True)
    if MSA_ARCHITECTURE not in ModelRegistry.models:
        from sglang_msa.models.msa import MSAForCausalLM

        ModelRegistry.models[MSA_ARCHITECTURE] = MSAForCausalLM


def create_msa_backend(model_runner):
    from sglang_msa.attention_backend.backend import MSAAttnBackend

    return MSAAttnBackend(model_runner)


_hooks_registered = False


def _register_hooks() -> None:
    global _hooks_registered
    if _hooks_registered:  # HookRegistry.register appends without de-duplication
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_COMPATIBILITY_TARGET, configure_msa_resolution, HookType.AFTER)
    HookRegistry.register(_ADMISSION_TARGET, admit_msa_request, HookType.AROUND)
    HookRegistry.register(_CLI_ARGS_TARGET, add_msa_cli_args, HookType.AFTER)
    HookRegistry.register(_FROM_CLI_TARGET, take_msa_cli_args, HookType.BEFORE)
    HookRegistry.register(_GROUP_TARGET, cpu_groups_without_pynccl, HookType.BEFORE)
    HookRegistry.register(_LOCAL_REQUESTS_TARGET, add_msa_control_batch, HookType.AFTER)
    HookRegistry.register(_PROCESS_INPUT_TARGET, apply_msa_control_batches, HookType.BEFORE)
    HookRegistry.register(_ABORT_TARGET, guard_msa_aborts, HookType.AROUND)
    HookRegistry.register(_RELEASE_TARGET, release_finished_msa_state, HookType.AFTER)
    if multiprocessing.parent_process() is None:  # the launcher: the only process serving HTTP
        HookRegistry.register(_HTTP_LAUNCH_TARGET, install_memory_routes, HookType.BEFORE)
    _hooks_registered = True


def add_msa_cli_args(result, parser, *args, **kwargs):
    parser.add_argument(
        "--msa-config", type=str, default=None,
        help="sglang-msa options: a JSON object or the path of a JSON file (see sglang_msa/config.py)",
    )
    parser.add_argument(
        "--msa-memory-dir", type=str, default=None,
        help="sglang-msa: directory where memories persist across restarts (the option memory_dir)",
    )
    return result


def take_msa_cli_args(*args, **kwargs):
    """Validate `--msa-config` / `--msa-memory-dir` and hand the options to the server's
    processes through the environment."""
    from sglang_msa.config import CONFIG_ENV, parse_options

    namespace = next((a for a in (*args, *kwargs.values()) if isinstance(a, argparse.Namespace)), None)
    value = getattr(namespace, "msa_config", None)
    memory_dir = getattr(namespace, "msa_memory_dir", None)
    if value or memory_dir:
        options = parse_options(value or "{}")  # fail at start-up with pydantic's message, not in a child
        if memory_dir:
            options = options.model_copy(update={"memory_dir": os.path.abspath(memory_dir)})
        if options.api_keys_file:
            options = options.model_copy(update={"api_keys_file": os.path.abspath(options.api_keys_file)})
        os.environ[CONFIG_ENV] = options.model_dump_json(exclude_defaults=True)
    check_tenant_server_args(namespace)
    return None


def check_tenant_server_args(namespace) -> None:
    """With tenants' API keys (`api_keys_file`, from --msa-config or SGLANG_MSA_CONFIG), refuse to
    start a server whose admin endpoints anyone could call, or whose memory API no tenant could.

    SGLang's admin endpoints (`/abort_request`, `/pause_generation`, `/update_weights_from_disk`,
    `/flush_cache`, ...) are open unless `--admin-api-key` is set; tenants must not reach them.
    SGLang's `--api-key` would demand its own key on every endpoint, the memory API included,
    where each tenant presents its own key in the same header."""
    from sglang_msa.config import load_options
    from sglang_msa.server.auth import load_api_keys

    options = load_options()
    if not options.api_keys_file:
        return
    load_api_keys(options.api_keys_file)  # a bad file stops the launch here, with its reason
    if not getattr(namespace, "admin_api_key", None):
        raise ValueError("sglang-msa: api_keys_file is set (tenants) but --admin-api-key is not: SGLang's admin "
                         "endpoints (/abort_request, /pause_generation, /update_weights_from_disk, ...) would be "
                         "open to every caller. Start the server with --admin-api-key <key>")
    if getattr(namespace, "api_key", None):
        raise ValueError("sglang-msa: --api-key cannot be combined with api_keys_file: SGLang would demand that key "
                         "on /v1/memories, where tenants present their own keys; use --admin-api-key for the "
                         "admin endpoints")


def cpu_groups_without_pynccl(*args, **kwargs):
    """On SGLang's CPU engine, build its process groups without PyNccl.

    SGLang 0.5.23 builds a `PyNcclCommunicator` for every group unless the platform opts out,
    and its CPU engine does not, so `--tp 2` on a CPU fails at start-up; gloo alone serves
    every collective there. GPU serving is left exactly as it is.
    """
    import torch

    cpu_engine = os.environ.get("SGLANG_USE_CPU_ENGINE") == "1" or not torch.cuda.is_available()
    if not cpu_engine or kwargs.get("use_pynccl") is not None or len(args) > 3:
        return None
    return args, {**kwargs, "use_pynccl": False}


def install_memory_routes(*args, **kwargs):
    from sglang.srt.entrypoints.http_server import app

    from sglang_msa.server.routes import install

    install(app)
    return None


def token_id_error(input_ids, vocab_size: int) -> str | None:
    """Why a prompt's token ids cannot be embedded (one outside [0, vocab_size)), or None."""
    if len(input_ids) == 0 or 0 <= min(input_ids) and max(input_ids) < vocab_size:
        return None
    index = next(i for i, token in enumerate(input_ids) if not 0 <= token < vocab_size)
    return f"input_ids[{index}] = {input_ids[index]} is outside the vocabulary [0, {vocab_size})"


def admit_msa_request(original, scheduler, req, *args, **kwargs):
    """Validate every request before it is queued, and register `custom_params["msa"]`.

    Token ids outside the vocabulary (which would crash the scheduler in the embedding, for
    every tenant) and MSA requests that cannot be served (unknown memory, bad span, too long,
    a reserved rid) are finished with an error message (HTTP 400) instead of reaching the model.
    """
    from sglang_msa.memory_manager.service import get_service

    service = get_service()
    if service is not None and not req.finished():
        try:
            error = token_id_error(req.origin_input_ids, scheduler.model_config.vocab_size)
            error = error or service.admit_request(req)
        except Exception:  # one request must never take the scheduler, and every tenant, down
            logger.exception("sglang-msa: admission of request %r failed", req.rid)
            error = "the request could not be admitted (see the server log)"
        if error is not None:
            req.set_finish_with_abort(f"sglang-msa: {error}")
    return original(scheduler, req, *args, **kwargs)


def guard_msa_aborts(original, scheduler, recv_req, *args, **kwargs):
    """Run SGLang's abort unless it would reach memory requests by rid prefix, then release the
    aborted requests' MSA state (every rank: aborts ride the broadcast).

    SGLang aborts a request whose client went away (a closed stream included) or whose abort was
    asked, matching every rid that starts with the abort's. The memory API's rids are reserved
    (`grants.RESERVED_RID_PREFIX`), so a prefix of them can come only from a caller aiming at
    other requests; such an abort is dropped. An exact memory rid follows its request on
    SGLang's ordered channel, so the request was admitted, and its state registered, before."""
    from sglang_msa.memory_manager.service import get_service

    service = get_service()
    if service is not None and not service.may_abort(recv_req.rid, recv_req.abort_all):
        logger.warning("sglang-msa: abort of rid prefix %r refused (reserved for the memory API)", recv_req.rid)
        return None
    result = original(scheduler, recv_req, *args, **kwargs)
    if service is not None:
        service.release_aborted(recv_req.rid, recv_req.abort_all)
    return result


def release_finished_msa_state(result, req, *args, **kwargs):
    """A finished request's selections (their rows, and the pins of rows read in place) go when
    SGLang releases its KV cache; its report stays for `/v1/memories/.../generate` to take.
    Requests sent straight to /generate (the frontend DSL's) have no reader: before this their
    rows stayed until the registry's expiry."""
    if req.finished():
        from sglang_msa.memory_manager.service import get_service

        service = get_service()
        if service is not None:
            service.release_finished(req.rid)
    return result


def add_msa_control_batch(result, scheduler, *args, **kwargs):
    """Rank 0 under tensor parallelism: the memory control messages received since the last
    step ride this step's broadcast of incoming requests to every rank (`service.ControlBatch`)."""
    from sglang_msa.memory_manager.service import get_service

    service = get_service()
    if service is None or service.shard is None:
        return result
    batch = service.take_pending()
    return result if batch is None else [*(result or []), batch]


def apply_msa_control_batches(scheduler, recv_reqs, *args, **kwargs):
    """Every rank, before this step's requests: apply the broadcast control batches in order."""
    from sglang_msa.memory_manager.service import ControlBatch, get_service

    batches = [req for req in recv_reqs if isinstance(req, ControlBatch)]
    if not batches:
        return None
    service = get_service()
    for batch in batches:
        service.apply_control_batch(batch)
    return (scheduler, [req for req in recv_reqs if not isinstance(req, ControlBatch)], *args), kwargs


def reserved_mem_fraction(mem_fraction_static: float, budget_bytes: int, device_bytes: int) -> float:
    """SGLang's static memory fraction after setting aside the memories' budget."""
    reserved = budget_bytes / device_bytes
    if mem_fraction_static - reserved < 0.05:
        raise ValueError(
            f"sglang-msa: memory_budget_mb ({budget_bytes / 2**20:.0f} MiB) leaves too little of "
            f"mem_fraction_static={mem_fraction_static:.3f} on a {device_bytes / 2**30:.1f} GiB device"
        )
    return mem_fraction_static - reserved


MSA_PREFILL_DECODE_INTERVAL = 1


def configure_msa_resolution(result, server_args, *args, **kwargs):
    """After SGLang's own attention pass (launcher, before the scheduler starts), for `msa`:

    - CUDA graphs off (its decode metadata is not graph-capturable yet; SGLang disables graphs
      by itself only for torch_native and flex_attention);
    - unless the user chose one, `--prefill-decode-interval 1`, so that ingestion cannot starve
      the decode of running queries;
    - on a GPU, the memories' budget (`memory_budget_mb`) is taken out of SGLang's
      `mem_fraction_static`, so the KV cache SGLang sizes does not count on those bytes. (On the
      CPU engine the KV pool is sized by --max-total-tokens; the budget is host memory.)
    """
    from sglang.srt.arg_groups.overrides import declare_resolution, resolved_view, resolving_view
    from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase

    view = resolved_view(server_args)
    uses_msa = BACKEND_NAME in {
        view.attention_backend,
        getattr(view, "prefill_attention_backend", None),
        getattr(view, "decode_attention_backend", None),
    }
    if not uses_msa:
        return result
    ranks = {flag: getattr(view, name, 1) or 1 for flag, name in (("--dp", "dp_size"), ("--pp-size", "pp_size"))}
    if any(size > 1 for size in ranks.values()):
        # each data-parallel / pipeline group would hold its own memories behind one control
        # channel; Memory Parallel shards a memory over the tensor-parallel group (--tp) instead
        raise ValueError(
            "sglang-msa: --attention-backend msa shards memories over the tensor-parallel group (--tp); "
            + ", ".join(f"{flag} {size}" for flag, size in ranks.items() if size > 1)
            + " is not supported (use --tp, or one server per data-parallel replica)"
        )
    source = "sglang_msa.plugin.configure_msa_resolution"
    logger.warning(
        "sglang-msa: CUDA graphs are disabled for --attention-backend msa "
        "(per-request memory metadata is not graph-capturable yet)"
    )
    for phase in (Phase.DECODE, Phase.PREFILL):
        config = resolving_view(server_args).cuda_graph_config
        declare_resolution(server_args, source, cuda_graph_config=with_phase(config, phase, backend=Backend.DISABLED))
    raw = getattr(server_args, "_raw_input", None) or {}
    if raw.get("prefill_decode_interval", getattr(server_args, "prefill_decode_interval", 0)) is None:  # unset
        # SGLang runs a prefill whenever one can be formed and decodes only otherwise, so a steady
        # stream of document ingestions (each one a prefill) can starve every running query's
        # decode; one decode round after each prefill bounds that wait.
        logger.warning("sglang-msa: --prefill-decode-interval %d (a decode round after each prefill: "
                       "document ingestion cannot starve running queries)", MSA_PREFILL_DECODE_INTERVAL)
        declare_resolution(server_args, source, prefill_decode_interval=MSA_PREFILL_DECODE_INTERVAL)
    _reserve_memory_budget(server_args, source)
    _choose_cpu_dtype(server_args, raw, source)
    return result


BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 /proc/cpuinfo flags; arm64 Features


def cpu_flags(cpuinfo: str) -> set[str]:
    """The instruction-set flags of /proc/cpuinfo's text (x86 `flags`, arm64 `Features`)."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _choose_cpu_dtype(server_args, raw: dict, source: str, cpuinfo: str | None = None) -> None:
    """On SGLang's CPU engine with `--dtype auto`: float32 where the CPU has no bf16 instructions
    (there a bf16 matrix product runs several times slower than float32, and ingestion and
    queries are mostly matrix products); bf16 models keep bf16 where it is native."""
    from pathlib import Path

    from sglang.srt.arg_groups.overrides import declare_resolution
    from sglang.srt.utils.common import is_cpu

    if not is_cpu() or raw.get("dtype", "auto") != "auto":
        return
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo)
    except OSError:  # no /proc: keep SGLang's choice
        return
    if flags and not flags & BF16_CPU_FLAGS:
        logger.warning("sglang-msa: this CPU has no bf16 instructions (%s): --dtype float32 "
                       "(pass --dtype to choose)", "/".join(sorted(BF16_CPU_FLAGS)))
        declare_resolution(server_args, source, dtype="float32")


def _reserve_memory_budget(server_args, source: str) -> None:
    import torch
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    from sglang_msa.config import load_options

    fraction = resolving_view(server_args).mem_fraction_static
    if not torch.cuda.is_available() or fraction is None:
        return
    budget = int(load_options().memory_budget_mb * 2**20)
    device_bytes = torch.cuda.get_device_properties(0).total_memory
    reserved = reserved_mem_fraction(fraction, budget, device_bytes)
    logger.warning("sglang-msa: %d MiB reserved for memories: mem_fraction_static %.3f -> %.3f",
                   budget // 2**20, fraction, reserved)
    declare_resolution(server_args, source, mem_fraction_static=reserved)
