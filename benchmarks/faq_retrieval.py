"""How often the support pipeline's first stage finds the right FAQ entry.

Each of the 240 packaged QA questions belongs to one of the 40 FAQ entries (``faq_id``);
the ``FaqIndex`` (bare-backbone cosine, no adapter) should rank that entry first, or at
least within the ``top_k`` that the similarity task re-ranks. Both ways of indexing an
entry are measured: its question alone, and its question followed by its context (the default).

    .venv/bin/python benchmarks/faq_retrieval.py  # -> results/faq_retrieval.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mtpeft.embeddings import embed_texts
from mtpeft.faq import FaqIndex, load_faq, packaged_faq_path
from mtpeft.model import MultiTaskModel
from mtpeft.tasks.presets import support_data_dir

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--out", default=str(HERE.parent / "results" / "faq_retrieval.json"))
    args = parser.parse_args()

    model = MultiTaskModel.from_backbone(args.backbone)
    entries = load_faq(packaged_faq_path())
    with open(support_data_dir() / "qa.jsonl", encoding="utf-8") as f:
        questions = [json.loads(line) for line in f if line.strip()]
    started = time.perf_counter()
    queries = embed_texts(model, [q["question"] for q in questions])  # (Q, H)
    variants = {}
    for name, with_context in (("question", False), ("question+context (default)", True)):
        index = FaqIndex.build(model, entries, with_context=with_context)
        ranks = []
        for q, vector in zip(questions, queries):
            order = [e.id for e, _ in index.search(vector, len(entries))]
            ranks.append(order.index(q["faq_id"]) + 1)
        variants[name] = {"accuracy": {f"top_{k}": sum(r <= k for r in ranks) / len(ranks) for k in (1, 3, 5, 10)},
                          "mean_reciprocal_rank": sum(1 / r for r in ranks) / len(ranks)}
    seconds = time.perf_counter() - started
    result = {"benchmark": "faq_retrieval", "backbone": args.backbone, "faq_entries": len(entries),
              "questions": len(questions), "index": variants, "seconds (CPU, both variants)": round(seconds, 2),
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, v in variants.items():
        print(f"{name:28} {json.dumps(v['accuracy'])} MRR {v['mean_reciprocal_rank']:.3f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
