"""How often the support pipeline's first stage finds the right FAQ entry.

Each of the 240 packaged QA questions belongs to one of the 40 FAQ entries (``faq_id``);
the ``FaqIndex`` (bare-backbone cosine, no adapter) should rank that entry first, or at
least within the ``top_k`` that the similarity task re-ranks. Three ways of indexing an
entry are measured: its question alone; its question followed by its context, as one text;
and that text's cosine averaged with the closest context sentence's (the default).

With ``--squad FILE`` (SQuAD v1.1 JSON) the same is measured on SQuAD: up to 600 questions
(a fixed sample) against every paragraph of the file's last 10 articles, each paragraph an
entry without a question, a check that the default was not fitted to the packaged FAQ.

    .venv/bin/python benchmarks/faq_retrieval.py --squad ../shared/data/squad/dev-v1.1.json
    # -> results/faq_retrieval.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from mtpeft.embeddings import embed_texts
from mtpeft.faq import FaqEntry, FaqIndex, load_faq, packaged_faq_path
from mtpeft.model import MultiTaskModel
from mtpeft.tasks.presets import support_data_dir
from speedkit import machine

HERE = Path(__file__).resolve().parent


def rank_quality(model: MultiTaskModel, entries: list[FaqEntry], questions: list[dict], has_questions: bool = True) -> dict:
    """Top-k accuracy and mean reciprocal rank of each indexing variant; ``questions`` name their ``faq_id``."""
    queries = embed_texts(model, [q["question"] for q in questions])  # (Q, H)
    full = FaqIndex.build(model, entries)
    indexes = {"question": FaqIndex.build(model, entries, with_context=False)} if has_questions else {}
    indexes |= {"question+context": FaqIndex(entries, full.vectors), "question+context, closest sentence (default)": full}
    variants = {}
    for name, index in indexes.items():
        ranks = []
        for q, vector in zip(questions, queries):
            order = [e.id for e, _ in index.search(vector, len(entries))]
            ranks.append(order.index(q["faq_id"]) + 1)
        variants[name] = {"accuracy": {f"top_{k}": sum(r <= k for r in ranks) / len(ranks) for k in (1, 3, 5, 10)},
                          "mean_reciprocal_rank": sum(1 / r for r in ranks) / len(ranks)}
    return variants


def squad_as_faq(path: str, articles: int = 10, sample: int = 600) -> tuple[list[FaqEntry], list[dict]]:
    """The last ``articles`` articles' paragraphs as entries (no question), and a fixed sample of their questions."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)["data"][-articles:]
    entries, questions = [], []
    for article in data:
        for paragraph in article["paragraphs"]:
            entry = FaqEntry(f"p{len(entries)}", "", paragraph["context"])
            entries.append(entry)
            questions += [{"question": qa["question"], "faq_id": entry.id} for qa in paragraph["qas"]]
    return entries, random.Random(0).sample(questions, min(sample, len(questions)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--squad", help="a SQuAD v1.1 JSON file to measure on as well")
    parser.add_argument("--out", default=str(HERE.parent / "results" / "faq_retrieval.json"))
    args = parser.parse_args()

    model = MultiTaskModel.from_backbone(args.backbone)
    entries = load_faq(packaged_faq_path())
    with open(support_data_dir() / "qa.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    questions = [row for row in rows if row["answers"]]  # the unanswerable rows pair a question with another entry
    started = time.perf_counter()
    variants = rank_quality(model, entries, questions)
    seconds = time.perf_counter() - started
    result = {"benchmark": "faq_retrieval", "backbone": args.backbone, "faq_entries": len(entries),
              "questions": len(questions), "index": variants, "seconds (CPU, all variants)": round(seconds, 2)}
    if args.squad:
        squad_entries, squad_questions = squad_as_faq(args.squad)
        result["squad"] = {"file": args.squad, "paragraphs": len(squad_entries), "questions": len(squad_questions),
                           "index": rank_quality(model, squad_entries, squad_questions, has_questions=False)}
    result["date"] = time.strftime("%Y-%m-%d")
    result["machine"] = machine()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for label, found in (("packaged FAQ", variants), ("SQuAD", result.get("squad", {}).get("index", {}))):
        for name, v in found.items():
            print(f"{label:12} {name:46} {json.dumps(v['accuracy'])} MRR {v['mean_reciprocal_rank']:.3f}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
