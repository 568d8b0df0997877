"""Single-task inference speed, side by side in one process, against the usual recipe:

1. common recipe: a ``peft`` LoRA classifier (adapter not merged), fp32, inputs padded to 128;
2. peft hand-tuned: LoRA merged (``merge_and_unload``), bf16 autocast, dynamic padding;
3. mtpeft defaults: ``MultiTaskModel.predict`` (bf16 weights, LoRA merged for single-task
   batches, tokenisation and post-processing included).

Every configuration starts from raw texts (tokenisation included), batch 64, 64 tokens per
text (IMDb reviews cut at 64 tokens), round robin, median of the repeats, beside the
measured bf16 matmul peak of this run. The three share one adapter; with ``--sst2-dir`` (a
trained SST-2 task folder, e.g. from ``mtpeft train --task sst2``) each is also scored on
the SST-2 dev set, so a faster setting cannot silently cost accuracy; without it, label
agreement with the fp32 recipe is reported.

    .venv/bin/python benchmarks/infer_speed.py --sst2-dir runs/sst2   # -> results/infer_speed.json
"""

from __future__ import annotations

import argparse
import copy

import torch
from peft import LoraConfig, get_peft_model
from speedkit import matmul_flops_per_example, matmul_peak_tflops, peak_rss_mib, reset_peak_rss, round_robin, write_result
from train_speed import DATA, fixed_shape_texts
from transformers import AutoModelForSequenceClassification

from mtpeft import MultiTaskModel
from mtpeft.backbone import resolve_backbone_path
from mtpeft.config import LoraSettings
from mtpeft.sources import load_task_data
from mtpeft.tasks.presets import get_preset

BATCH, TOKENS = 64, 64


def mtpeft_model(sst2_dir: str | None) -> MultiTaskModel:
    if sst2_dir:
        return MultiTaskModel.load(sst2_dir)
    model = MultiTaskModel.from_backbone()
    model.add_task(get_preset("sst2").spec, LoraSettings(r=8, alpha=16))
    torch.manual_seed(0)
    for layer in model.lora_layers().values():
        torch.nn.init.normal_(layer.lora_B["sst2"].weight, std=0.02)
    return model


def peft_copy(ours: MultiTaskModel):
    """A peft classifier holding the same adapter and head as ``ours``' task ``sst2``."""
    lora = ours.adapters["sst2"]
    base = AutoModelForSequenceClassification.from_pretrained(resolve_backbone_path("default"), num_labels=2)
    model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                                            task_type="SEQ_CLS", lora_dropout=0.0))
    ours_params = {}
    for path, layer in ours.lora_layers("sst2").items():
        ours_params[f"{path}.lora_A.default.weight"] = layer.lora_A["sst2"].weight
        ours_params[f"{path}.lora_B.default.weight"] = layer.lora_B["sst2"].weight
    copied = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = name.removeprefix("base_model.model.bert.")
            if key in ours_params:
                param.copy_(ours_params[key])
                copied += 1
        head = ours.heads["sst2"].out
        model.base_model.model.classifier.weight.copy_(head.weight)
        model.base_model.model.classifier.bias.copy_(head.bias)
    assert copied == len(ours_params), (copied, len(ours_params))
    return model.eval()


def mean_pooling_classifier(model):
    """peft's classifier pools BERT's [CLS] + pooler; ours mean-pools: use the same head both ways."""
    bert = model.base_model.model.bert
    classifier = model.base_model.model.classifier

    def logits(**inputs):
        hidden = bert(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return classifier((hidden * mask).sum(1) / mask.sum(1))
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sst2-dir", default=None)
    parser.add_argument("--batches", type=int, default=4, help="batches of 64 per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ours = mtpeft_model(args.sst2_dir).eval()
    tokenizer = ours.tokenizer
    texts, _ = fixed_shape_texts(tokenizer, BATCH * args.batches)
    common_model = peft_copy(ours)
    common = mean_pooling_classifier(common_model)
    tuned_model = copy.deepcopy(common_model).merge_and_unload()
    tuned_bert, tuned_head = tuned_model.bert, tuned_model.classifier

    def tuned(**inputs):
        hidden = tuned_bert(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return tuned_head((hidden * mask).sum(1) / mask.sum(1))

    def run_common(batch_texts):
        encoded = tokenizer(batch_texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            return common(**encoded).argmax(-1).tolist()

    def run_tuned(batch_texts):
        encoded = tokenizer(batch_texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return tuned(**encoded).argmax(-1).tolist()

    labels = ours.specs["sst2"].labels

    def run_ours(batch_texts):
        return [labels.index(p.label) for p in ours.predict(batch_texts, task="sst2", batch_size=BATCH)]

    runners = {"common_recipe": run_common, "peft_hand_tuned": run_tuned, "mtpeft_defaults": run_ours}
    batches = [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]

    def timed(runner):
        def go() -> int:
            for batch in batches:
                runner(batch)
            return len(texts)
        return go

    memory = {}
    for name, runner in runners.items():
        reset_peak_rss()
        timed(runner)()
        memory[name] = peak_rss_mib()
    peak = matmul_peak_tflops()
    rates = round_robin({name: timed(r) for name, r in runners.items()}, args.repeats)
    flops = matmul_flops_per_example(ours.backbone, TOKENS)
    limit = peak["tflops"] * 1e12 / flops
    for name, row in rates.items():
        row["tokens_per_s"] = round(row["examples_per_s"] * (128 if name == "common_recipe" else TOKENS), 1)
        row["fraction_of_bf16_limit"] = round(row["examples_per_s"] / limit, 3)
        row["peak_rss_mib_process"] = memory[name]

    quality = {}
    if args.sst2_dir:
        preset = get_preset("sst2")
        dev = load_task_data(preset.spec, DATA / "glue" / "SST-2", layout=preset.layout).eval
        gold = [int(e.label) for e in dev]
        for name, runner in runners.items():
            predicted = [y for i in range(0, len(dev), BATCH) for y in runner([e.text for e in dev[i:i + BATCH]])]
            quality[name] = {"sst2_dev_accuracy": round(100 * sum(p == g for p, g in zip(predicted, gold)) / len(gold), 2)}
    else:
        reference = [y for b in batches for y in run_common(b)]
        for name, runner in runners.items():
            predicted = [y for b in batches for y in runner(b)]
            quality[name] = {"label_agreement_with_fp32": round(sum(p == r for p, r in zip(predicted, reference))
                                                                / len(reference), 4)}
    write_result("infer_speed", {
        "setup": {"batch": BATCH, "tokens": TOKENS, "texts": len(texts), "repeats": args.repeats,
                  "forward_flops_per_example": flops,
                  "adapter": "trained SST-2 task" if args.sst2_dir else "random LoRA r=8 (no trained task given)",
                  "head": "mean pooling + linear, identical in all three"},
        "bf16_matmul_peak": peak, "limit_examples_per_s": round(limit, 1), "results": rates,
        "ratios": {"mtpeft / peft_hand_tuned": round(rates["mtpeft_defaults"]["examples_per_s"]
                                                    / rates["peft_hand_tuned"]["examples_per_s"], 2),
                   "mtpeft / common_recipe": round(rates["mtpeft_defaults"]["examples_per_s"]
                                                  / rates["common_recipe"]["examples_per_s"], 2)},
        "quality": quality, "targets": {"fraction_of_bf16_limit": 0.5},
    }, args.out)


if __name__ == "__main__":
    main()
