"""Export one task as a plain ``transformers`` model folder, LoRA merged, no mtpeft needed.

The folder holds the backbone with the task's LoRA delta folded into its weights, the
tokenizer, the head, and a short ``modeling_mtpeft.py`` that ``transformers`` loads with
``trust_remote_code=True`` (the pooling heads have no built-in transformers class):

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)   # classification, regression
    AutoModelForQuestionAnswering.from_pretrained(folder, trust_remote_code=True)        # extractive QA
    AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # it reads the config too

Bi-encoder pair tasks are exported too: the model's output for a batch is computed the
same way (first texts, then second texts), so their use stays specific; see the card.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from mtpeft.lora import lora_layers_of, replace_submodule
from mtpeft.model import MultiTaskModel
from mtpeft.storage import (BUNDLE_FILE, TASK_FILE, atomic_write, save_pretrained_atomically, write_json,
                            write_safetensors)
from mtpeft.tasks import TaskSpec
from mtpeft.tasks.regression import target_scale

MODELING_FILE = "modeling_mtpeft.py"

# Self-contained: imports transformers and torch only.
MODELING_SOURCE = '''"""Heads exported by mtpeft: a transformers backbone plus a small task head."""

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput


class MtpeftConfig(PretrainedConfig):
    model_type = "mtpeft-export"

    def __init__(self, backbone=None, head="pooled", pooling="mean", num_outputs=2, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone or {}
        self.head = head
        self.pooling = pooling
        self.num_outputs = num_outputs


def _pool(hidden, mask, how):
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how == "cls":
        return hidden[:, 0]
    # The last real token on either padding side (a decoder's tokenizer may pad on the left).
    last = (mask.long() * torch.arange(mask.size(1), device=mask.device)).argmax(1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


class MtpeftModel(PreTrainedModel):
    config_class = MtpeftConfig
    base_model_prefix = "backbone"

    def __init__(self, config):
        super().__init__(config)
        backbone_config = AutoConfig.for_model(**config.backbone)
        self.backbone = AutoModel.from_config(backbone_config)
        hidden = backbone_config.hidden_size
        self.out = nn.Linear(1 if config.head == "cosine" else hidden, 2 if config.head == "span" else config.num_outputs)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**inputs).last_hidden_state
        if self.config.head == "span":
            logits = self.out(hidden).masked_fill(~attention_mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min)
            return QuestionAnsweringModelOutput(start_logits=logits[..., 0], end_logits=logits[..., 1])
        pooled = _pool(hidden, attention_mask, self.config.pooling)
        if self.config.head == "cosine":  # batch = first texts, then second texts
            first, second = pooled.float().chunk(2)
            pooled = nn.functional.cosine_similarity(first, second, dim=-1).unsqueeze(-1)
        return SequenceClassifierOutput(logits=self.out(pooled))


MtpeftForSequenceClassification = MtpeftModel
MtpeftForQuestionAnswering = MtpeftModel
'''


def _output_layer(spec: TaskSpec, head: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The head's output layer. A regression head learns targets scaled to [0, 1]; its layer is
    scaled back to the task's range, so the exported model outputs scores as ``predict`` does."""
    weights = dict(head.out.state_dict())
    if spec.type == "regression":
        low, width = target_scale(spec)
        weights = {"weight": weights["weight"] * width, "bias": weights["bias"] * width + low}
    return weights


def _truncation_note(spec: TaskSpec, tokenizer) -> str:
    """How a text longer than the task's length was cut in training, where the exported
    tokenizer's truncation cannot do the same (it keeps the start only)."""
    if spec.truncation != "head+tail" or spec.is_pair:
        return ""
    budget = spec.max_length - tokenizer.num_special_tokens_to_add(pair=False)
    head = min(spec.head_tokens, budget)
    return (f"Long inputs: this task was trained and evaluated on texts cut to their first {head} and last "
            f"{budget - head} tokens (head+tail truncation); `truncation=True` keeps the first {budget} only. "
            f"For the same predictions on a text over {spec.max_length} tokens, cut it that way before "
            f"tokenising (mtpeft's own `predict` does).\n\n")


def export_task(model: MultiTaskModel, task: str, folder: str | os.PathLike) -> Path:
    """Write ``task`` as a standalone transformers model folder (LoRA merged)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; export writes a folder")
    if (folder / TASK_FILE).is_file() or (folder / BUNDLE_FILE).is_file():
        # Its README.md would replace the task's model card, which the bundle's sha256 then refuses.
        raise ValueError(f"{folder} is a saved task or bundle; export into a folder of its own")
    spec = model.spec(task)
    if getattr(model.backbone.config, "quantization_config", None):
        # A 4-bit weight cannot take the LoRA delta, and the folder must hold full weights anyway.
        raise ValueError(f"task {task!r}: the backbone is quantized (QLoRA); save the model, load it again with "
                         "MultiTaskModel.load (the adapter loads onto the full-precision backbone), and export that")
    model.unmerge_adapters()
    adapter = model.adapter_alias.get(task, task)  # a joint model's tasks share one adapter
    backbone = copy.deepcopy(model.full_precision().backbone)
    with torch.no_grad():
        for path, layer in lora_layers_of(backbone).items():
            if adapter in layer.lora_A:
                layer.merge(adapter)
            replace_submodule(backbone, path, layer.base_layer)
    # What is left must be transformers' own modules: another method's wrappers (bottleneck
    # adapters, a peft encoder) would save weights under names the exported model never loads.
    foreign = sorted({type(m).__name__ for m in backbone.modules()
                      if not type(m).__module__.startswith(("transformers.", "transformers_modules.", "torch."))})
    if foreign:
        raise ValueError(f"task {task!r}: export writes a transformers backbone with LoRA merged in; this one also "
                         f"holds {foreign}, another training method's layers, which it cannot carry")
    head = model.heads[task]
    kind = "span" if spec.type == "extractive-qa" else "cosine" if spec.is_bi_encoder else "pooled"
    backbone_config = backbone.config.to_dict()
    for key in ("architectures", "auto_map", "transformers_version", "_name_or_path"):
        backbone_config.pop(key, None)
    auto = "AutoModelForQuestionAnswering" if kind == "span" else "AutoModelForSequenceClassification"
    # A regression task's one output is named after it, and ``problem_type`` makes a transformers
    # pipeline report the score as is (a config of no labels failed there, KeyError 0).
    labels = spec.labels or ([spec.name] if spec.type == "regression" else [])
    config = {
        "model_type": "mtpeft-export",
        "architectures": ["MtpeftModel"],  # the class both auto_map names are aliases of
        "auto_map": {"AutoConfig": "modeling_mtpeft.MtpeftConfig", auto: f"modeling_mtpeft.Mtpeft{auto[9:]}"},
        "backbone": backbone_config,
        "head": kind,
        "pooling": spec.pooling,
        "num_outputs": head.out.out_features,
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        **({"problem_type": "regression"} if spec.type == "regression" else {}),
        "mtpeft_task": spec.to_dict(),
    }
    weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    weights.update({f"out.{k}": v for k, v in _output_layer(spec, head).items()})
    # transformers loads a folder by its config.json: the old one goes first and the new one comes
    # last, so an export stopped midway over another never loads that one's head over these weights.
    (folder / "config.json").unlink(missing_ok=True)
    write_safetensors(folder / "model.safetensors", weights, metadata={"format": "pt"})
    atomic_write(folder / MODELING_FILE, MODELING_SOURCE.encode())
    # The task's length, not the backbone's 512: `truncation=True` (a pipeline's default) then cuts
    # a long input where mtpeft's own predictions do.
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.model_max_length = spec.max_length
    save_pretrained_atomically(tokenizer.save_pretrained, folder)
    readme = (f"# {spec.name} (exported by mtpeft)\n\n{spec.description}\n\nLoad with `{auto}.from_pretrained(folder, "
              f"trust_remote_code=True)` and `AutoTokenizer.from_pretrained(folder, trust_remote_code=True)` (it "
              f"reads the folder's config, which names the head's code); the LoRA adapter is merged into the "
              f"backbone weights.\n\n{_truncation_note(spec, tokenizer)}"
              f"Task spec:\n\n```json\n{json.dumps(spec.to_dict(), indent=2)}\n```\n")
    atomic_write(folder / "README.md", readme.encode())
    write_json(folder / "config.json", config)
    return folder
