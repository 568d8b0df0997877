"""On a CUDA GPU, the model does what it does on the CPU: same rows, same predictions, same saves.

Every test here skips without CUDA (CI has none); they run wherever a GPU is visible. fp32
comparisons turn TF32 off, since TF32 matmuls keep only 10 bits of mantissa.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_bert
from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.batching import collate
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.examples import Example
from mtpeft.train import train_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["the first sentence", "a second, longer sentence with more words", "three", "and the fourth one here",
         "five", "six is the last row of this batch"]


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _four_kinds(backbone) -> MultiTaskModel:
    """Classification, regression, span QA and a bi-encoder pair task, with non-zero adapters, in fp32."""
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="cls", type="classification", labels=["x", "y", "z"]), LoraSettings(r=4))
    model.add_task(TaskSpec(name="reg", type="regression", text_pair_column="b", label_range=[0, 5]),
                   LoraSettings(r=8, alpha=16))
    model.add_task(TaskSpec(name="qa", type="extractive-qa", text_pair_column="context", max_length=48,
                            doc_stride=8, max_question_length=16))
    model.add_task(TaskSpec(name="bi", type="pair-classification", labels=["no", "yes"], text_pair_column="b",
                            pair_encoding="bi"))
    torch.manual_seed(1)
    for layer in model.lora_layers().values():
        for task in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[task].weight, std=0.5)
    model.bf16 = False
    return model


INPUTS = ["a text", ("one", "two"), {"question": "where?", "context": "in the house by the river " * 6},
          ("is it here", "is it there at all"), "another text", ("three", "four"), ("x", "y z")]
TASKS = ["cls", "reg", "qa", "bi", "cls", "reg", "bi"]


def _assert_same_predictions(got, expected, tolerance):
    for a, b in zip(got, expected, strict=True):
        assert type(a) is type(b) and a.task == b.task
        if hasattr(a, "probabilities"):
            assert a.label == b.label
            assert a.probabilities == pytest.approx(b.probabilities, abs=tolerance)
        elif hasattr(a, "answer"):
            assert (a.answer, a.start, a.end) == (b.answer, b.start, b.end)
        else:
            assert a.score == pytest.approx(b.score, abs=tolerance)


def test_mixed_predictions_on_the_gpu_equal_the_cpus(backbone):
    model = _four_kinds(backbone)
    on_cpu = model.predict(INPUTS, task=TASKS)
    model.to("cuda")
    assert model.device.type == "cuda"
    _assert_same_predictions(model.predict(INPUTS, task=TASKS), on_cpu, 1e-4)


def test_mixed_batch_rows_equal_single_task_runs_on_the_gpu(backbone, tokenizer):
    model = _four_kinds(backbone).to("cuda")
    encoded = tokenizer(TEXTS, truncation=True, max_length=32)
    batch = collate([{"input_ids": i, "token_type_ids": t}
                     for i, t in zip(encoded["input_ids"], encoded["token_type_ids"])], tokenizer.pad_token_id)
    batch = {k: v.to("cuda") for k, v in batch.items()}
    row_tasks = ["reg", "cls", None, "bi", "cls", "reg"]
    with torch.no_grad():
        mixed = model.encode(batch, row_tasks)
        for row, task in enumerate(row_tasks):
            single = model.encode({k: v[row:row + 1] for k, v in batch.items()}, task)
            length = int(batch["attention_mask"][row].sum())
            torch.testing.assert_close(mixed[row, :length], single[0, :length], rtol=1e-5, atol=1e-5)
        assert (model.encode(batch, "cls") - model.encode(batch, "reg")).abs().max() > 1e-3


def test_bf16_on_the_gpu_stays_close_and_gives_back_the_exact_weights(backbone):
    model = _four_kinds(backbone).to("cuda")
    exact = model.predict(INPUTS, task=TASKS)
    weights = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    model.bf16 = True
    model.merge_min_rows = 0  # one-task batches merge their adapter: bf16 merge and unmerge on the GPU
    approx = model.predict(INPUTS, task=TASKS)
    for a, b in zip(approx, exact):
        if hasattr(a, "probabilities"):
            assert a.probabilities == pytest.approx(b.probabilities, abs=5e-2)
        elif hasattr(a, "score"):
            assert a.score == pytest.approx(b.score, abs=0.25)  # a 0-5 regression head
    model.predict(["one task only"] * 4, task="cls")
    model.unmerge_adapters()
    model.full_precision()
    for name, param in model.backbone.named_parameters():
        assert param.device.type == "cuda" and torch.equal(param, weights[name]), name


def test_training_on_the_gpu_learns_and_its_save_loads_on_the_cpu(tokenizer, tmp_path):
    from tiny_bundle import path_backbone, saved_backbone

    folder = saved_backbone(tmp_path / "backbone", tokenizer)
    model = MultiTaskModel(path_backbone(folder)).to("cuda")
    spec = TaskSpec(name="mood", type="classification", labels=["neg", "pos"], max_length=16)
    model.add_task(spec, LoraSettings(r=4, alpha=8))
    examples = [Example(text=f"it was {w}", label=int(w in ("great", "lovely"))) for w in
                ("great", "awful", "lovely", "broken") * 8]
    result = train_task(model, "mood", examples, examples[:8],
                        TrainConfig(epochs=6, batch_size=8, lr=1e-2, checkpoint_every=-1),
                        out_dir=tmp_path / "run", progress=False, report_to=())
    assert result.metrics["accuracy"] == 100.0
    assert all(p.device.type == "cuda" for p in model.task_parameters("mood").values())
    on_cpu = MultiTaskModel.load(tmp_path / "run", backbone=path_backbone(folder))
    assert on_cpu.device.type == "cpu"
    model.bf16 = on_cpu.bf16 = False
    texts = ["it was great", "it was broken", "it was lovely"]
    _assert_same_predictions(on_cpu.predict(texts, task="mood"), model.predict(texts, task="mood"), 1e-4)


def test_router_and_support_pipeline_on_the_gpu_answer_as_on_the_cpu(tokenizer):
    from tiny_bundle import FAQ, ROUTER_EXAMPLES, support_model

    from mtpeft.router import LearnedRouter
    from mtpeft.support import SupportPipeline

    cpu_model = support_model(tiny_bert(tokenizer))
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    messages = ["How do I return an item?", "my refund is late and I am angry", "shipping cost?"]
    cpu_replies = [SupportPipeline(cpu_model, FAQ, top_k=2).answer(m) for m in messages]
    gpu_replies = [SupportPipeline(gpu_model, FAQ, top_k=2).answer(m) for m in messages]
    for on_cpu, on_gpu in zip(cpu_replies, gpu_replies):
        assert on_gpu.sentiment.label == on_cpu.sentiment.label
        assert [s.id for s in on_gpu.similar] == [s.id for s in on_cpu.similar]
        assert [s.score for s in on_gpu.similar] == pytest.approx([s.score for s in on_cpu.similar], abs=1e-4)
        assert (on_gpu.answer.faq_id, on_gpu.answer.text) == (on_cpu.answer.faq_id, on_cpu.answer.text)
    inputs = [text for _, text in ROUTER_EXAMPLES]
    cpu_routes = LearnedRouter.fit(cpu_model, ROUTER_EXAMPLES).route(inputs)
    gpu_routes = LearnedRouter.fit(gpu_model, ROUTER_EXAMPLES).route(inputs)
    assert [d.task for d in gpu_routes] == [d.task for d in cpu_routes]
    assert [d.confidence for d in gpu_routes] == pytest.approx([d.confidence for d in cpu_routes], abs=1e-3)
