"""Bottleneck adapters (Houlsby, Pfeiffer) on the activation path, one per task.

A bottleneck adapter is a small residual MLP on a sub-layer's output:

    h = base(x);   out = h + up_t(act(down_t(h)))        for the rows of task t

with ``down: H -> H / reduction`` and ``up`` zero-initialised, so a fresh adapter leaves
the backbone exactly as it was. Houlsby et al. (2019) put one after the attention output
projection and one after the feed-forward output projection of every block; Pfeiffer et
al. (2021) keep only the feed-forward one. Both sit before the block's residual sum and
LayerNorm, as in the papers.

Why our own module rather than the ``adapters`` library: adapters 1.3 pins
``transformers~=4.57`` (it copies transformers' attention code), which cannot be installed
next to the transformers 5 this project needs. Wrapping the projection layers' outputs
instead needs no transformers internals, and it is the mechanism ``lora.py`` uses: the same
``AdapterRouting`` lets every row of a mixed batch pick its own task's adapter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mtpeft.lora import AdapterRouting, MultiLoraLayer, replace_submodule, routing_of

STYLES = ("houlsby", "pfeiffer")
# Module paths (regular expressions) of each block's attention-output and FFN-output projections.
SITES: dict[str, dict[str, str]] = {
    "bert": {"attention": r"\.attention\.output\.dense$", "ffn": r"\.layer\.\d+\.output\.dense$"},
    "distilbert": {"attention": r"\.attention\.out_lin$", "ffn": r"\.ffn\.lin2$"},
    "gpt2": {"attention": r"\.attn\.c_proj$", "ffn": r"\.mlp\.c_proj$"},
}
for _family in ("roberta", "xlm-roberta", "camembert", "electra"):
    SITES[_family] = SITES["bert"]
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}


class Bottleneck(nn.Module):
    """down -> activation -> up, with ``up`` zero-initialised (the adapter starts as a no-op)."""

    def __init__(self, size: int, bottleneck: int, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown bottleneck activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.down = nn.Linear(size, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))  # (..., size)


def _out_features(layer: nn.Module) -> int:
    if isinstance(layer, (nn.Linear, MultiLoraLayer)):
        return layer.out_features
    if isinstance(layer, Conv1D):  # weight is (in, out)
        return layer.weight.shape[1]
    raise TypeError(f"bottleneck adapters wrap nn.Linear, Conv1D or LoRA layers, not {type(layer).__name__}")


class BottleneckLayer(nn.Module):
    """A projection layer plus per-task bottleneck adapters on its output."""

    def __init__(self, base_layer: nn.Module, routing: AdapterRouting) -> None:
        super().__init__()
        self.out_features = _out_features(base_layer)
        self.base_layer = base_layer
        self.routing = routing
        self.bottleneck = nn.ModuleDict()

    def add_adapter(self, task: str, reduction: int = 16, activation: str = "relu") -> None:
        if reduction < 1:
            raise ValueError(f"bottleneck reduction factor must be >= 1, got {reduction}")
        size = max(1, self.out_features // reduction)
        device = next(self.base_layer.parameters()).device
        self.bottleneck[task] = Bottleneck(self.out_features, size, activation).to(device)

    def remove_adapter(self, task: str) -> None:
        if task in self.bottleneck:
            del self.bottleneck[task]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, H)
        single = self.routing.single
        if single is not None:
            if single in self.bottleneck:
                out = out + self.bottleneck[single](out)
            return out
        for task, rows in self.routing.groups:
            if task in self.bottleneck:
                h = out.index_select(0, rows)
                out = out.index_add(0, rows, self.bottleneck[task](h).to(out.dtype))
        return out


def bottleneck_sites(model: nn.Module, model_type: str, style: str) -> list[str]:
    """Module paths an adapter of ``style`` goes on, for a backbone of ``model_type``."""
    if style not in STYLES:
        raise ValueError(f"unknown bottleneck style {style!r}; choose one of {STYLES}")
    if model_type not in SITES:
        raise ValueError(f"no bottleneck adapter sites known for model_type {model_type!r} (known: {sorted(SITES)})")
    kinds = ("attention", "ffn") if style == "houlsby" else ("ffn",)
    patterns = [re.compile(SITES[model_type][k]) for k in kinds]
    # Inside a wrapper (its ".base_layer", its adapters) is never a site of its own.
    paths = [path for path, _ in model.named_modules()
             if ".base_layer" not in path and ".bottleneck" not in path and ".lora_" not in path
             and any(p.search("." + path) for p in patterns)]
    if not paths:
        raise ValueError(f"no module of this {model_type} backbone matches the {style} adapter sites")
    return paths


def inject_bottleneck_layers(model: nn.Module, paths: Sequence[str]) -> dict[str, BottleneckLayer]:
    """Wrap each module at ``paths`` in a ``BottleneckLayer`` (already wrapped ones are reused)."""
    routing = routing_of(model)
    layers = {}
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, BottleneckLayer):
            module = replace_submodule(model, path, BottleneckLayer(module, routing))
        layers[path] = module
    return layers


def add_bottleneck_adapter(model: nn.Module, model_type: str, task: str, style: str = "pfeiffer",
                           reduction: int = 16, activation: str = "relu") -> dict[str, nn.Parameter]:
    """Give ``task`` bottleneck adapters of ``style``; returns their parameters by name."""
    layers = inject_bottleneck_layers(model, bottleneck_sites(model, model_type, style))
    params = {}
    for path, layer in layers.items():
        layer.add_adapter(task, reduction, activation)
        for name, param in layer.bottleneck[task].named_parameters():
            params[f"{path}.bottleneck.{name}"] = param
    return params
