"""The support pipeline end to end on held-out customer questions, with trained skills.

For each answerable QA question the demo held out of training (every 6th of
``qa.jsonl``), the pipeline must pick the FAQ entry the question belongs to and extract
its answer. Three ways of picking the entry among the ``top_k`` retrieved are compared:
the retrieval score (what the pipeline answers from), the similarity task's score (the
order of the "similar questions" list), and their sum. The held-out unanswerable rows (a
question paired with another entry's context) measure how often the QA skill, given an
entry that does not answer, says so ("no answer": an empty span or one below the
pipeline's threshold) rather than extract something.

    .venv/bin/mtpeft demo --out runs/demo   # trains the three skills (minutes on a CPU)
    .venv/bin/python benchmarks/support_eval.py --bundle runs/demo  # -> results/support_eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from mtpeft.examples import Example
from mtpeft.metrics import squad_metrics
from mtpeft.model import MultiTaskModel
from mtpeft.support import SupportPipeline
from mtpeft.tasks.presets import get_preset, support_data_dir
from speedkit import machine

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="runs/demo")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--out", default=str(HERE.parent / "results" / "support_eval.json"))
    args = parser.parse_args()

    model = MultiTaskModel.load(args.bundle)
    pipeline = SupportPipeline(model, top_k=args.top_k)
    every = get_preset("faq-answer").layout.holdout_every
    with open(support_data_dir() / "qa.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    held_all = [row for i, row in enumerate(rows) if i % every == every - 1]  # the rows the demo held out
    held = [row for row in held_all if row["answers"]]
    unanswerable = [row for row in held_all if not row["answers"]]

    picks = {"retrieval (the pipeline's answer entry)": [], "similarity (first of the similar list)": [], "sum": []}
    answers, gold, latencies = {}, {}, []
    for row in held:
        started = time.perf_counter()
        reply = pipeline.answer(row["question"])
        latencies.append(time.perf_counter() - started)
        picks["retrieval (the pipeline's answer entry)"].append(reply.answer.faq_id == row["faq_id"])
        picks["similarity (first of the similar list)"].append(reply.similar[0].id == row["faq_id"])
        picks["sum"].append(max(reply.similar, key=lambda s: s.score + s.retrieval_score).id == row["faq_id"])
        answers[row["id"]] = "" if reply.answer.no_answer else reply.answer.text
        gold[row["id"]] = [a["text"] for a in row["answers"]]
    # The QA skill alone, given the right context: the ceiling for the pipeline's answers.
    oracle = model.run([("faq-answer", Example(text=r["question"], text_pair=r["context"])) for r in held])
    refused = model.run([("faq-answer", Example(text=r["question"], text_pair=r["context"])) for r in unanswerable])
    latencies.sort()
    result = {
        "benchmark": "support_eval", "bundle": str(args.bundle), "questions": len(held), "top_k": args.top_k,
        "right_entry_picked_by": {k: sum(v) / len(v) for k, v in picks.items()},
        "answers (no-answer counts as wrong)": squad_metrics(answers, gold),
        "answers_with_the_right_context (QA skill alone)": squad_metrics(
            {r["id"]: p.answer for r, p in zip(held, oracle)}, gold),
        "no_answer_rate": sum(1 for a in answers.values() if not a) / len(answers),
        "unanswerable (question with another entry's context)": {
            "questions": len(unanswerable),
            "said_no_answer": sum(not p.answer.strip() or p.score < pipeline.answer_threshold for p in refused)
            / max(len(unanswerable), 1)},
        "latency_ms (one message, CPU)": {"p50": 1000 * latencies[len(latencies) // 2],
                                          "p90": 1000 * latencies[int(len(latencies) * 0.9)]},
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in list(result)[4:10]}, indent=2), f"-> {out}")


if __name__ == "__main__":
    main()
