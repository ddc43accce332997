"""sgl_kernel.scalar_type in the GPU stand-in: SGLang 0.5.23's Marlin / GPTQ / AWQ / AutoRound
modules read `scalar_types.<name>` when they are imported (to build lookup tables); quantized
kernels are not in the stand-in, so a scalar type here is a name only and any use of it raises."""

from __future__ import annotations


class ScalarType:
    """A named placeholder: equal only to itself; every attribute beyond its name raises."""

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        raise NotImplementedError(
            f"sgl_kernel GPU stand-in: scalar_types.{self.name}.{attribute} is not available (quantized "
            "kernels need the real sglang-kernel)"
        )

    def __repr__(self) -> str:
        return f"ScalarType({self.name!r}, GPU stand-in)"


class _ScalarTypes:
    def __getattr__(self, name: str) -> ScalarType:
        if name.startswith("__"):
            raise AttributeError(name)
        value = ScalarType(name)
        setattr(self, name, value)  # one object per name, so lookups by identity agree
        return value


scalar_types = _ScalarTypes()
