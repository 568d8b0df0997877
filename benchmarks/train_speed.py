"""LoRA training speed, side by side in one process, against the usual recipe:

1. common recipe: ``peft`` + ``transformers.Trainer``, fp32, every example padded to 128 tokens,
   LoRA dropout 0.1 (what most LoRA tutorials do);
2. peft hand-tuned: bf16 autocast, dynamic padding, LoRA dropout 0 and backbone dropout off,
   fused AdamW, a plain training loop;
3. mtpeft defaults: ``train_task`` as ``mtpeft train`` runs it;
4. mtpeft compiled: the same with ``TrainConfig(compile=True)`` (``mtpeft train --compile``),
   its one-off compilation timed apart from the repeats.

Part A times each at a fixed shape (batch 32, 64 real tokens per row: IMDb reviews cut at 64
tokens), round robin, median of the repeats, with the measured bf16 matmul peak of this run,
so each figure is also a fraction of the machine's limit (LoRA training of a frozen backbone
costs about 2x a forward pass: activations' gradients, no weight gradients).
Part B trains one epoch of SST-2 (67,349 sentences) with mtpeft's defaults, and again compiled,
and scores dev accuracy; the common recipe is timed on a fixed subset and scaled (stated in the JSON).
Beside it, the epoch's floor: the matmul work of its own padded batches at the measured peak,
the least time any implementation could take for it on this machine (``--floor-only`` computes
just that, into ``results/train_speed_floor.json``).
What bf16 costs in dev-set quality is ``benchmarks/precision_quality.py``'s part.

    .venv/bin/python benchmarks/train_speed.py   # -> results/train_speed.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace

import torch
from peft import LoraConfig, get_peft_model
from speedkit import (DATA, matmul_flops_per_example, matmul_peak_tflops, peak_rss_mib, reset_peak_rss,
                      round_robin, write_result)
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from mtpeft import MultiTaskModel
from mtpeft.backbone import resolve_backbone_path
from mtpeft.batching import bucketed_batches, padded_length
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.examples import Example
from mtpeft.sources import load_task_data
from mtpeft.tasks import task_type
from mtpeft.tasks.presets import get_preset
from mtpeft.train import train_task

RANK, BATCH, TOKENS = 8, 32, 64


class TokenRows(torch.utils.data.Dataset):
    """Pre-tokenised rows for the Trainer."""

    def __init__(self, encoded: dict, labels: list[int]) -> None:
        self.encoded, self.labels = encoded, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        row = {k: torch.tensor(v[i]) for k, v in self.encoded.items()}
        row["labels"] = torch.tensor(self.labels[i])
        return row


def peft_classifier(dropout: float, backbone_dropout: bool):
    extra = {} if backbone_dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = AutoModelForSequenceClassification.from_pretrained(resolve_backbone_path("default"), num_labels=2, **extra)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules=["query", "value"],
                        task_type="SEQ_CLS")
    return get_peft_model(model, config)


def common_recipe_trainer(tokenizer, texts: list[str], labels: list[int], out_dir: str):
    """peft + Trainer, fp32, pad to 128: returns a function that trains on the rows once."""
    model = peft_classifier(dropout=0.1, backbone_dropout=True)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=128)
    rows = TokenRows({k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, labels)

    def run() -> int:
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=BATCH, num_train_epochs=1,
                                 learning_rate=5e-4, logging_strategy="no", save_strategy="no", report_to=[],
                                 disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=rows).train()
        return len(rows)
    return run


def hand_tuned_peft(tokenizer, texts: list[str], labels: list[int]):
    """peft with bf16 autocast, dynamic padding, no dropout, fused AdamW, a plain loop."""
    model = peft_classifier(dropout=0.0, backbone_dropout=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, fused=True)
    batches = []
    for start in range(0, len(texts), BATCH):
        encoded = tokenizer(texts[start:start + BATCH], padding=True, truncation=True, max_length=128, return_tensors="pt")
        batches.append((dict(encoded), torch.tensor(labels[start:start + BATCH])))

    def run() -> int:
        for inputs, y in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return len(texts)
    return run


def mtpeft_defaults(examples: list[Example], config: TrainConfig):
    model = MultiTaskModel.from_backbone()
    model.add_task(get_preset("sst2").spec, config.lora)

    def run() -> int:
        train_task(model, "sst2", examples, config=config, progress=False)
        return len(examples)
    run.model = model
    return run


def fixed_shape_texts(tokenizer, count: int) -> tuple[list[str], list[int]]:
    """IMDb reviews cut to exactly TOKENS tokens (specials included), with their labels."""
    data = load_task_data(get_preset("imdb").spec, DATA / "imdb", layout=get_preset("imdb").layout)
    texts, labels = [], []
    for example in data.train[: count * 2]:
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"][: TOKENS - 2]
        if len(ids) == TOKENS - 2:
            texts.append(tokenizer.decode(ids))
            labels.append(int(example.label))
        if len(texts) == count:
            break
    return texts, labels


def part_a(tokenizer, steps: int, repeats: int, peak: dict) -> dict:
    texts, labels = fixed_shape_texts(tokenizer, steps * BATCH)
    # Decoding and re-encoding can shift a token; keep rows that are exactly TOKENS long.
    keep = [i for i, t in enumerate(texts) if len(tokenizer(t)["input_ids"]) == TOKENS]
    texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    count = (len(texts) // BATCH) * BATCH
    texts, labels = texts[:count], labels[:count]
    examples = [Example(text=t, label=y) for t, y in zip(texts, labels)]
    config = TrainConfig(epochs=1, batch_size=BATCH, lr=5e-4, checkpoint_every=-1, lora=LoraSettings(r=RANK, alpha=2 * RANK))
    with tempfile.TemporaryDirectory() as tmp:
        configs = {"common_recipe": common_recipe_trainer(tokenizer, texts, labels, tmp),
                   "peft_hand_tuned": hand_tuned_peft(tokenizer, texts, labels),
                   "mtpeft_defaults": mtpeft_defaults(examples, config),
                   "mtpeft_compiled": mtpeft_defaults(examples, replace(config, compile=True))}
        memory, first_pass = {}, {}
        for name, run in configs.items():  # one pass each, alone, for peak memory (and warm-up)
            reset_peak_rss()
            start = time.perf_counter()
            run()
            first_pass[name] = round(time.perf_counter() - start, 1)
            memory[name] = peak_rss_mib()
        rates = round_robin(configs, repeats, warmup=0)
        backbone = configs["mtpeft_defaults"].model.backbone
    # Forward + activations' gradients (the frozen weights need none): 2x a forward pass.
    flops = 2 * matmul_flops_per_example(backbone, TOKENS)
    limit = peak["tflops"] * 1e12 / flops
    for name, row in rates.items():
        tokens_per_row = 128 if name == "common_recipe" else TOKENS  # the common recipe pads to 128
        row["tokens_per_s"] = round(row["examples_per_s"] * tokens_per_row, 1)
        row["real_tokens_per_s"] = round(row["examples_per_s"] * TOKENS, 1)
        row["fraction_of_bf16_limit"] = round(row["examples_per_s"] / limit, 3)
        row["peak_rss_mib_process"] = memory[name]
        row["first_pass_seconds"] = first_pass[name]  # compiled: includes its compilation
    return {"rows": count, "batch": BATCH, "tokens": TOKENS, "training_flops_per_example": flops,
            "limit_examples_per_s": round(limit, 1), "results": rates,
            "ratios": {"mtpeft / peft_hand_tuned": round(rates["mtpeft_defaults"]["examples_per_s"]
                                                        / rates["peft_hand_tuned"]["examples_per_s"], 2),
                       "mtpeft / common_recipe": round(rates["mtpeft_defaults"]["examples_per_s"]
                                                      / rates["common_recipe"]["examples_per_s"], 2),
                       "compiled / mtpeft defaults": round(rates["mtpeft_compiled"]["examples_per_s"]
                                                           / rates["mtpeft_defaults"]["examples_per_s"], 2)}}


def sst2_run(data, config: TrainConfig) -> dict:
    model = MultiTaskModel.from_backbone()
    model.add_task(get_preset("sst2").spec, config.lora)
    reset_peak_rss()
    result = train_task(model, "sst2", data.train, data.eval, config, progress=False)
    return {"examples": len(data.train), "epochs": config.epochs, "train_seconds": result.train_seconds,
            "examples_per_s": result.examples_per_second, "dev_accuracy": result.metrics.get("accuracy"),
            "peak_rss_mib_process": peak_rss_mib(), "config": config.to_dict()}


def sst2_data():
    preset = get_preset("sst2")
    data = load_task_data(preset.spec, DATA / "glue" / "SST-2", layout=preset.layout)
    config = TrainConfig(**{**preset.adapter_recipe(), "epochs": 1.0, "checkpoint_every": -1})  # the target: one epoch
    return data, config


def epoch_floor(data, config: TrainConfig, peak: dict) -> dict:
    """The least time one epoch can take on this machine: the matmul work of the epoch's own
    batches (length-bucketed and padded as training makes them; 2x a forward pass each) at
    the measured bf16 peak, with nothing else costing any time."""
    model = MultiTaskModel.from_backbone()
    spec = get_preset("sst2").spec
    lengths = [len(f["input_ids"]) for f in task_type(spec).encode(spec, model.tokenizer, data.train)]
    per_length: dict[int, int] = {}
    flops = padded_tokens = 0
    for batch in bucketed_batches(lengths, config.batch_size, shuffle=True, seed=config.seed):
        padded = padded_length(max(lengths[i] for i in batch), config.pad_to_multiple_of)
        if padded not in per_length:
            per_length[padded] = 2 * matmul_flops_per_example(model.backbone, padded)
        flops += len(batch) * per_length[padded]
        padded_tokens += len(batch) * padded
    return {"examples": len(lengths), "pad_to_multiple_of": config.pad_to_multiple_of,
            "real_tokens": sum(lengths), "padded_tokens": padded_tokens,
            "training_tflop": round(flops / 1e12, 1), "peak_tflops": peak["tflops"],
            "seconds_at_peak": round(flops / (peak["tflops"] * 1e12), 1)}


def sst2_epoch(tokenizer, common_subset: int, peak: dict) -> dict:
    data, config = sst2_data()
    ours = sst2_run(data, config)
    compiled = sst2_run(data, replace(config, compile=True))  # its train_seconds include the compilation
    subset = data.train[:common_subset]
    with tempfile.TemporaryDirectory() as tmp:
        run = common_recipe_trainer(tokenizer, [e.text for e in subset], [int(e.label) for e in subset], tmp)
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
    scaled = seconds * len(data.train) / len(subset)
    fastest = min(ours["train_seconds"], compiled["train_seconds"])
    common = {"examples_timed": len(subset), "seconds_timed": round(seconds, 2),
              "seconds_scaled_to_epoch": round(scaled, 1), "note": f"timed on the first {len(subset)} training sentences, "
              f"scaled linearly to {len(data.train)}"}
    return {"mtpeft_defaults": ours, "mtpeft_compiled": compiled, "common_recipe": common,
            "floor": epoch_floor(data, config, peak),
            "speedup_vs_common_recipe": round(scaled / ours["train_seconds"], 1),
            "compiled_speedup_vs_common_recipe": round(scaled / compiled["train_seconds"], 1),
            "fastest_seconds": fastest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per repeat in part A")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--common-subset", type=int, default=2048)
    parser.add_argument("--skip-epoch", action="store_true")
    parser.add_argument("--floor-only", action="store_true",
                        help="only measure the peak and compute the SST-2 epoch's floor (seconds, no training)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark trains on the GLUE and IMDb files described in its README (MTPEFT_DATA_ROOT names their folder)")
    peak = matmul_peak_tflops()
    if args.floor_only:
        write_result("train_speed_floor", {"sst2_epoch_floor": epoch_floor(*sst2_data(), peak)}, args.out)
        return
    tokenizer = MultiTaskModel.from_backbone().tokenizer
    payload = {"bf16_matmul_peak": peak, "fixed_shape": part_a(tokenizer, args.steps, args.repeats, peak)}
    if not args.skip_epoch:
        payload["sst2_epoch"] = sst2_epoch(tokenizer, args.common_subset, peak)
    payload["targets"] = {"fraction_of_bf16_limit": 0.5, "vs_peft_hand_tuned": 2.0, "sst2_epoch_seconds": 60,
                          "sst2_epoch_vs_common_recipe": 10.0}
    write_result("train_speed", payload, args.out)


if __name__ == "__main__":
    main()
