"""Tiny random Llama / Qwen2 / Qwen3 checkpoints built locally (no hub access).

Each model is a byte-level BPE tokenizer trained on a small corpus with `tokenizers`, a trivial
chat template, and a 2-layer decoder (hidden 128, 4 query heads, 2 KV heads: GQA) with seeded
random weights saved as float32 safetensors.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris. The grass is green. The sky is blue. The sun is yellow.",
    "One of the special magic numbers for quiet-river is: 7321904.",
    "Memory sparse attention routes each query to the most relevant documents.",
    "Here we go. There and back again. 0123456789 abcdefghijklmnopqrstuvwxyz",
] * 20
BLANK_LINE_CORPUS = ["Question:\n\nWhere is Paris?\n\nThe capital of France.\n"] * 20
# Qwen2/Qwen3's pre-tokenizer pattern: `\s*[\r\n]+` keeps a run of newlines together
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ARCHITECTURES = ("llama", "qwen2", "qwen3")


def build_tokenizer(vocab_size: int = 512, extra_special_tokens: tuple[str, ...] = (),
                    qwen_newlines: bool = False):
    r"""`qwen_newlines`: split text like Qwen's tokenizer (a run of newlines is one piece) and learn
    from text with blank lines, so that "\n\n" is one token, as in Qwen's vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not qwen_newlines)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated"), byte_level]
    ) if qwen_newlines else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS + (BLANK_LINE_CORPUS if qwen_newlines else []), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_config(arch: str, vocab_size: int, eos_token_id: int, num_layers: int = 2):
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        pad_token_id=0,
        dtype="float32",
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common)
    raise ValueError(f"unknown architecture {arch!r}")


def build_tiny_model(arch: str, out_dir: Path, seed: int = 0, num_layers: int = 2,
                     extra_special_tokens: tuple[str, ...] = (), qwen_newlines: bool = False) -> Path:
    """Write a tiny random `arch` checkpoint (config, safetensors, tokenizer) to out_dir."""
    tokenizer = build_tokenizer(extra_special_tokens=extra_special_tokens, qwen_newlines=qwen_newlines)
    config = build_config(arch, len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"), num_layers)
    # larger than the default init so that greedy decoding is not degenerate
    return save_random_model(config, tokenizer, out_dir, seed=seed, weight_std=0.08, dtype="float32")


def save_random_model(config, tokenizer, out_dir: Path, seed: int, weight_std: float, dtype: str) -> Path:
    """Write a model of `config` with normal(0, weight_std) matrices, and the tokenizer, to out_dir."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, weight_std)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def hf_greedy(model_dir: Path, input_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of exactly max_new_tokens tokens from HF transformers (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for ids in input_ids:
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=0,
        )
        outputs.append(generated[0, len(ids):].tolist())
    return outputs


if __name__ == "__main__":
    import sys

    build_tiny_model(sys.argv[1], Path(sys.argv[2]))
