"""Does ``torch.compile`` speed up inference? Eager against compiled, side by side in one process.

The same four-task model as ``mixed_batch.py`` (LoRA r=8 on query/value, bf16 weights), batch
64 x 64 tokens: a mixed batch (each row its own task's adapter) and a single-task batch (its
adapter merged into the weights), each eager and with the backbone compiled (dynamic shapes,
weights not frozen, so merged and unmerged adapters stay visible to the compiled graph).
Round robin, median of the repeats; the first compiled call, compilation included, is timed apart.

    .venv/bin/python benchmarks/compile_inference.py   # -> results/compile_inference.json
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch
from mixed_batch import TASKS, build_models
from speedkit import round_robin, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = build_models()[0]
    eager.bf16 = True
    compiled = copy.deepcopy(eager)
    vocab = eager.tokenizer.vocab_size
    batch = {"input_ids": torch.randint(1000, vocab, (args.batch, args.tokens)),
             "attention_mask": torch.ones(args.batch, args.tokens, dtype=torch.long),
             "token_type_ids": torch.zeros(args.batch, args.tokens, dtype=torch.long)}
    row_tasks = [TASKS[i % len(TASKS)].name for i in range(args.batch)]
    random.Random(0).shuffle(row_tasks)
    n = args.batch

    def run(model, tasks):
        def call():
            if isinstance(tasks, str):  # a single-task batch merges its adapter, as MultiTaskModel.run does
                model.merge_adapter(tasks)
            model.encode(batch, tasks)
            return n
        return call

    with torch.inference_mode():
        reference = eager.encode(batch, row_tasks)
        compiled.backbone.compile(dynamic=True)
        start = time.perf_counter()
        first = compiled.encode(batch, row_tasks)
        first_call_seconds = time.perf_counter() - start
        difference = float((first - reference).abs().max())
        results = round_robin({
            "eager_mixed": run(eager, row_tasks),
            "compiled_mixed": run(compiled, row_tasks),
            "eager_single_task": run(eager, TASKS[0].name),
            "compiled_single_task": run(compiled, TASKS[0].name),
        }, args.repeats)
    ratios = {kind: round(results[f"compiled_{kind}"]["examples_per_s"] / results[f"eager_{kind}"]["examples_per_s"], 2)
              for kind in ("mixed", "single_task")}
    write_result("compile_inference", {
        "setup": {"tasks": [s.name for s in TASKS], "batch": args.batch, "tokens": args.tokens, "repeats": args.repeats,
                  "compile": "backbone.compile(dynamic=True), weights not frozen"},
        "first_compiled_call_seconds": round(first_call_seconds, 1),
        "max_abs_difference_compiled_vs_eager_bf16": difference,
        "results": results, "compiled / eager": ratios,
    }, args.out)


if __name__ == "__main__":
    main()
