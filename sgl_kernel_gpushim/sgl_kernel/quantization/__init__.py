"""sgl_kernel.quantization in the GPU stand-in: the GGUF kernels SGLang 0.5.23 imports on CUDA;
each raises naming itself when called."""

from .. import unavailable

NAMES = ["ggml_dequantize", "ggml_moe_a8", "ggml_mul_mat_a8", "ggml_mul_mat_vec_a8"]
globals().update({name: unavailable(name, __name__) for name in NAMES})
