"""MSA kernels: `reference` (pure PyTorch, the definition of the math) and, later, fast paths
checked against it. GPU-only packages are imported lazily inside the fast paths."""
