"""The CPU engine's default dtype for `msa` servers: float32 where the CPU lacks bf16
instructions, SGLang's choice where it has them or where the user chose a dtype."""

from __future__ import annotations

from types import SimpleNamespace

from sglang_msa.plugin import _choose_cpu_dtype, cpu_flags

NO_BF16 = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512bw\nbogomips : 4000\n"
WITH_BF16 = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n"
ARM_BF16 = "processor : 0\nFeatures : fp asimd bf16 i8mm\n"


def decided(raw: dict, cpuinfo: str) -> list:
    args = SimpleNamespace()
    _choose_cpu_dtype(args, raw, "test", cpuinfo=cpuinfo)
    return getattr(args, "_resolved_overrides", [])


def test_cpu_flags_are_read_from_cpuinfo():
    assert cpu_flags(NO_BF16) == {"fpu", "sse2", "avx2", "avx512f", "avx512bw"}
    assert "bf16" in cpu_flags(ARM_BF16)
    assert cpu_flags("processor : 0\n") == set()


def test_float32_without_bf16_instructions():
    assert decided({"dtype": "auto"}, NO_BF16) == [("test", {"dtype": "float32"})]


def test_sglangs_choice_with_bf16_instructions_or_a_chosen_dtype_or_unknown_flags():
    assert decided({"dtype": "auto"}, WITH_BF16) == []
    assert decided({"dtype": "auto"}, ARM_BF16) == []
    assert decided({"dtype": "bfloat16"}, NO_BF16) == []
    assert decided({"dtype": "auto"}, "processor : 0\n") == []  # flags unknown: change nothing
