"""Plugin options: parsing, validation, checkpoint-derived values, memory reservation."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import ValidationError

from msa_checkpoints import build_tiny_msa_checkpoint, released_msa_config
from sglang_msa.config import MSAOptions, parse_options
from sglang_msa.models.msa_config import MSAConfig, options_for_checkpoint, routed_layers_of
from sglang_msa.plugin import reserved_mem_fraction

# what the official resave writes into msa_config (issue #17)
RELEASED_MSA_CONFIG_KEYS = {
    "ansloss_weight", "lmloss_weigth", "recloss_weight", "auxloss_weight", "aux_loss", "aux_loss_method",
    "infonce_loss_temp", "decouple_router", "decouple_pooling_mode", "rewrite_position", "pooling_kernel_size",
    "router_layer_idx", "top_k_docs", "head_reduce_method", "query_reduce_method", "chunk_reduce_method",
}


def test_options_from_json_text_and_file(tmp_path):
    assert parse_options('{"top_k_docs": 8}').top_k_docs == 8
    path = tmp_path / "msa.json"
    path.write_text(json.dumps({"chunk_size": 16, "memory_content": "pooled"}))
    options = parse_options(str(path))
    assert (options.chunk_size, options.memory_content) == (16, "pooled")
    with pytest.raises(ValueError, match="neither a JSON object nor a file"):
        parse_options("/no/such/file.json")


@pytest.mark.parametrize("bad", [{"top_k_docs": 0}, {"similarity": "l2"}, {"routed_layers": [1, 1]},
                                 {"unknown_option": 1}, {"chunk_size": "big"}])
def test_invalid_options_are_refused(bad):
    with pytest.raises(ValidationError):
        MSAOptions.model_validate(bad)


def test_routed_layers():
    assert MSAOptions().routed_layer_ids(36) == list(range(18, 36))
    assert MSAOptions(routed_layers="all").routed_layer_ids(3) == [0, 1, 2]
    assert MSAOptions(routed_layers=[3, 1]).routed_layer_ids(4) == [1, 3]
    with pytest.raises(ValueError, match="do not exist"):
        MSAOptions(routed_layers=[5]).routed_layer_ids(4)


def test_checkpoint_values_override_the_method_options():
    released = {"router_layer_idx": ",".join(str(i) for i in range(18, 36)), "top_k_docs": 16,
                "pooling_kernel_size": 64, "head_reduce_method": "mean", "query_reduce_method": "max",
                "chunk_reduce_method": "max", "aux_loss_method": "INFONCE_DECOUPLE"}
    assert routed_layers_of(released, 36) == list(range(18, 36))
    options = options_for_checkpoint(MSAOptions(top_k_docs=4, chunk_size=8, max_document_tokens=99), released, 36)
    assert (options.top_k_docs, options.chunk_size, options.similarity) == (16, 64, "dot")
    assert options.memory_content == "pooled" and options.max_document_tokens == 99  # limits stay
    assert options_for_checkpoint(MSAOptions(), {**released, "aux_loss_method": "INFONCE"}, 36).similarity == "cosine"
    assert options_for_checkpoint(MSAOptions(similarity="cosine"), released, 36).similarity == "cosine"


def test_a_released_config_json_loads(tmp_path, caplog):
    """The tiny checkpoints are shaped like a released config.json: the official decoder layer's
    `sliding_window: false` beside `use_sliding_window: false`, and every msa_config key."""
    model_dir = build_tiny_msa_checkpoint(tmp_path)
    saved = json.loads((model_dir / "config.json").read_text())
    assert (saved["sliding_window"], saved["use_sliding_window"], saved["max_window_layers"]) == (False, False, 28)
    assert set(saved["msa_config"]) == RELEASED_MSA_CONFIG_KEYS
    with caplog.at_level(logging.DEBUG, logger="sglang_msa.models.msa_config"):
        config = MSAConfig.from_pretrained(model_dir)
    assert config.sliding_window is None and set(config.layer_types) == {"full_attention"}
    assert config.msa_config == saved["msa_config"]
    ignored = [r for r in caplog.records if "used only in training" in r.getMessage()]
    assert len(ignored) == 1 and ignored[0].levelno == logging.DEBUG
    assert "lmloss_weigth" in ignored[0].getMessage() and "rewrite_position" in ignored[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("window", [False, None, 4096])
def test_every_sliding_window_value_the_official_code_writes_serves_full_attention(window):
    for use_window in (False, True):
        config = MSAConfig(sliding_window=window, use_sliding_window=use_window, num_hidden_layers=4,
                           msa_config=released_msa_config())
        assert config.sliding_window is None  # the official decoder layer sets it False: no window


@pytest.mark.parametrize("update, key", [
    ({"decouple_router": False}, "decouple_router"),
    ({"decouple_pooling_mode": "max"}, "decouple_pooling_mode"),
    ({"head_reduce_method": "min"}, "head_reduce_method"),
    ({"query_reduce_method": "first"}, "query_reduce_method"),
    ({"chunk_reduce_method": "sum"}, "chunk_reduce_method"),
    ({"router_layer_idx": "2,9"}, "router_layer_idx"),
    ({"router_layer_idx": "two"}, "router_layer_idx"),
    ({"top_k_docs": 0}, "top_k_docs"),
    ({"pooling_kernel_size": "64"}, "pooling_kernel_size"),
])
def test_msa_config_values_that_serving_lacks_are_refused_naming_the_key(update, key):
    with pytest.raises(ValueError, match=f"msa_config.{key} "):
        MSAConfig(num_hidden_layers=4, msa_config={**released_msa_config(), **update})


def test_unknown_msa_config_keys_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sglang_msa.models.msa_config"):
        MSAConfig(num_hidden_layers=4, msa_config={**released_msa_config(), "doc_top_k": 8})
    assert "doc_top_k" in caplog.text


def test_memory_budget_is_taken_out_of_sglangs_static_fraction():
    assert reserved_mem_fraction(0.8, 8 * 2**30, 80 * 2**30) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="leaves too little"):
        reserved_mem_fraction(0.5, 60 * 2**30, 80 * 2**30)


def prepare_case(msa_config: str) -> dict:
    return {"kind": "prepare",
            "args": ["--model-path", "x", "--attention-backend", "msa", "--msa-config", msa_config]}


# Run in one fresh interpreter for the whole session (conftest.py, server_args_runner.py).
SERVER_ARGS_CASES = {"ok": prepare_case('{"top_k_docs": 3}'), "bad": prepare_case('{"top_k_docs": -1}')}


def test_msa_config_flag_is_validated_at_startup(server_args):
    ok, bad = server_args["ok"], server_args["bad"]
    assert "error" not in ok, ok.get("error", "")[-2000:]
    assert json.loads(ok["msa_config_env"]) == {"top_k_docs": 3}
    assert "top_k_docs" in bad.get("error", ""), bad
