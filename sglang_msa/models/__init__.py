"""Models: the embedded default model (`embedded`), later the MSA checkpoint class."""
