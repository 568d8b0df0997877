"""Mixed-task batch throughput, side by side in one process:

1. mtpeft: one forward pass in which each row uses its own task's LoRA adapter
   (``MultiTaskModel.encode`` with one task name per row), then each row's own head;
2. peft: the same four adapters, mixed batch through ``adapter_names=`` (inference only);
3. peft, one adapter merged into the backbone (``merge_and_unload``): a plain forward pass,
   the fastest a single-task batch can be in peft;
4. peft serving the same mixed batch with merged adapters: for each task, merge its adapter,
   run its rows, unmerge (what merging costs a server that sees several tasks at once);
5. context: mtpeft's joint model (the four tasks' heads on one shared adapter, as
   ``mtpeft train-joint`` trains): every row uses the one adapter, so ``MultiTaskModel.run``
   merges it into the backbone and the mixed batch is a plain forward pass plus the heads.

Four tasks with different heads (classification, regression, pair classification, extractive
QA), LoRA r=8 on query/value, batch 64 x 64 tokens (16 rows per task, shuffled), packaged
MiniLM, fp32 and bf16. peft in bf16 is measured both ways users run it: under
``torch.autocast`` with fp32 weights, and with the model cast to bf16. Every configuration is
timed in turn (round robin) and the median of the repeats is reported.

    .venv/bin/python benchmarks/mixed_batch.py   # -> results/mixed_batch.json

``--device cuda`` runs the same comparison on a GPU (timers wait for the GPU's queued work);
give it its own ``--out``, since the default file holds the CPU's figures.
"""

from __future__ import annotations

import argparse
import copy
import random

import torch
from peft import LoraConfig, get_peft_model
from speedkit import matmul_flops_per_example, matmul_peak_tflops, round_robin, synchronizer, write_result
from transformers import AutoModel

from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.backbone import load_backbone, resolve_backbone_path
from mtpeft.config import LoraSettings
from mtpeft.joint import build_joint_model
from mtpeft.model import SHARED_ADAPTER

TASKS = [
    TaskSpec(name="sentiment", type="classification", labels=["negative", "positive"]),
    TaskSpec(name="similarity", type="regression", text_pair_column="sentence2", label_range=[0.0, 5.0]),
    TaskSpec(name="paraphrase", type="pair-classification", text_pair_column="sentence2", labels=["no", "yes"]),
    TaskSpec(name="qa", type="extractive-qa", text_pair_column="context", max_length=384, doc_stride=128),
]
RANK = 8


def build_models(seed: int = 0):
    torch.manual_seed(seed)
    backbone = load_backbone("default")
    ours = MultiTaskModel(backbone).eval()
    for spec in TASKS:
        ours.add_task(spec, LoraSettings(r=RANK, alpha=2 * RANK))
    for layer in ours.lora_layers().values():
        for task in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[task].weight, std=0.02)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["query", "value"], lora_dropout=0.0)
    theirs = get_peft_model(AutoModel.from_pretrained(resolve_backbone_path("default")), config, adapter_name=TASKS[0].name)
    for spec in TASKS[1:]:
        theirs.add_adapter(spec.name, config)
    # The same adapter weights in both libraries.
    ours_state = {}
    for path, layer in ours.lora_layers().items():
        for task in layer.lora_A:
            ours_state[f"{path}.lora_A.{task}.weight"] = layer.lora_A[task].weight
            ours_state[f"{path}.lora_B.{task}.weight"] = layer.lora_B[task].weight
    with torch.no_grad():
        copied = 0
        for name, param in theirs.named_parameters():
            key = name.removeprefix("base_model.model.")
            if key in ours_state:
                param.copy_(ours_state[key])
                copied += 1
    assert copied == len(ours_state), (copied, len(ours_state))
    theirs.eval()
    merged_source = copy.deepcopy(theirs)
    merged_source.set_adapter(TASKS[0].name)
    merged = merged_source.merge_and_unload(adapter_names=[TASKS[0].name]).eval()
    # Its own backbone: merging changes the backbone's weights, which ``ours`` must not see.
    joint = build_joint_model(load_backbone("default"), TASKS, LoraSettings(r=RANK, alpha=2 * RANK), seed=seed).eval()
    for layer in joint.lora_layers().values():
        torch.nn.init.normal_(layer.lora_B[SHARED_ADAPTER].weight, std=0.02)
    return ours, theirs, merged, joint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours, theirs, merged, joint = (model.to(device) for model in build_models())
    vocab = ours.tokenizer.vocab_size
    batch = {"input_ids": torch.randint(1000, vocab, (args.batch, args.tokens)),
             "attention_mask": torch.ones(args.batch, args.tokens, dtype=torch.long),
             "token_type_ids": torch.zeros(args.batch, args.tokens, dtype=torch.long)}
    batch = {k: v.to(device) for k, v in batch.items()}
    row_tasks = [TASKS[i % len(TASKS)].name for i in range(args.batch)]
    random.Random(0).shuffle(row_tasks)
    groups = {spec.name: torch.tensor([i for i, t in enumerate(row_tasks) if t == spec.name], device=device)
              for spec in TASKS}
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    n = args.batch

    def ours_backbone():
        ours.encode(batch, row_tasks)
        return n

    def ours_with_heads():
        hidden = ours.encode(batch, row_tasks)
        for task, rows in groups.items():
            ours.heads[task](hidden[rows], batch["attention_mask"][rows])
        return n

    def joint_with_heads():
        joint.merge_adapter(SHARED_ADAPTER)  # as MultiTaskModel.run does for rows that share one adapter
        hidden = joint.encode(batch, row_tasks)
        for task, rows in groups.items():
            joint.heads[task](hidden[rows], batch["attention_mask"][rows])
        return n

    def peft_mixed(model, autocast):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                model(**plain, adapter_names=row_tasks)
            return n
        return run

    def peft_merge_per_task(model, autocast):
        """How a peft user serves mixed traffic with merged adapters: per task, merge, run its rows, unmerge."""
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                for task, rows in groups.items():
                    model.set_adapter(task)
                    model.merge_adapter()
                    model(**{k: v[rows] for k, v in plain.items()})
                    model.unmerge_adapter()
            return n
        return run

    def plain_forward(model, autocast):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                model(**plain)
            return n
        return run

    # Equivalence check before timing: our mixed rows equal peft's mixed rows (fp32).
    ours.bf16 = False
    with torch.inference_mode():
        difference = (ours.encode(batch, row_tasks) - theirs(**plain, adapter_names=row_tasks).last_hidden_state).abs().max()
    assert difference < 1e-4, f"mtpeft and peft disagree by {difference}"
    joint.bf16 = False
    with torch.inference_mode():
        unmerged = joint.encode(batch, row_tasks)
        joint.merge_adapter(SHARED_ADAPTER)
        joint_difference = (joint.encode(batch, row_tasks) - unmerged).abs().max()
    assert joint_difference < 1e-4, f"the joint model's merged adapter changes its rows by {joint_difference}"

    peak = matmul_peak_tflops(device=device)
    sync = synchronizer(device)
    results = {}
    with torch.inference_mode():
        ours.bf16 = False
        results["fp32"] = round_robin({
            "mtpeft_mixed": ours_backbone,
            "mtpeft_mixed_with_heads": ours_with_heads,
            "peft_mixed": peft_mixed(theirs, False),
            "peft_merged_single": plain_forward(merged, False),
            "peft_merge_per_task": peft_merge_per_task(theirs, False),
            "mtpeft_joint_mixed_with_heads": joint_with_heads,
        }, args.repeats, sync=sync)
        ours.bf16 = joint.bf16 = True
        theirs_bf16 = copy.deepcopy(theirs).to(torch.bfloat16)
        merged_bf16 = copy.deepcopy(merged).to(torch.bfloat16)
        results["bf16"] = round_robin({
            "mtpeft_mixed": ours_backbone,
            "mtpeft_mixed_with_heads": ours_with_heads,
            "peft_mixed_autocast": peft_mixed(theirs, True),
            "peft_mixed_bf16_weights": peft_mixed(theirs_bf16, False),
            "peft_merged_single_autocast": plain_forward(merged, True),
            "peft_merged_single_bf16_weights": plain_forward(merged_bf16, False),
            # fp32 weights under autocast: merging into bf16 weights and back would drift.
            "peft_merge_per_task_autocast": peft_merge_per_task(theirs, True),
            "mtpeft_joint_mixed_with_heads": joint_with_heads,
        }, args.repeats, sync=sync)
    flops_per_example = matmul_flops_per_example(ours.backbone, args.tokens)
    ratios = {}
    for precision, rows in results.items():
        ours_rate = rows["mtpeft_mixed"]["examples_per_s"]
        for name, row in rows.items():
            if name.startswith("peft"):
                ratios[f"{precision}: mtpeft_mixed / {name}"] = round(ours_rate / row["examples_per_s"], 2)
        ratios[f"{precision}: mtpeft_joint_mixed_with_heads / mtpeft_mixed_with_heads"] = round(
            rows["mtpeft_joint_mixed_with_heads"]["examples_per_s"] / rows["mtpeft_mixed_with_heads"]["examples_per_s"], 2)
        for row in rows.values():
            row["fraction_of_bf16_peak"] = round(row["examples_per_s"] * flops_per_example / (peak["tflops"] * 1e12), 3)
    write_result("mixed_batch", {
        "setup": {"tasks": [s.name for s in TASKS], "rank": RANK, "targets": ["query", "value"], "batch": args.batch,
                  "tokens": args.tokens, "repeats": args.repeats, "device": str(device), "rows_per_task": args.batch // len(TASKS),
                  "check_fp32_max_abs_difference_vs_peft": float(difference),
                  "check_fp32_joint_merged_vs_unmerged": float(joint_difference),
                  "forward_flops_per_example": flops_per_example},
        "bf16_matmul_peak": peak,
        "results": results,
        "ratios": ratios,
        "targets": {"vs_peft_mixed": 2.0, "vs_peft_merged_single": 1.3},
    }, args.out, device=device)


if __name__ == "__main__":
    main()
