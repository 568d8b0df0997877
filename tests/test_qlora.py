"""QLoRA: a clear error without CUDA or bitsandbytes; on a GPU, a 4-bit backbone that trains adapters."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from mtpeft import qlora

HAS_GPU_STACK = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def test_without_cuda_the_error_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="QLoRA needs a CUDA GPU"):
        qlora.load_backbone_4bit("default")
    with pytest.raises(RuntimeError, match="QLoRA needs a CUDA GPU"):
        qlora.qlora_model("default")


def test_without_bitsandbytes_the_error_names_the_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'mtpeft\[qlora\]'"):
        qlora.load_backbone_4bit("default")


def test_quantization_config_is_qloras_and_checks_its_options():
    config = qlora.quantization_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="quant_type must be one of"):
        qlora.quantization_config("int3")
    with pytest.raises(ValueError, match="compute_dtype"):
        qlora.quantization_config(compute_dtype=torch.int8)


@pytest.mark.skipif(not HAS_GPU_STACK, reason="QLoRA needs a CUDA GPU and bitsandbytes")
def test_four_bit_backbone_trains_an_adapter_that_loads_on_the_full_backbone(tokenizer, tmp_path):
    import bitsandbytes as bnb
    from conftest import tiny_bert
    from tiny_bundle import path_backbone, saved_backbone

    from mtpeft import MultiTaskModel, TaskSpec
    from mtpeft.config import LoraSettings, TrainConfig
    from mtpeft.examples import Example
    from mtpeft.train import train_task

    folder = saved_backbone(tmp_path / "backbone", tokenizer)
    model = qlora.qlora_model(str(folder))
    layers = [m for m in model.backbone.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no linear layer was quantized"
    spec = TaskSpec(name="mood", type="classification", labels=["neg", "pos"], max_length=16)
    model.add_task(spec, LoraSettings(r=4, alpha=8))
    examples = [Example(text=f"it was {w}", label=int(w in ("great", "lovely"))) for w in
                ("great", "awful", "lovely", "broken") * 8]
    train_task(model, "mood", examples, examples[:8], TrainConfig(epochs=2, batch_size=8, lr=5e-3, checkpoint_every=-1),
               out_dir=tmp_path / "run", progress=False, report_to=())
    trained_b = max(float(layer.lora_B["mood"].weight.abs().max()) for layer in model.lora_layers("mood").values())
    assert trained_b > 0  # the adapter learned through the 4-bit layers
    # The adapter is an ordinary one: it loads onto the full-precision backbone and predicts close to the 4-bit run.
    full = MultiTaskModel.load(tmp_path / "run", backbone=path_backbone(folder)).to("cuda")
    texts = ["it was great", "it was broken"]
    quantized = [p.probabilities["pos"] for p in model.predict(texts, task="mood")]
    unquantized = [p.probabilities["pos"] for p in full.predict(texts, task="mood")]
    assert quantized == pytest.approx(unquantized, abs=0.1)
    assert tiny_bert(tokenizer).identity.fingerprint == model.identity.fingerprint  # embeddings stay exact
    from mtpeft.export import export_task

    with pytest.raises(ValueError, match="the backbone is quantized"):  # the 4-bit weights cannot take the delta
        export_task(model, "mood", tmp_path / "export")
    export_task(full, "mood", tmp_path / "export")  # the way the message points to
    assert (tmp_path / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("compute_dtype, bf16", [(torch.bfloat16, None), (torch.float32, False), (torch.float16, False)])
def test_a_compute_dtype_other_than_bf16_turns_bf16_autocast_off(tokenizer, monkeypatch, compute_dtype, bf16):
    """Autocast would run the embeddings, norms and adapters in bf16 around fp32 4-bit layers."""
    from conftest import tiny_bert

    monkeypatch.setattr(qlora, "load_backbone_4bit", lambda name, **settings: tiny_bert(tokenizer))
    model = qlora.qlora_model("tiny", compute_dtype=compute_dtype)
    assert model.bf16 is bf16 and model.merge_min_rows == 0
