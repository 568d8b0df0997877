"""Training methods: which parameters a task trains and how its backbone is wrapped.

The method is a setting, not a new script: every method here builds a ``MultiTaskModel``
holding one task, and the one training loop (``train.train_task``) trains whatever
``model.task_parameters(task)`` returns. Kinds:

- ``zero-shot``: no training (``mtpeft.zero_shot``);
- ``head-only``: a linear probe on the frozen backbone;
- ``lora``: our activation-path LoRA (``mtpeft.lora``) with a rank and target layers;
- ``full``: backbone and head both train, at separate learning rates;
- ``peft``: IA3, prompt tuning, prefix tuning, DoRA, VeRA from the ``peft`` library, wrapped
  by ``PeftEncoder`` so our heads, metrics and loop are unchanged;
- ``bottleneck``: Houlsby or Pfeiffer adapters (``mtpeft.bottleneck``);
- ``joint``: one shared LoRA for several tasks (``mtpeft.joint``; built there, not here).

Learning rates: a method's ``recipe`` overrides the task preset's ``TrainConfig`` fields;
when it sets ``lr`` (the adapter's or backbone's) the head keeps the preset's rate. A preset
recipe's ``"full"`` entry holds fields that full fine-tuning trains with instead (a task
whose adapters need more epochs than the whole model does), and its ``"methods"`` entry,
by method name, fields that one method trains with on that task (a rank-1 adapter that
needs a higher rate there).
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput
from transformers.pytorch_utils import Conv1D

from mtpeft.backbone import Backbone, unused_by_heads
from mtpeft.batching import INFERENCE_PAD_MULTIPLE, padded_length
from mtpeft.bottleneck import BottleneckLayer
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.lora import MultiLoraLayer
from mtpeft.model import MultiTaskModel, max_positions
from mtpeft.storage import save_pretrained_atomically, save_task, write_json, write_safetensors
from mtpeft.tasks import TaskSpec
from mtpeft.tasks.presets import RECIPE_SECTIONS

KINDS = ("zero-shot", "head-only", "lora", "full", "peft", "bottleneck", "joint")
PEFT_TYPES = ("ia3", "prompt-tuning", "prefix-tuning", "dora", "vera")
# IA3's (target, feed-forward) modules where peft has no default for the architecture: keys,
# values and the feed-forward output, as peft's BERT default.
IA3_MODULES: dict[str, tuple[list[str], list[str]]] = {
    **{family: (["key", "value", "output.dense"], ["output.dense"])
       for family in ("xlm-roberta", "camembert", "electra")},
    "mpnet": (["k", "v", "output.dense"], ["output.dense"]),
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
}
# Architectures whose attention takes no past keys/values: a prefix would never reach it.
NO_PREFIX = ("distilbert", "mpnet")


class MethodNotApplicable(ValueError):
    """The method has no meaning for this task (zero-shot extractive QA, say)."""


@dataclass(frozen=True)
class Method:
    """A named way to adapt a backbone to a task.

    Attributes:
        name: what ``--methods`` takes and result files are named after.
        kind: one of ``KINDS``.
        settings: the kind's own settings (LoRA rank/alpha/targets, peft type and config,
            bottleneck style and reduction factor, joint sampling).
        recipe: ``TrainConfig`` fields that differ from the task preset's recipe.
        description: one line for tables and ``--list-methods``.
    """

    name: str
    kind: str
    settings: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: unknown kind {self.kind!r}; choose one of {KINDS}")

    @property
    def trains(self) -> bool:
        return self.kind != "zero-shot"

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "settings": dict(self.settings),
                "recipe": dict(self.recipe), "description": self.description}

    def lora_settings(self) -> LoraSettings | None:
        if self.kind not in ("lora", "joint"):
            return None
        targets = self.settings.get("targets")
        return LoraSettings(r=self.settings["r"], alpha=self.settings["alpha"],
                            target_modules=None if targets is None else list(targets))

    def train_config(self, preset_recipe: dict | None = None, overrides: dict | None = None) -> TrainConfig:
        """The preset's recipe, then this method's, then the user's ``overrides`` (None values ignored)."""
        preset_recipe = preset_recipe or {}
        # Without "init_from" too: methods are compared from one fresh start, not from a task's
        # warm start (faq-answer's SQuAD adapter would also fit only one rank).
        recipe = {k: v for k, v in preset_recipe.items() if k not in ("lora", "init_from", *RECIPE_SECTIONS)}
        # The task's head rate: its own head_lr where the recipe sets one, else its lr.
        task_head_lr = recipe.get("head_lr") or recipe.get("lr", TrainConfig.lr)
        recipe.update(self.recipe)
        if "lr" in self.recipe and "head_lr" not in self.recipe:
            recipe["head_lr"] = task_head_lr  # the adapter/backbone rate is the method's; the head keeps the task's
        if self.kind == "full":
            recipe.update(preset_recipe.get("full", {}))
        recipe.update(preset_recipe.get("methods", {}).get(self.name, {}))
        recipe.update({k: v for k, v in (overrides or {}).items() if v is not None})
        # "lora" is a TrainConfig field, but a method's adapter comes from its settings: left in, it
        # reached TrainConfig twice (a TypeError traceback).
        allowed = [f.name for f in fields(TrainConfig) if f.name != "lora"]
        unknown = sorted(set(recipe) - set(allowed))
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown recipe fields {unknown}; "
                             f"a recipe holds TrainConfig fields ({', '.join(allowed)})")
        return TrainConfig(**recipe, lora=self.lora_settings())

    def build(self, backbone: Backbone, spec: TaskSpec, seed: int = 0) -> MultiTaskModel:
        """A model holding ``spec`` as its one task, ready for ``train_task``.

        ``backbone`` is changed in place: ``full`` trains it, the other methods add their adapters to
        it (a backbone already holding some is refused): give each run a freshly loaded one.
        """
        if self.kind == "joint":
            raise ValueError(f"method {self.name!r} trains several tasks together: use mtpeft.joint")
        check_no_adapters(backbone, self.name)
        torch.manual_seed(seed)  # the adapter's and head's initial weights
        if self.kind == "peft":
            check_positions_left(backbone, spec, self.settings.get("virtual_tokens", 0))
            encoder = PeftEncoder.wrap(backbone.model, peft_config(self.settings, backbone))
            model = MultiTaskModel(Backbone(encoder, backbone.tokenizer, backbone.identity))
            model.add_task(spec, head_only=True)
            model.extra_parameters[spec.name] = {f"peft.{n}": p for n, p in encoder.peft.named_parameters()
                                                 if p.requires_grad}
            return model
        model = MultiTaskModel(backbone)
        if self.kind == "lora":
            model.add_task(spec, self.lora_settings())
            return model
        model.add_task(spec, head_only=True)
        if self.kind == "full":
            model.extra_parameters[spec.name] = {f"backbone.{n}": p for n, p in model.backbone.named_parameters()
                                                 if not unused_by_heads(n)}
            model.backbone_dropout = True  # the backbone trains, so its dropout regularises again
        elif self.kind == "bottleneck":
            from mtpeft.bottleneck import add_bottleneck_adapter

            model.extra_parameters[spec.name] = add_bottleneck_adapter(
                model.backbone, backbone.identity.model_type, spec.name, self.settings["style"],
                self.settings["reduction"], self.settings["activation"])
        return model

    def save(self, model: MultiTaskModel, task: str, folder: str | Path) -> Path:
        """Write what this method trained for ``task`` (adapter or backbone, and head) into ``folder``.

        LoRA and head-only tasks are ordinary task folders (PEFT layout, loadable with
        ``MultiTaskModel.load``); the others hold their weights as safetensors plus ``method.json``.
        """
        folder = Path(folder)
        model.full_precision()  # a frozen backbone may be held in bf16 for inference; write fp32 weights
        if self.kind in ("lora", "head-only"):
            return save_task(model, task, folder)
        write_safetensors(folder / "head.safetensors", dict(model.heads[task].state_dict()))
        if self.kind == "peft":
            save_pretrained_atomically(model.backbone.peft.save_pretrained, folder / "peft")
        elif self.kind == "full":
            write_safetensors(folder / "backbone.safetensors",
                              {n: p.detach().contiguous() for n, p in model.backbone.state_dict().items()})
        elif self.kind == "bottleneck":
            write_safetensors(folder / "bottleneck.safetensors",
                              {n: p.detach() for n, p in model.extra_parameters[task].items()})
        write_json(folder / "method.json", {"method": self.to_dict(), "spec": model.spec(task).to_dict(),
                                            "backbone": model.identity.to_dict()})
        return folder


def check_no_adapters(backbone: Backbone, method: str) -> None:
    """Refuse a backbone that already holds adapter layers (LoRA, bottleneck, peft's): ``build`` adds
    a method's to the backbone in place, so a second method built on it also ran the first's."""
    for path, module in backbone.model.named_modules():
        if isinstance(module, (MultiLoraLayer, BottleneckLayer)) or type(module).__module__.startswith("peft."):
            raise ValueError(f"method {method!r}: the backbone already holds adapters ({path}: "
                             f"{type(module).__name__}), which would run beside this method's; build each "
                             "method on a freshly loaded backbone (load_backbone)")


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the safetensors files under ``folder``: a trained task's size on disk."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))


# ---------------------------------------------------------------------- peft


class PeftEncoder(nn.Module):
    """A peft-wrapped backbone called like the bare one: (B, T, H) states aligned with the input.

    peft's own forward for prompt learning drops ``token_type_ids`` (BERT's sentence A/B
    marks, which pair tasks need) and, for prompt tuning, returns the virtual tokens' states
    too, which would shift every position the heads pool or point at. Here the prompt or
    prefix comes from peft's prompt encoder, segment ids are kept (virtual tokens get 0),
    the attention mask covers the virtual tokens, and prompt tuning's virtual positions are
    cut from the output, so the caller's attention mask is again the right one to pool with.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft = peft_model

    @classmethod
    def wrap(cls, model: nn.Module, config) -> PeftEncoder:
        from peft import get_peft_model

        return cls(get_peft_model(model, config))

    @property
    def config(self):
        return self.peft.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> BaseModelOutput:
        # MultiTaskModel may hold a frozen backbone's parameters in bf16 for inference while
        # peft's own buffers (VeRA's shared A/B) stay fp32: autocast makes their matmuls agree.
        held_bf16 = self.peft.get_input_embeddings().weight.dtype == torch.bfloat16
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=held_bf16):
            return self._forward(input_ids, attention_mask, token_type_ids)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None) -> BaseModelOutput:
        from peft import PeftType

        config = self.peft.active_peft_config
        if not config.is_prompt_learning:  # IA3, DoRA, VeRA: layers inside the backbone
            return self.peft(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        batch, virtual = input_ids.size(0), config.num_virtual_tokens
        mask = torch.cat([attention_mask.new_ones(batch, virtual), attention_mask], dim=1)  # (B, V + T)
        base = self.peft.base_model  # for prompt learning: the transformer itself
        if config.peft_type == PeftType.PREFIX_TUNING:
            # Virtual keys/values in every layer; the queries are still the T real tokens.
            return base(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids,
                        **{_cache_argument(type(base)): self.peft.get_prompt(batch_size=batch)})
        embeds = self.peft.word_embeddings(input_ids)  # (B, T, H)
        prompts = self.peft.get_prompt(batch_size=batch).to(embeds.dtype)  # (B, V, H)
        types = None if token_type_ids is None else torch.cat([token_type_ids.new_zeros(batch, virtual), token_type_ids], 1)
        out = base(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=mask, token_type_ids=types)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state[:, virtual:])


@functools.cache  # once per class, not on every forward pass
def _cache_argument(transformer: type[nn.Module]) -> str:
    """The name ``transformer.forward`` takes past keys/values by: transformers 5.x renames
    ``past_key_values`` to ``cache`` (the old name is to go in 5.40)."""
    return "cache" if "cache" in inspect.signature(transformer.forward).parameters else "past_key_values"


def check_positions_left(backbone: Backbone, spec: TaskSpec, virtual: int) -> None:
    """Refuse a ``max_length`` the backbone has no positions for beside ``virtual`` prompt or prefix
    tokens (they take positions before the text's). Checked on the bare backbone, before peft wraps
    it in place: the wrapper hides RoBERTa's embeddings, two positions fewer, from ``add_task``'s check.
    Inference pads a batch up to a multiple of 8 tokens (``pad_sequences``): those positions count too."""
    positions = max_positions(backbone.model)
    if positions is not None and padded_length(spec.max_length, INFERENCE_PAD_MULTIPLE) + virtual > positions:
        longest = (positions - virtual) // INFERENCE_PAD_MULTIPLE * INFERENCE_PAD_MULTIPLE
        beside = f" beside the method's {virtual} virtual tokens" if virtual else ""
        raise ValueError(f"task {spec.name!r}: max_length={spec.max_length} is longer than the {longest} tokens "
                         f"backbone {backbone.identity.name!r} takes{beside}; use max_length <= {longest}")


def peft_config(settings: dict, backbone: Backbone):
    """The peft config of a ``peft`` method's settings, for ``backbone``'s architecture."""
    from peft import (
        IA3Config,
        LoraConfig,
        PrefixTuningConfig,
        PromptTuningConfig,
        TaskType,
        VeraConfig,
    )

    kind = settings["type"]
    task_type = TaskType.FEATURE_EXTRACTION
    targets = backbone.default_targets()
    model_type = backbone.identity.model_type
    # GPT-2's Conv1D layers store weights as (in, out): peft must be told, or it warns and guesses.
    conv1d = any(isinstance(module, Conv1D) for module in backbone.model.modules())
    if kind == "ia3":  # peft's per-architecture defaults (IA3_MODULES where it has none)
        target, feedforward = IA3_MODULES.get(model_type, (None, None))
        return IA3Config(task_type=task_type, fan_in_fan_out=conv1d, target_modules=target,
                         feedforward_modules=feedforward)
    if kind == "prompt-tuning":  # sizes named: peft looks them up under config keys DistilBERT's lacks
        # The prompt is input embeddings: their width, which ELECTRA projects up to the hidden size.
        token_dim = backbone.model.get_input_embeddings().embedding_dim
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=settings["virtual_tokens"],
                                  token_dim=token_dim, num_layers=backbone.identity.num_layers,
                                  num_attention_heads=backbone.model.config.num_attention_heads)
    if kind == "prefix-tuning":
        if model_type in NO_PREFIX:
            raise MethodNotApplicable(f"prefix tuning puts keys/values before every attention layer's own; "
                                      f"{model_type}'s attention takes none")
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=settings["virtual_tokens"],
                                  prefix_projection=False)
    if kind == "dora":
        return LoraConfig(task_type=task_type, r=settings["r"], lora_alpha=settings["alpha"], target_modules=targets,
                          use_dora=True, fan_in_fan_out=conv1d)
    if kind == "vera":
        return VeraConfig(task_type=task_type, r=settings["r"], target_modules=targets, fan_in_fan_out=conv1d)
    raise ValueError(f"unknown peft method type {kind!r}; choose one of {PEFT_TYPES}")


# ---------------------------------------------------------------------- registry


def _lora(r: int, all_linear: bool = False) -> Method:
    name = f"lora-r{r}" + ("-all" if all_linear else "")
    where = "every linear layer" if all_linear else "query/value"
    return Method(name, "lora", {"r": r, "alpha": 2.0 * r, "targets": ["all-linear"] if all_linear else None},
                  description=f"LoRA r={r}, alpha={2 * r} on {where}, linear head")


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("zero-shot", "zero-shot",
           description="no training: cosine of mean-pooled backbone embeddings (pairs; a cosine threshold for "
                       "pair classes is fit on the training set), nearest label-description embedding (classes)"),
    Method("head-only", "head-only", recipe={"head_lr": 3e-3},
           description="linear probe: frozen backbone, trained head (lr 3e-3)"),
    Method("tiny", "lora", {"r": 1, "alpha": 2.0, "targets": None},
           description="LoRA r=1 on query/value with a linear head: >= 2000x fewer trainable parameters than MiniLM"),
    *[_lora(r) for r in (1, 2, 4, 8, 16)],
    _lora(2, all_linear=True),  # every layer within the 0.5 % budget of lora-r8 on query/value
    _lora(8, all_linear=True),
    Method("dora", "peft", {"type": "dora", "r": 8, "alpha": 16.0},
           description="DoRA (peft) r=8 on query/value: LoRA plus a learned magnitude per output"),
    Method("vera", "peft", {"type": "vera", "r": 256}, recipe={"lr": 5e-3},
           description="VeRA (peft) r=256 on query/value: frozen shared random A/B, trained scaling vectors (lr 5e-3)"),
    Method("ia3", "peft", {"type": "ia3"}, recipe={"lr": 3e-3},
           description="IA3 (peft): learned scaling of keys, values and feed-forward activations (lr 3e-3)"),
    Method("prompt-tuning", "peft", {"type": "prompt-tuning", "virtual_tokens": 20}, recipe={"lr": 3e-2},
           description="prompt tuning (peft): 20 trained input embeddings before the text (lr 3e-2)"),
    Method("prefix-tuning", "peft", {"type": "prefix-tuning", "virtual_tokens": 20}, recipe={"lr": 1e-2},
           description="prefix tuning (peft): 20 trained key/value pairs in every layer (lr 1e-2)"),
    Method("houlsby", "bottleneck", {"style": "houlsby", "reduction": 16, "activation": "swish"},
           description="Houlsby bottleneck adapters (reduction 16) after attention and feed-forward outputs"),
    Method("pfeiffer", "bottleneck", {"style": "pfeiffer", "reduction": 16, "activation": "relu"},
           description="Pfeiffer bottleneck adapter (reduction 16) after the feed-forward output"),
    Method("full", "full", recipe={"lr": 5e-5, "warmup_ratio": 0.1},
           description="full fine-tuning: backbone (lr 5e-5, dropout on) and head (the task's lr)"),
    Method("joint-proportional", "joint", {"r": 8, "alpha": 16.0, "targets": None, "sampling": "proportional"},
           recipe={"lr": 5e-4, "head_lr": 1e-3},
           description="one LoRA r=8 (query/value) shared by all tasks + a head per task; tasks drawn "
                       "in proportion to their size (shared lr 5e-4, heads 1e-3)"),
    Method("joint-temperature", "joint", {"r": 8, "alpha": 16.0, "targets": None, "sampling": "temperature"},
           recipe={"lr": 5e-4, "head_lr": 1e-3},
           description="as joint-proportional, tasks drawn with probability ~ size^(1/T) (default T=2)"),
]}

_LORA_NAME = re.compile(r"^lora-r([1-9]\d*)(-all)?$")  # "lora-r01" would run as, and be recorded as, lora-r1


def get_method(name: str) -> Method:
    """A registered method, or ``lora-r<N>`` / ``lora-r<N>-all`` for any rank N."""
    if name in METHODS:
        return METHODS[name]
    match = _LORA_NAME.match(name)
    if match:
        return _lora(int(match.group(1)), all_linear=bool(match.group(2)))
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (or lora-r<N>, lora-r<N>-all)")


def method_names() -> list[str]:
    return list(METHODS)
