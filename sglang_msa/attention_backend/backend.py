"""`MSAAttnBackend`: SGLang attention backend behind `--attention-backend msa`.

Every request first gets SGLang's dense attention (`TorchNativeAttnBackend`: per-request SDPA
over the paged KV pool, which also writes the new K/V), so a batch without MSA requests is
exactly `--attention-backend torch_native`. Then, in the routed layers only:

- a document ingestion whose prefill completes in this pass has its K (after RoPE), V and router
  keys read back from the pool and mean-pooled into its memory (`sglang_msa.memory_manager`);
- a memory query routes once at prefill over its own memory's router keys (before the layer's
  dense attention, so that on a GPU the selected content, host-tier rows included, is gathered
  on a side stream while the dense attention runs), freezes the selection, and its tokens after
  the template are recomputed as attention over [template ; selected documents ; local causal
  context], merged by log-sum-exp.

With `kernels="torch"` (the default on a CPU) every step is the pure-PyTorch math of
`sglang_msa.kernels.reference`; with `kernels="triton"` (the default on a GPU) pooling, routing
and the memory attention of the whole batch run as the Triton kernels of `sglang_msa.kernels`
(`kernel_attention`: planned once per batch, run per layer).
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from sglang_msa import metrics
from sglang_msa.attention_backend import memory_ops
from sglang_msa.attention_backend.kernel_attention import BatchMemoryRows, ContextPlan, attend_batch, plan_context
from sglang_msa.attention_backend.plan import BatchPlan, plan_batch
from sglang_msa.memory_manager.service import KVGeometry, ModelFacts, start_service
from sglang_msa.memory_manager.sharding import MemoryShard

logger = logging.getLogger(__name__)


class MSAAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner):
        super().__init__(model_runner)
        tensor_parallel = (getattr(model_runner.server_args, "tp_size", 1) or 1) > 1
        self.shard = MemoryShard.of_tensor_parallel_group() if tensor_parallel else None
        self.route = memory_ops.route if self.shard is None else functools.partial(memory_ops.route_sharded,
                                                                                   shard=self.shard)
        self.service = start_service(_model_facts(model_runner, self.token_to_kv_pool), model_runner.server_args.port,
                                     shard=self.shard)
        self.adapter = self.service.adapter
        if self.adapter is not None:
            self.adapter = self.adapter.to(model_runner.device, torch.float32)
        if self.service.own_router_geometry is not None:  # router queries of every head, not this rank's
            self.route = memory_ops.route if self.shard is None else functools.partial(
                memory_ops.route_sharded, shard=self.shard, queries_whole=True)
        self.router_inputs = RouterInputs(model_runner.model, self.service.routed_layers) if self.adapter else None
        self.routed_layers = frozenset(self.service.routed_layers)
        self.last_routed_layer = max(self.service.routed_layers)
        self.plan: BatchPlan | None = None
        self.kernels = self.service.options.kernel_path(model_runner.device)
        self.context: ContextPlan | None = None  # the Triton path's per-batch plan
        self.memory_rows = BatchMemoryRows()
        logger.info("sglang-msa: %s kernels for routing, pooling and memory attention", self.kernels)

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self.plan = plan_batch(forward_batch, self.service.registry)
        self.context = None
        if self.kernels == "triton" and self.plan is not None and self.plan.queries:
            self.context = plan_context(self.plan.queries, self.req_to_token_pool.req_to_token)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, router_q=None, router_k=None,
                       **kwargs):
        router_q, router_k = self._adapter_routers(layer, router_q, router_k)
        self._route_queries(q.reshape(q.shape[0], -1), layer, router_q)
        out = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        return self._apply_memory(out, q, layer, router_k)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, router_q=None, router_k=None,
                       **kwargs):
        router_q, router_k = self._adapter_routers(layer, router_q, router_k)
        self._route_queries(q.reshape(q.shape[0], -1), layer, router_q)
        out = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        return self._apply_memory(out, q.reshape(out.shape[0], -1), layer, router_k)

    def _adapter_routers(self, layer, router_q, router_k):
        """With a router adapter: the router queries and keys of this pass's tokens in a routed
        layer, projected from the layer's attention input ([tokens, H·d] each, like an MSA
        checkpoint's); otherwise what the model passed."""
        if self.router_inputs is None or layer.layer_id not in self.routed_layers:
            return router_q, router_k
        hidden = self.router_inputs.take(layer.layer_id)
        plan = self.plan
        if plan is None:
            return router_q, router_k
        hidden, flat = hidden.float(), (hidden.shape[0], -1)
        # only what this pass uses: queries where a request routes (its prefill), keys where a document is encoded
        if any(layer.layer_id not in request.state.selections for request in plan.queries):
            router_q = self.adapter.project(layer.layer_id, hidden, "q").reshape(flat)
        if plan.ingestions:
            router_k = self.adapter.project(layer.layer_id, hidden, "k").reshape(flat)
            router_k = router_k.to(self.token_to_kv_pool.dtype)
        return router_q, router_k

    def _route_queries(self, q, layer, router_q=None):
        """Route the memory queries that have not routed in this layer yet (their prefill), before
        the layer's dense attention: on a GPU their selected rows are gathered on a side stream
        (`memory_ops.read_selection`), so host-tier content crosses PCIe while the dense pass runs.

        q [tokens, H·d]; router_q [tokens, H·d]: the MSA router projections of this pass's tokens
        (MSA checkpoints), None in training-free mode (route on q)."""
        plan = self.plan
        if plan is None or layer.layer_id not in self.routed_layers:
            return
        key_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        for request in plan.queries:
            state = request.state
            if layer.layer_id in state.selections:
                continue
            spans = state.routing_spans
            if not (request.prefix_len <= spans[0][0] and spans[-1][1] <= request.seq_len):
                logger.error("sglang-msa: request's routing spans are not in this pass; it gets no memory")
                state.selections[layer.layer_id] = memory_ops.empty_selection(key_buffer)
                continue
            routing_queries = self._routing_queries(request, q, layer, router_q)
            started = time.perf_counter()
            selection = self.route(
                self.service.store, state.params.memory_key, layer.layer_id, routing_queries, self.service.options,
                key_buffer, self.kernels,
            )
            metrics.observe_routing(layer.layer_id, time.perf_counter() - started)
            if selection.doc_scores is not None:
                state.record_scores(layer.layer_id, selection.doc_scores)
                selection.doc_scores = None
            state.selections[layer.layer_id] = selection

    def _routing_queries(self, request, q, layer, router_q) -> torch.Tensor:
        """The request's router queries [T, H, d]: its routing spans' rows of `router_q` (MSA
        checkpoints, router adapters) or `q` (training-free); with an external router, the
        embedding of the routing text made at admission."""
        state = request.state
        if state.text_query is not None:
            return state.text_query
        rows = slice(request.token_start, request.token_start + request.num_new)
        heads = self.adapter.query_heads if self.adapter is not None else layer.tp_q_head_num
        queries = (q if router_q is None else router_q)[rows].view(request.num_new, heads, -1)
        return torch.cat([queries[start - request.prefix_len : end - request.prefix_len]
                          for start, end in state.routing_spans])

    def _apply_memory(self, out, q, layer, router_k=None):
        """Pool the documents whose prefill completes in this pass and recompute the memory
        queries' rows of `out` as MSA attention. router_k [tokens, Hkv·d]: the MSA router key
        projections of this pass's tokens (MSA checkpoints); None in training-free mode."""
        plan = self.plan
        if plan is None or layer.layer_id not in self.routed_layers:
            return out
        key_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        value_buffer = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        options = self.service.options
        for request in plan.ingestions:
            state = request.state
            if router_k is not None:
                if request.prefix_len == 0:  # a (re)started prefill
                    state.router_keys[layer.layer_id] = []
                rows = router_k[request.token_start : request.token_start + request.num_new]
                heads = self.adapter.key_heads if self.adapter is not None else layer.tp_k_head_num
                state.router_keys[layer.layer_id].append(rows.view(request.num_new, heads, -1))
            if request.seq_len != state.num_tokens:
                continue  # a chunked prefill that has not reached the document's end yet
            slots = req_to_token[request.row, : request.seq_len].long()
            state.pooled[layer.layer_id] = memory_ops.pool_document(
                key_buffer[slots], value_buffer[slots], options.chunk_size,
                keep_full=options.memory_content == "full",
                router_keys=torch.cat(state.router_keys.pop(layer.layer_id)) if router_k is not None else None,
                kernels=self.kernels, router_key_format=options.router_key_format,
                shard=self.shard if self.service.own_router_geometry is None else None,
                exclude_sink=self.service.exclude_sink,
                pooled_router_keys=state.text_chunk_keys,
            )
            if layer.layer_id == self.last_routed_layer:
                memory_ops.stage_ingestion(self.service.store, state)
        if self.context is not None:
            selections = [request.state.selections[layer.layer_id] for request in self.context.requests]
            attend_batch(q, out, layer, self.context, selections, key_buffer, value_buffer, self.memory_rows)
            return out
        for request in plan.queries:
            rows = slice(request.token_start, request.token_start + request.num_new)
            q_request = q[rows].view(request.num_new, layer.tp_q_head_num, layer.qk_head_dim)
            state = request.state
            slots = req_to_token[request.row, : request.seq_len].long()
            attended = memory_ops.attend(
                q_request, key_buffer[slots], value_buffer[slots], state.selections[layer.layer_id],
                template_tokens=state.params.template_tokens, scale=layer.scaling,
            )
            if attended is not None:
                first_local = attended.shape[0]
                out_rows = out[rows].view(request.num_new, layer.tp_q_head_num, layer.v_head_dim)
                out_rows[request.num_new - first_local :] = attended.to(out.dtype)
        return out


class RouterInputs:
    """The attention input of each routed layer in the current forward pass, captured by a
    forward pre-hook on the model's attention modules (those holding the layer's RadixAttention as
    `attn`, called as `forward(positions, hidden_states, forward_batch)`, as in SGLang's Llama,
    Qwen2 and Qwen3): what a router adapter projects."""

    def __init__(self, model, routed_layers):
        from sglang.srt.layers.radix_attention import RadixAttention

        self._inputs: dict[int, torch.Tensor] = {}
        hooked = set()
        for module in model.modules():
            attn = getattr(module, "attn", None)
            if isinstance(attn, RadixAttention) and attn.layer_id in routed_layers:
                module.register_forward_pre_hook(functools.partial(self._capture, attn.layer_id), with_kwargs=True)
                hooked.add(attn.layer_id)
        missing = sorted(set(routed_layers) - hooked)
        if missing:
            raise RuntimeError(f"sglang-msa: router_adapter: no attention module with layer_id {missing} found in "
                               f"{type(model).__name__} (adapters serve Llama, Qwen2 and Qwen3-style models)")

    def _capture(self, layer_id, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[1] if len(args) > 1 else None)
        if hidden is None:
            raise RuntimeError(f"sglang-msa: router_adapter: layer {layer_id}'s attention was called without "
                               "hidden_states")
        self._inputs[layer_id] = hidden

    def take(self, layer_id: int) -> torch.Tensor:
        return self._inputs.pop(layer_id)


def _tokenizer_path(model_runner) -> str | None:
    """The served model's tokenizer (None under --skip-tokenizer-init)."""
    from sglang.srt.runtime_context import get_serving

    try:
        serving = get_serving()
    except ValueError:  # no published serving configuration: a backend built outside a server
        return model_runner.server_args.model_path
    return None if serving.skip_tokenizer_init else serving.tokenizer_path


def _model_facts(model_runner, kv_pool) -> ModelFacts:
    config = model_runner.model_config.hf_config
    chunked = model_runner.server_args.chunked_prefill_size
    num_layers = model_runner.model_config.num_hidden_layers
    return ModelFacts(
        num_layers=num_layers,
        msa_config=getattr(config, "msa_config", None) if getattr(config, "model_type", None) == "msa" else None,
        max_prefill_tokens=chunked if chunked and chunked > 0 else None,
        hidden_size=getattr(config, "hidden_size", None),
        tokenizer_path=_tokenizer_path(model_runner),
        model_identity={"model": model_runner.server_args.model_path, "num_layers": num_layers,
                        "dtype": str(model_runner.model_config.dtype)},
        kv_geometry=KVGeometry(kv_heads=kv_pool.head_num, head_dim=kv_pool.head_dim, v_head_dim=kv_pool.v_head_dim,
                               dtype=kv_pool.dtype, device=torch.device(model_runner.device)),
    )
