"""The quality benchmark's systems file, per-question rows, summaries, table and plots.

A row is one question asked in one mode: `dense`, `rag`, or an MSA system's name (plain) or
name + `+inject`. Summaries group rows by (size, generator, mode)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import RootModel

BUILT_IN = ("dense", "rag")
INJECT = "+inject"


class SystemsFile(RootModel[dict[str, dict]]):
    """{system name: the server's --msa-config options for that system}; `dense` and `rag` are
    built in and need no entry."""


def load_systems(path: Path) -> dict[str, dict]:
    systems = SystemsFile.model_validate_json(Path(path).read_text()).root
    clash = set(systems) & set(BUILT_IN)
    if clash:
        raise ValueError(f"{sorted(clash)} are built-in systems, not MSA server configs")
    return systems


@dataclass(frozen=True)
class Row:
    size: int  # requested memory tokens
    generator: str
    family: str  # the question's NIAH variant or held-out family
    seed: int
    mode: str
    memory_tokens: int  # as the server measured (the generator's estimate for dense/rag)
    question: str
    gold: list[str]
    answer: str
    em: bool
    ttft_s: float | None
    recall_layer: float | None = None  # mean over routed layers of recall@top_k
    recall_union: float | None = None  # union of the routed layers' selections
    recall_top: float | None = None  # injected (MSA) or retrieved (RAG) recall@inject
    above: float | None = None  # median over layers (MSA) of the haystack-above fraction
    ingest_tok_s: float | None = None


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rows: list[Row]) -> list[dict]:
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.size, row.generator, row.mode), []).append(row)
    summaries = []
    for (size, generator, mode), group in groups.items():
        ttft = _median([r.ttft_s for r in group])
        summaries.append({
            "size": size, "generator": generator, "mode": mode, "questions": len(group),
            "memory_tokens": round(statistics.fmean(r.memory_tokens for r in group)),
            "em": _mean([float(r.em) for r in group]), "ttft_ms": ttft * 1000 if ttft is not None else None,
            "recall_layer": _mean([r.recall_layer for r in group]),
            "recall_union": _mean([r.recall_union for r in group]),
            "recall_top": _mean([r.recall_top for r in group]), "above": _median([r.above for r in group]),
            "ingest_tok_s": _mean([r.ingest_tok_s for r in group]),
        })
    return summaries


COLUMNS = (("size", "size", "{:d}"), ("generator", "generator", "{}"), ("mode", "system", "{}"),
           ("memory_tokens", "memory tok", "{:d}"), ("questions", "qs", "{:d}"), ("em", "EM", "{:.2f}"),
           ("ttft_ms", "TTFT ms", "{:.0f}"), ("recall_layer", "R@16 layer", "{:.2f}"),
           ("recall_union", "R union", "{:.2f}"), ("recall_top", "R@4", "{:.2f}"), ("above", "above", "{:.3f}"),
           ("ingest_tok_s", "ingest tok/s", "{:.0f}"))


def table(summaries: list[dict]) -> str:
    """A Markdown table: one line per (size, generator, mode); n/a where a mode has no value."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---:" if fmt != "{}" else "---" for _, _, fmt in COLUMNS) + "|"]
    for s in summaries:
        cells = [fmt.format(s[key]) if s[key] is not None else "n/a" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PANELS = (("em", "answer exact match"), ("recall_layer", "router recall@16 per layer"),
          ("recall_top", "recall@4 (injected / MiniLM)"), ("above", "haystack above the gold doc (median)"))


def plot(summaries: list[dict], out: Path) -> None:
    """One row of panels per generator; x = memory tokens (log), one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generators = sorted({s["generator"] for s in summaries})
    modes = list(dict.fromkeys(s["mode"] for s in summaries))  # one colour per mode in every panel
    figure, axes = plt.subplots(len(generators), len(PANELS), figsize=(4.2 * len(PANELS), 3.6 * len(generators)),
                                squeeze=False)
    for row_axes, generator in zip(axes, generators):
        mine = [s for s in summaries if s["generator"] == generator]
        for axis, (key, title) in zip(row_axes, PANELS):
            for colour, mode in enumerate(modes):
                points = sorted((s["memory_tokens"], s[key]) for s in mine if s["mode"] == mode and s[key] is not None)
                if points:
                    axis.plot(*zip(*points), marker="o", label=mode, color=f"C{colour % 10}")
            axis.set_xscale("log")
            axis.set_xlabel("memory tokens")
            axis.set_ylim(-0.05, 1.05)
            axis.set_title(f"{generator}: {title}", fontsize=9)
            if axis.lines:
                axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def write(out: Path, meta: dict, rows: list[Row], summaries: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {**meta, "summaries": summaries, "rows": [asdict(r) for r in rows]}, indent=2))
    plot(summaries, out.with_suffix(".png"))
