"""sglang-msa: Memory Sparse Attention as an SGLang plugin.

Importing this package is cheap: nothing here imports SGLang or torch. `sglang_msa.plugin`
registers the `msa` attention backend when SGLang loads its plugins.
"""

__version__ = "0.1.0"

BACKEND_NAME = "msa"
