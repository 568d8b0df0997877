"""QLoRA: LoRA adapters on a backbone held in 4 bits (bitsandbytes NF4), on a CUDA GPU.

A 4-bit backbone takes about a quarter of its bf16 memory, so a backbone several times
larger fits one GPU. The adapters, heads and optimizer state stay in fp32; the 4-bit matmuls
run in ``compute_dtype``. Adapters trained this way are ordinary mtpeft/PEFT adapters: they
load onto the full-precision backbone (same identity: embeddings are not quantized).

    model = qlora_model("bert-large-uncased")            # needs CUDA and `pip install mtpeft[qlora]`
    model.add_task(spec, LoraSettings(r=16, target_modules=["all-linear"]))
    train_task(model, spec.name, train, dev, TrainConfig(), out_dir="runs/qlora")

bitsandbytes is imported only here, inside the functions, so the rest of mtpeft never needs it.
"""

from __future__ import annotations

import os

import torch

from mtpeft.backbone import (
    DEFAULT_BACKBONE,
    Backbone,
    from_model,
    resolve_backbone_path,
)

QUANT_TYPES = ("nf4", "fp4")


def quantization_config(quant_type: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16,
                        double_quant: bool = True):
    """transformers' ``BitsAndBytesConfig`` for a 4-bit frozen backbone (QLoRA's settings by default)."""
    from transformers import BitsAndBytesConfig

    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {list(QUANT_TYPES)}, got {quant_type!r}")
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {compute_dtype}")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant)


def load_backbone_4bit(name: str | os.PathLike | None = DEFAULT_BACKBONE, device: str | int = 0,
                       quant_type: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16,
                       double_quant: bool = True) -> Backbone:
    """Load a backbone with its linear layers quantized to 4 bits on CUDA device ``device``.

    Raises:
        RuntimeError: without CUDA (bitsandbytes' 4-bit kernels need a GPU) or without bitsandbytes.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("QLoRA needs a CUDA GPU: bitsandbytes' 4-bit layers run on CUDA, and no GPU is "
                           "visible here; train with LoRA on the full-precision backbone instead")
    try:
        import bitsandbytes  # noqa: F401 - transformers needs it to build the 4-bit layers
    except ImportError:
        raise RuntimeError("QLoRA needs bitsandbytes: pip install 'mtpeft[qlora]'") from None
    from transformers import AutoModel, AutoTokenizer

    config = quantization_config(quant_type, compute_dtype, double_quant)
    path = resolve_backbone_path(name)
    # The layers left unquantized (embeddings, norms) load in fp32: MultiTaskModel holds them
    # in bf16 for inference where the GPU is fast at it, as it does for any frozen backbone.
    model = AutoModel.from_pretrained(path, quantization_config=config, device_map={"": device},
                                      dtype=torch.float32,  # attention: sdpa where it has it, as load_backbone
                                      use_safetensors=True)  # never a pytorch_model.bin: a pickle, as load_backbone
    tokenizer = AutoTokenizer.from_pretrained(path)
    return from_model(model, tokenizer, DEFAULT_BACKBONE if name is None else str(name))


def qlora_model(name: str | os.PathLike | None = DEFAULT_BACKBONE, **settings):
    """A ``MultiTaskModel`` on a 4-bit backbone (``load_backbone_4bit`` settings).

    Its adapters are never merged into the backbone: a 4-bit weight cannot take the delta.
    """
    from mtpeft.model import MultiTaskModel

    model = MultiTaskModel(load_backbone_4bit(name, **settings))
    model.merge_min_rows = 0
    if settings.get("compute_dtype", torch.bfloat16) != torch.bfloat16:
        # The 4-bit layers compute in the dtype asked for; bf16 autocast around them would run
        # the embeddings, norms and adapters in bf16 all the same.
        model.bf16 = False
    return model
