"""Training with ``compile=True`` follows the eager path, and falls back to eager when compiling fails."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from conftest import tiny_bert
from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.examples import Example
from mtpeft.train import train_task

SPEC = TaskSpec(name="mood", type="classification", labels=["neg", "pos"], max_length=16)
# Lengths vary, so the length-bucketed batches take several sequence lengths through one compilation.
EXAMPLES = [Example(text=" ".join([w] * (1 + i % 4)), label=int(w in ("great", "lovely")))
            for i, w in enumerate(("great", "awful", "lovely", "broken") * 6)]


def _trained(tokenizer, **settings) -> tuple[MultiTaskModel, dict[str, torch.Tensor]]:
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(SPEC, LoraSettings(r=4, alpha=8))
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, bf16=False, seed=0, checkpoint_every=-1, **settings)
    train_task(model, "mood", EXAMPLES, None, config, progress=False, save=False, report_to=())
    return model, {k: v.detach().clone() for k, v in model.task_parameters("mood").items()}


def test_compiled_training_follows_the_eager_path(tokenizer):
    _, eager = _trained(tokenizer)
    model, compiled = _trained(tokenizer, compile=True)
    assert model.backbone._compiled_call_impl is None  # evaluation and serving run eagerly
    for name, weight in eager.items():
        torch.testing.assert_close(compiled[name], weight, rtol=1e-4, atol=1e-5)
    # A second run on the same model reuses the compilation.
    torch._dynamo.utils.counters.clear()
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-2, bf16=False, seed=1, checkpoint_every=-1, compile=True)
    train_task(model, "mood", EXAMPLES, None, config, progress=False, save=False, report_to=())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_a_compiler_that_fails_leaves_the_run_eager(tokenizer, monkeypatch):
    calls = []

    def broken_backend(graph, example_inputs):
        calls.append(graph)
        raise RuntimeError("no compiler on this machine")

    compile_function = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_function(fn, **{**options, "backend": broken_backend}))
    _, eager = _trained(tokenizer)
    _, fallen_back = _trained(tokenizer, compile=True)
    assert calls, "the compiler was never asked"
    for name, weight in eager.items():
        torch.testing.assert_close(fallen_back[name], weight, rtol=0, atol=0)


def test_compile_is_refused_where_the_loop_does_not_support_it(tokenizer, monkeypatch):
    from mtpeft import distributed

    monkeypatch.setattr(distributed.DataParallel, "__init__", _fsdp_like)
    with pytest.raises(ValueError, match="FSDP and DeepSpeed train uncompiled"):
        _trained(tokenizer, compile=True)


def _fsdp_like(self) -> None:
    self.accelerator, self.sharded, self.zero_stage, self.device, self._zero = None, True, None, None, None
    self.rank, self.world_size = 0, 1


def test_a_deep_copy_of_a_compiled_model_trains_its_own_weights(tokenizer, monkeypatch):
    # The compiled call kept on the backbone went along into a deep copy, still bound to the
    # original: the copy's compiled run used the original's weights and its adapter never learned.
    import copy

    torch._dynamo.reset()  # compiled, even after a failed compilation earlier in the process
    compile_function = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile_function(fn, **{**options, "backend": "eager"}))
    model, _ = _trained(tokenizer, compile=True)
    fork = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in fork.task_parameters("mood").items()}
    original = {k: v.detach().clone() for k, v in model.task_parameters("mood").items()}
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-2, bf16=False, seed=1, checkpoint_every=-1, compile=True)
    train_task(fork, "mood", EXAMPLES, None, config, progress=False, save=False, report_to=())
    moved = [k for k, v in fork.task_parameters("mood").items() if ".lora_B" in k and not torch.equal(v, before[k])]
    assert moved, "the copy's adapter did not train"
    for name, weight in model.task_parameters("mood").items():
        assert torch.equal(weight, original[name]) and weight.grad is None, name


def test_every_task_trained_on_a_model_is_compiled(tokenizer, monkeypatch):
    # Each task is a compilation of its own; past dynamo's limit (8 by default, 1 here) the
    # later tasks ran eagerly, with only a log line to say so.
    calls = []

    def counting_backend(graph, example_inputs):
        calls.append(graph)
        return graph.forward

    torch._dynamo.reset()  # a failed compilation earlier in the process leaves the backbone's code eager for good
    compile_function = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **options: compile_function(fn, **{**options, "backend": counting_backend}))
    with torch._dynamo.config.patch(recompile_limit=1):
        model, _ = _trained(tokenizer, compile=True)
        model.add_task(TaskSpec(name="other", type="classification", labels=["neg", "pos"], max_length=16),
                       LoraSettings(r=4))
        calls.clear()
        config = TrainConfig(epochs=1, batch_size=8, lr=1e-2, bf16=False, seed=1, checkpoint_every=-1, compile=True)
        train_task(model, "other", EXAMPLES, None, config, progress=False, save=False, report_to=())
    assert calls, "the second task ran eagerly"


def test_a_backbone_the_caller_compiled_stays_compiled_after_the_run(tokenizer, monkeypatch):
    # The run set the backbone's compiled call to None at its end, dropping a ``compile()`` of the caller's.
    compile_function = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **options: compile_function(fn, **{**options, "backend": "eager"}))
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(SPEC, LoraSettings(r=4, alpha=8))
    model.backbone.compile(backend="eager")
    theirs = model.backbone._compiled_call_impl
    config = TrainConfig(epochs=1, batch_size=8, lr=1e-2, bf16=False, seed=0, checkpoint_every=-1, compile=True)
    train_task(model, "mood", EXAMPLES, None, config, progress=False, save=False, report_to=())
    assert theirs is not None and model.backbone._compiled_call_impl is theirs


def test_a_model_trained_compiled_still_pickles(tokenizer, monkeypatch):
    # The compiled call was kept in the backbone's __dict__: torch.save(model) failed with a PicklingError.
    import io

    compile_function = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, **options: compile_function(fn, **{**options, "backend": "eager"}))
    model, _ = _trained(tokenizer, compile=True)
    torch.save(model, io.BytesIO())
