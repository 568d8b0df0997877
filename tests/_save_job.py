"""Save a small bundle for the kill-mid-save tests: python _save_job.py OUT_DIR SCALE.

The adapter and head weights are a fixed random draw times SCALE, so two scales give two
versions of every file.
"""

import sys

import torch
from transformers import AutoTokenizer

from conftest import tiny_bert
from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.backbone import default_backbone_path
from mtpeft.config import LoraSettings


def bundle_model(scale: float) -> MultiTaskModel:
    tokenizer = AutoTokenizer.from_pretrained(default_backbone_path())
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(TaskSpec(name="t", type="classification", labels=["neg", "pos"]), LoraSettings(r=4))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.task_parameters("t").values():
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.task_metrics["t"] = {"accuracy": 50.0 * scale}
    return model


if __name__ == "__main__":
    bundle_model(float(sys.argv[2])).save(sys.argv[1])
