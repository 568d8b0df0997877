"""A small deterministic training run for the crash/resume tests: python _resume_job.py OUT_DIR."""

import random
import sys

from transformers import AutoTokenizer

from conftest import tiny_bert
from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.backbone import default_backbone_path
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.examples import Example
from mtpeft.train import train_task


def examples(seed, n):
    rng = random.Random(seed)
    words = {1: ["great", "superb", "lovely"], 0: ["awful", "broken", "poor"]}
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        rows.append(Example(text=f"the {rng.choice(words[label])} item {rng.choice(['came', 'is', 'was'])}", label=label))
    return rows


if __name__ == "__main__":
    tokenizer = AutoTokenizer.from_pretrained(default_backbone_path())
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(TaskSpec(name="t", type="classification", labels=["neg", "pos"]), LoraSettings(r=4, dropout=0.1))
    config = TrainConfig(epochs=3, batch_size=8, lr=5e-3, bf16=False, checkpoint_every=3, seed=1)
    train_task(model, "t", examples(0, 64), examples(1, 16), config, out_dir=sys.argv[1], progress=False)
