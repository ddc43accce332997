"""`MSAAttnBackend`: SGLang attention backend behind `--attention-backend msa`.

Requests without a memory get exactly SGLang's dense attention: on every device the dense part
is SGLang's `TorchNativeAttnBackend` (per-request SDPA over the paged KV pool), so greedy output
equals `--attention-backend torch_native` token for token. The memory path (routing over a
memory's pooled router keys, attention over [template ; selected chunks ; local]) builds on this
class; its math is defined by `sglang_msa.kernels.reference`.
"""

from __future__ import annotations

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend


class MSAAttnBackend(TorchNativeAttnBackend):
    """Dense attention for requests without memory; the base of the MSA memory path."""
