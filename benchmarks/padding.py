"""Training speed on short inputs: batches padded to a multiple of 8 against exactly their longest input.

SST-2 sentences average 13 tokens, so rounding each batch up to a multiple of 8 adds about a
quarter more tokens (the epoch's own batches: 1.30x the real tokens against 1.05x). This
times both on the same sentences, round robin in one process, median of the repeats, and
counts the tokens each padded, so the figure says whether fewer tokens at less regular
shapes are faster on this machine.

    .venv/bin/python benchmarks/padding.py   # -> results/padding.json
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from speedkit import DATA, round_robin, write_result

from mtpeft import MultiTaskModel
from mtpeft.batching import bucketed_batches, padded_length
from mtpeft.config import TrainConfig
from mtpeft.sources import load_task_data
from mtpeft.tasks import task_type
from mtpeft.tasks.presets import get_preset
from mtpeft.train import train_task

MULTIPLES = (8, 1)


def padded_tokens(lengths: list[int], config: TrainConfig) -> int:
    """Tokens of one epoch's training batches as ``train_task`` pads them."""
    total = 0
    for batch in bucketed_batches(lengths, config.batch_size, shuffle=True, seed=config.seed):
        total += len(batch) * padded_length(max(lengths[i] for i in batch), config.pad_to_multiple_of)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=4096, help="the first N SST-2 training sentences")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark trains on the GLUE SST-2 files (MTPEFT_DATA_ROOT names their folder)")
    preset = get_preset("sst2")
    examples = load_task_data(preset.spec, DATA / "glue" / "SST-2", layout=preset.layout).train[: args.sentences]
    base = TrainConfig(**{**preset.adapter_recipe(), "epochs": 1.0, "checkpoint_every": -1})
    runs, tokens = {}, {}
    for multiple in MULTIPLES:
        config = replace(base, pad_to_multiple_of=multiple)
        model = MultiTaskModel.from_backbone()
        model.add_task(preset.spec, config.lora)
        lengths = [len(f["input_ids"]) for f in task_type(preset.spec).encode(preset.spec, model.tokenizer, examples)]
        tokens[multiple] = {"real": sum(lengths), "padded": padded_tokens(lengths, config)}

        def run(model=model, config=config) -> int:
            train_task(model, "sst2", examples, config=config, progress=False)
            return len(examples)
        runs[f"pad_to_multiple_of_{multiple}"] = run
    rates = round_robin(runs, args.repeats)
    for multiple in MULTIPLES:
        rates[f"pad_to_multiple_of_{multiple}"]["tokens"] = tokens[multiple]
    eight, one = (rates[f"pad_to_multiple_of_{m}"]["examples_per_s"] for m in MULTIPLES)
    write_result("padding", {"sentences": len(examples), "batch_size": base.batch_size, "results": rates,
                             "exact / multiple of 8": round(one / eight, 3)}, args.out)


if __name__ == "__main__":
    main()
