"""Data files shipped with the package (the demo memory)."""
