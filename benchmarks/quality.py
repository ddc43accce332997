"""Quality vs memory size: named systems, two generators (one held out), one run.

Generators (one memory per size, generator and seed, holding --questions questions):
  niah     RULER-style needles "One of the special magic numbers for {adjective-noun} is: {7 digits}."
           in wonderwords prose (evaluation/generators.py; --niah-variant)
  heldout  invented-name needles (access codes in words, dates, part codes) and multi-document
           chain / aggregate questions in Wikipedia prose (evaluation/heldout.py; --heldout-families)
Systems (--systems, comma-separated):
  dense    SGLang with the whole memory in context, where it fits --context-limit
  rag      all-MiniLM-L6-v2 retrieves --inject documents into the prompt
  NAME     an MSA system from --systems-file ({name: --msa-config options}; default
           benchmarks/quality_systems.json), served by a server of its own and asked twice per
           question: plain (`NAME`) and with --inject documents injected (`NAME+inject`)
Each server ingests each memory once; every mode's questions go to that memory. dense and rag run
on the first server. Metrics per (size, generator, mode): exact match, median streaming TTFT, MSA
router recall@--top-k per layer (mean) and of the union of layers, recall@--inject of the injected
(MSA) or retrieved (RAG) documents, the median fraction of haystack documents ranked above a gold
document (MSA: from `msa.explain_doc_ids`, null where the server lacks it; RAG: MiniLM's ranking),
ingestion tokens/s. Prints a Markdown table; writes --out .json and .png.

    .venv/bin/python benchmarks/quality.py --sizes 16000,64000 --systems dense,rag,msa-old --questions 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import requests

from sglang_msa.evaluation import generators, heldout
from sglang_msa.evaluation.chat_stream import ChatClient
from sglang_msa.evaluation.generators import MemoryQuestion, MemoryTask
from sglang_msa.evaluation.metrics import exact_match, explained_above, haystack_above, recall_at_k
from sglang_msa.evaluation.quality_report import BUILT_IN, INJECT, Row, load_systems, summarize, table, write
from sglang_msa.evaluation.rag import MiniLMRetriever
from sglang_msa.models.embedded import prepare_embedded_model
from sglang_msa.server_process import start_server

NIAH_TOKENS_PER_WORD = 1.6  # word-list prose with this tokenizer; rows carry the measured tokens
INGEST_BATCH = 512  # documents per request (the server's max_documents_per_request is 1024)
MAX_EXPLAINED = 16  # msa.explain_doc_ids takes at most 16 ids


def make_task(generator: str, size: int, seed: int, args) -> MemoryTask:
    if generator == "niah":
        return generators.niah_task(args.niah_variant, int(size / NIAH_TOKENS_PER_WORD), args.doc_words, "prose",
                                    seed, args.questions)
    return heldout.heldout_task(size, args.doc_words, seed, tuple(args.heldout_families.split(",")), args.questions)


def ingest(url: str, memory_id: str, task: MemoryTask) -> tuple[int, float]:
    """Create the memory and add every document; (tokens the server counted, tokens/s)."""
    requests.post(f"{url}/v1/memories", json={"memory_id": memory_id}, timeout=60).raise_for_status()
    started, tokens = time.perf_counter(), 0
    for first in range(0, len(task.documents), INGEST_BATCH):
        response = requests.post(f"{url}/v1/memories/{memory_id}/documents", json={
            "documents": [{"text": d.text, "doc_id": d.doc_id} for d in task.documents[first:first + INGEST_BATCH]]},
            timeout=7200)
        response.raise_for_status()
        tokens += sum(d["num_tokens"] for d in response.json()["documents"])
    return tokens, tokens / (time.perf_counter() - started)


def ask_msa(client: ChatClient, memory_id: str, question: MemoryQuestion, args) -> dict[str, dict]:
    """The plain and the injected memory chat's fields, by mode suffix."""
    path = f"/v1/memories/{memory_id}/chat/completions"
    gold = question.gold_doc_ids
    plain = client.chat(path, question.question, {"routing_details": True, "explain_doc_ids": gold[:MAX_EXPLAINED]})
    gid_to_doc = {d["gid"]: d["doc_id"] for d in plain.msa["retrieved"]}
    per_layer = [recall_at_k([gid_to_doc[g] for g in sel["doc_gids"]], gold, args.top_k)
                 for sel in plain.msa["layers"].values()]
    injected = client.chat(path, question.question, {"inject_documents": args.inject})
    return {
        "": dict(answer=plain.text, ttft_s=plain.ttft_s, recall_layer=statistics.fmean(per_layer),
                 recall_union=recall_at_k(list(gid_to_doc.values()), gold, len(gid_to_doc)),
                 above=explained_above(plain.msa["explain"], gold) if "explain" in plain.msa else None),
        INJECT: dict(answer=injected.text, ttft_s=injected.ttft_s,
                     recall_top=recall_at_k([d["doc_id"] for d in injected.msa["injected"]], gold, args.inject)),
    }


def ask_rag(client: ChatClient, retriever: MiniLMRetriever, task: MemoryTask, question: MemoryQuestion, args) -> dict:
    ranking = retriever.search(question.question, len(task.documents))
    texts = {d.doc_id: d.text for d in task.documents}
    reply = client.chat("/v1/chat/completions",
                        "\n\n".join(texts[d] for d in ranking[:args.inject]) + "\n\n" + question.question)
    above = statistics.median(haystack_above(ranking.index(g) + 1, len(ranking)) for g in question.gold_doc_ids)
    return dict(answer=reply.text, ttft_s=reply.ttft_s, above=above,
                recall_top=recall_at_k(ranking, question.gold_doc_ids, args.inject))


def ask_dense(client: ChatClient, task: MemoryTask, question: MemoryQuestion) -> dict:
    reply = client.chat("/v1/chat/completions", "\n\n".join(d.text for d in task.documents) + "\n\n" + question.question)
    return dict(answer=reply.text, ttft_s=reply.ttft_s)


def run_server(url: str, name: str, msa: bool, baselines: set[str], args, retriever: MiniLMRetriever) -> list[Row]:
    """Every (size, generator, seed) memory on one server: ingested once, then every question in
    the server's MSA modes (when `msa`) and the baselines it runs."""
    client, rows = ChatClient(url, args.max_tokens), []
    for size in (int(s) for s in args.sizes.split(",")):
        for generator in args.generators.split(","):
            for seed in range(args.seeds):
                task = make_task(generator, size, seed, args)
                memory_id = f"q-{size}-{generator}-{seed}"
                memory_tokens, ingest_tok_s = ingest(url, memory_id, task)
                print(json.dumps({"server": name, "size": size, "generator": generator, "seed": seed,
                                  "documents": len(task.documents), "memory_tokens": memory_tokens,
                                  "ingest_tok_s": round(ingest_tok_s)}), flush=True)
                if "rag" in baselines:
                    retriever.index([d.doc_id for d in task.documents], [d.text for d in task.documents])
                for question in task.questions:
                    fields = {}
                    if msa:
                        fields.update({name + suffix: {**f, "ingest_tok_s": ingest_tok_s}
                                       for suffix, f in ask_msa(client, memory_id, question, args).items()})
                    if "rag" in baselines:
                        fields["rag"] = ask_rag(client, retriever, task, question, args)
                    if "dense" in baselines and memory_tokens + 300 < args.context_limit:
                        fields["dense"] = ask_dense(client, task, question)
                    rows += [Row(size=size, generator=generator, family=question.family, seed=seed,
                                 mode=mode, memory_tokens=memory_tokens,
                                 question=question.question, gold=question.gold_doc_ids,
                                 em=exact_match(f["answer"], question.answers), **f) for mode, f in fields.items()]
                requests.delete(f"{url}/v1/memories/{memory_id}", timeout=600).raise_for_status()
    if msa and not client.explains:
        print(f"{name}: the server has no msa.explain_doc_ids; haystack-above is null", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--sizes", default="16000,65536,262144,1048576", help="memory sizes in tokens (approximate)")
    parser.add_argument("--generators", default="niah,heldout")
    parser.add_argument("--systems", default="dense,rag,msa-old,msa-new,msa-adapter-closed,msa-adapter")
    parser.add_argument("--systems-file", type=Path, default=Path(__file__).with_name("quality_systems.json"))
    parser.add_argument("--niah-variant", default="single", choices=generators.NIAH_VARIANTS)
    parser.add_argument("--heldout-families", default=",".join(heldout.FAMILIES),
                        help="question i of a held-out memory is of family i mod the list")
    parser.add_argument("--seeds", type=int, default=1, help="memories per (size, generator)")
    parser.add_argument("--questions", type=int, default=8, help="independent questions per memory")
    parser.add_argument("--doc-words", type=int, default=150)
    parser.add_argument("--top-k", type=int, default=16, help="documents per routed layer")
    parser.add_argument("--inject", type=int, default=4, help="documents injected (MSA) / retrieved (rag)")
    parser.add_argument("--content", choices=("full", "pooled"), default="full")
    parser.add_argument("--router-keys", choices=("model", "fp8"), default="model",
                        help="router key storage (MSA option router_key_format)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--context-limit", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality_heldout"))
    args = parser.parse_args()

    started = time.perf_counter()
    chosen = args.systems.split(",")
    defined = load_systems(args.systems_file)
    unknown = [s for s in chosen if s not in defined and s not in BUILT_IN]
    if unknown:
        parser.error(f"unknown systems {unknown}; built in: {BUILT_IN}, in {args.systems_file}: {sorted(defined)}")
    model = args.model_path or prepare_embedded_model()
    shared = {"top_k_docs": args.top_k, "memory_content": args.content, "memory_budget_mb": 16384,
              "max_injected_tokens": 4096, "router_key_format": args.router_keys}
    servers = [(s, {**shared, **defined[s]}, True) for s in chosen if s in defined] or [("base", shared, False)]
    baselines = {s for s in chosen if s in BUILT_IN}
    retriever = MiniLMRetriever() if "rag" in baselines else None
    rows, failed, pending = [], {}, baselines  # the baselines run on the first server that starts
    for name, options, msa in servers:
        server_args = ["--max-total-tokens", "65536", "--msa-config", json.dumps(options), "--log-level", "warning",
                       "--context-length", str(args.context_limit)]
        try:
            server = start_server(model, "msa", extra_args=server_args, startup_timeout_s=600)
        except Exception as exc:  # a system whose options this plugin lacks: report it, run the others
            failed[name] = f"{type(exc).__name__}: {exc}"[-2000:]
            print(f"{name}: server did not start: {failed[name][-300:]}", flush=True)
            continue
        with server:
            rows += run_server(server.base_url, name, msa, pending, args, retriever)
        pending = set()
    summaries = summarize(rows)
    wall_s = time.perf_counter() - started
    print("\n" + table(summaries) + f"\n\nwall time {wall_s / 60:.1f} min")
    write(args.out, {"machine": platform.platform(), "model": str(model), "args": {k: str(v) for k, v in vars(args).items()},
                     "systems": {name: options for name, options, _ in servers}, "failed_systems": failed,
                     "wall_s": wall_s}, rows, summaries)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
