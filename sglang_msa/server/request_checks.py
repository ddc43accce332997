"""Checks of generate parameters before a request reaches SGLang: a bad value answers 422 naming
its field instead of failing in the scheduler (a token id outside the vocabulary crashed it, an
unknown sampling parameter or an invalid regex came back as a 500 or an unrelated message)."""

from __future__ import annotations

import re

from sglang_msa.server.errors import APIError


def check_input_ids(input_ids: list[int], vocab_size: int) -> None:
    for index, token in enumerate(input_ids):
        if not 0 <= token < vocab_size:
            raise APIError(422, f"token id {token} is outside the vocabulary [0, {vocab_size})", f"input_ids[{index}]")


def checked_sampling_params(params: dict, vocab_size: int) -> dict:
    """`params` as SGLang's SamplingParams accepts them for one completion, or 422 naming the field."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    if params.get("n", 1) != 1:
        raise APIError(422, "one completion per request: n must be 1", "sampling_params.n")
    custom = params.get("custom_params")
    if custom is not None and not isinstance(custom, dict):
        raise APIError(422, "custom_params must be an object", "sampling_params.custom_params")
    if custom is not None and "msa" in custom:
        raise APIError(422, "the memory API sets custom_params.msa itself", "sampling_params.custom_params.msa")
    for name in ("regex", "stop_regex"):
        patterns = params.get(name)
        for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise APIError(422, f"not a valid regular expression: {exc}", f"sampling_params.{name}") from None
    try:
        SamplingParams(**params).verify(vocab_size)
    except TypeError as exc:
        unknown = re.search(r"unexpected keyword argument '([^']*)'", str(exc), re.IGNORECASE)
        if unknown:
            raise APIError(422, f"unknown sampling parameter {unknown[1]!r}",
                           f"sampling_params.{unknown[1]}") from None
        raise APIError(422, str(exc), "sampling_params") from None
    except ValueError as exc:
        raise APIError(422, str(exc), "sampling_params") from None
    return params
