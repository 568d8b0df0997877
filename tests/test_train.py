"""Every task type learns tiny separable data through the one training loop."""

from __future__ import annotations

import random
import re

import pytest
import torch

from conftest import tiny_bert

from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.examples import Example
from mtpeft.train import train_task

POSITIVE = ["great", "excellent", "wonderful", "love", "happy", "perfect", "superb", "nice"]
NEGATIVE = ["awful", "terrible", "broken", "hate", "angry", "worst", "poor", "sad"]
FILLER = ["the", "item", "was", "and", "it", "my", "order", "really", "very", "service"]


def _sentences(rng, words, n):
    out = []
    for _ in range(n):
        body = rng.sample(FILLER, 3) + [rng.choice(words), rng.choice(words)]
        rng.shuffle(body)
        out.append(" ".join(body))
    return out


def _sentiment(seed, n):
    rng = random.Random(seed)
    pos, neg = _sentences(rng, POSITIVE, n), _sentences(rng, NEGATIVE, n)
    examples = [Example(text=t, label=1) for t in pos] + [Example(text=t, label=0) for t in neg]
    rng.shuffle(examples)
    return examples


def _model(backbone, spec, **lora):
    model = MultiTaskModel(backbone)
    model.add_task(spec, LoraSettings(**lora) if lora else None)
    return model


FAST = dict(epochs=6, batch_size=16, lr=5e-3, bf16=False, seed=0)


def test_classification_learns(backbone):
    spec = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])
    model = _model(backbone, spec)
    result = train_task(model, "sent", _sentiment(0, 80), _sentiment(1, 40), TrainConfig(**FAST), progress=False)
    assert result.metrics["accuracy"] >= 85, result.metrics
    assert model.predict("excellent wonderful item", task="sent").label == "pos"


def test_pair_classification_learns(backbone):
    # The label is carried by the second text only, so the pair input must reach the model.
    rng = random.Random(0)
    def pairs(n):
        out = []
        for _ in range(n):
            good = rng.random() < 0.5
            second = " ".join(rng.sample(FILLER, 3) + [rng.choice(POSITIVE if good else NEGATIVE)])
            out.append(Example(text=" ".join(rng.sample(FILLER, 4)), text_pair=second, label=int(good)))
        return out
    spec = TaskSpec(name="dup", type="pair-classification", labels=["different", "same"], text_pair_column="b")
    model = _model(backbone, spec)
    result = train_task(model, "dup", pairs(300), pairs(60), TrainConfig(**{**FAST, "epochs": 10}), progress=False)
    assert result.metrics["accuracy"] >= 85, result.metrics


def test_bi_encoder_starts_as_cosine_similarity_and_learns(backbone):
    from mtpeft.heads import pool

    spec = TaskSpec(name="sim", type="regression", text_pair_column="b", label_range=[0, 5], pair_encoding="bi")
    model = _model(backbone, spec)
    model.bf16 = False
    a, b = "the order arrived", "my parcel came late"
    encoded = [model.tokenizer(t, return_tensors="pt") for t in (a, b)]
    with torch.no_grad():
        u, v = (pool(backbone.model(**e).last_hidden_state, e["attention_mask"], "mean") for e in encoded)
    cosine = float(torch.nn.functional.cosine_similarity(u, v))
    assert model.predict((a, b)).score == pytest.approx(5 * cosine, abs=1e-4)  # zero-shot: scaled cosine

    rng = random.Random(0)
    def pairs(n):
        out = []
        for _ in range(n):
            same = rng.random() < 0.5
            w = rng.choice(POSITIVE)
            other = w if same else rng.choice(NEGATIVE)
            out.append(Example(text=f"{w} {w}", text_pair=f"{other} {other}", label=int(same)))
        return out
    dup = TaskSpec(name="dup", type="pair-classification", labels=["different", "same"], text_pair_column="b",
                   pair_encoding="bi")
    model.add_task(dup)
    result = train_task(model, "dup", pairs(300), pairs(60), TrainConfig(**{**FAST, "epochs": 10}), progress=False)
    assert result.metrics["accuracy"] >= 85, result.metrics


def test_regression_learns(backbone):
    rng = random.Random(0)
    def rows(n):
        out = []
        for _ in range(n):
            k = rng.randint(0, 5)
            words = ["great"] * k + rng.sample(FILLER, 5 - k)
            rng.shuffle(words)
            out.append(Example(text=" ".join(words), text_pair="item", label=float(k)))
        return out
    spec = TaskSpec(name="score", type="regression", text_pair_column="b", label_range=[0, 5])
    model = _model(backbone, spec)
    result = train_task(model, "score", rows(300), rows(80), TrainConfig(**FAST), progress=False)
    assert result.metrics["spearman"] >= 70, result.metrics


def test_extractive_qa_learns(backbone):
    rng = random.Random(0)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    def rows(n):
        out = []
        for i in range(n):
            filler = " ".join(rng.sample(FILLER, 6))
            colour = rng.choice(colours)
            context = f"{filler} the box is {colour} and {' '.join(rng.sample(FILLER, 4))}."
            start = context.index(f"is {colour}") + 3
            out.append(Example(text="what colour is the box?", text_pair=context, id=str(i),
                               answers=[{"text": colour, "answer_start": start}]))
        return out
    spec = TaskSpec(name="qa", type="extractive-qa", text_pair_column="context", max_length=48, doc_stride=8,
                    max_question_length=16)
    model = _model(backbone, spec)
    result = train_task(model, "qa", rows(200), rows(50), TrainConfig(**{**FAST, "epochs": 8}), progress=False)
    assert result.metrics["exact_match"] >= 60, result.metrics


def test_head_only_trains_only_the_head(backbone):
    spec = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])
    model = MultiTaskModel(backbone)
    model.add_task(spec, head_only=True)
    assert model.lora_layers("sent") == {}
    before = {n: p.clone() for n, p in backbone.model.named_parameters()}
    result = train_task(model, "sent", _sentiment(0, 40), _sentiment(1, 20), TrainConfig(**FAST), progress=False)
    assert result.trainable_parameters == 32 * 2 + 2
    model.full_precision()  # evaluation may have left the frozen backbone in bf16
    assert all((p == before[n]).all() for n, p in backbone.model.named_parameters())


def test_training_leaves_other_tasks_untouched(backbone):
    model = MultiTaskModel(backbone)
    for name in ("a", "b"):
        model.add_task(TaskSpec(name=name, type="classification", labels=["neg", "pos"]))
    frozen = {k: v.clone() for k, v in model.task_parameters("b").items()}
    train_task(model, "a", _sentiment(0, 20), None, TrainConfig(**{**FAST, "epochs": 1}), progress=False)
    assert all((model.task_parameters("b")[k] == v).all() for k, v in frozen.items())
    changed = [k for k, v in model.task_parameters("a").items() if "lora_B" in k and v.abs().sum() > 0]
    assert changed


def test_training_writes_run_folder(backbone, tmp_path):
    spec = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])
    model = _model(backbone, spec)
    train_task(model, "sent", _sentiment(0, 20), _sentiment(1, 10), TrainConfig(**{**FAST, "epochs": 1}),
               out_dir=tmp_path / "run", progress=False)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"task.json", "adapter_model.safetensors", "adapter_config.json", "head.safetensors",
            "training.json", "metrics.json"} <= names


def test_example_limits_take_a_fixed_random_subset_not_a_label_sorted_prefix(backbone, monkeypatch):
    """IMDb's files list every negative review first: the first N would all be one class."""
    import mtpeft.train

    spec = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])
    by_label = sorted(_sentiment(0, 40), key=lambda e: e.label)
    scored = []
    monkeypatch.setattr(mtpeft.train, "evaluate_task", lambda m, t, examples, bs: scored.append(examples) or {})
    config = TrainConfig(**{**FAST, "epochs": 1}, max_train_examples=10, max_eval_examples=10)
    result = train_task(_model(backbone, spec), "sent", by_label, by_label, config, progress=False)
    assert result.train_examples == 10
    assert {e.label for e in scored[-1]} == {0, 1} and len(scored[-1]) == 10
    assert scored[-1] == sorted(scored[-1], key=by_label.index)  # in file order


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=0), dict(lr=-1), dict(eval_batch_size=0),
                                 dict(max_train_examples=-1), dict(max_train_examples=0), dict(max_eval_examples=-3),
                                 dict(max_grad_norm=-1.0), dict(warmup_ratio=-0.1), dict(warmup_ratio=6.0)])
def test_bad_train_config_names_the_option(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_interrupted_training_leaves_the_models_precision_setting(backbone, monkeypatch):
    model = MultiTaskModel(backbone)
    model.add_task(TaskSpec(name="sent", type="classification", labels=["neg", "pos"]))
    model.bf16 = None  # "decide by hardware"; the run forces fp32 below

    def interrupt(where, step):
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("mtpeft.train.fault_point", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_task(model, "sent", _sentiment(0, 80), None, TrainConfig(**{**FAST, "bf16": False}), progress=False)
    assert model.bf16 is None


def test_backbone_dropout_is_a_recipe_setting_for_the_run_only(tokenizer):
    spec = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])
    seen, learned = [], {}
    for dropout in (None, True):
        model = _model(tiny_bert(tokenizer), spec)
        model.backbone.embeddings.register_forward_hook(lambda module, args, out: seen.append(module.training))
        seen.clear()
        config = TrainConfig(**{**FAST, "epochs": 1, "backbone_dropout": dropout})
        train_task(model, "sent", _sentiment(0, 20), None, config, progress=False)
        assert set(seen) == {dropout is True}  # the frozen backbone's dropout layers train only when asked
        assert model.backbone_dropout is False and not model.backbone.training  # the model's own choice again
        learned[dropout] = model.task_parameters("sent")["head.out.weight"].clone()
    assert not torch.equal(learned[None], learned[True])  # the same seed and batches, other noise


def test_a_batch_with_fewer_rows_than_processes_is_trained_on_in_its_epoch():
    # Such a batch was skipped: its rows missed their epoch, and the run took a batch of the next.
    from mtpeft.distributed import DataParallel

    parallel, shares = DataParallel(), []
    for rank in range(4):
        parallel.rank, parallel.world_size = rank, 4
        shares.append(parallel.shard([7, 3]))
    # Averaged over 4 processes, rows 7 and 3 weigh 1/2 each, as on one process; 2 and 3 stand in.
    assert shares == [([7], 2.0), ([3], 2.0), ([7], 0.0), ([7], 0.0)]


def test_no_training_examples_is_a_clear_error(backbone):
    # An empty data file (or one whose rows were all skipped) used to end in the tokenizer's IndexError.
    spec = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])
    model = _model(backbone, spec)
    with pytest.raises(ValueError, match="no training examples"):
        train_task(model, "sent", [], _sentiment(1, 4), TrainConfig(**FAST), progress=False)


@pytest.mark.parametrize("every", [3, 100])
def test_run_interrupted_after_its_last_step_resumes_with_its_final_loss(tokenizer, tmp_path, monkeypatch, every):
    # 40 examples / 16 per batch x 1 epoch = 3 steps; the last step is checkpointed whether or not `every` divides it.
    spec = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])
    config = TrainConfig(**{**FAST, "epochs": 1, "checkpoint_every": every})
    train, held_out = _sentiment(0, 20), _sentiment(1, 4)
    whole = train_task(_model(tiny_bert(tokenizer), spec), "sent", train, held_out, config, progress=False,
                       out_dir=tmp_path / "whole", report_to=())

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # killed while evaluating, after the last checkpoint

    with monkeypatch.context() as patch:
        patch.setattr("mtpeft.train.evaluate_task", interrupt)
        with pytest.raises(KeyboardInterrupt):
            train_task(_model(tiny_bert(tokenizer), spec), "sent", train, held_out, config, progress=False,
                       out_dir=tmp_path / "resumed", report_to=())
    trained = []
    monkeypatch.setattr("mtpeft.train.fault_point", lambda where, at: trained.append(where))
    resumed = train_task(_model(tiny_bert(tokenizer), spec), "sent", train, held_out, config, progress=False,
                         out_dir=tmp_path / "resumed", report_to=())
    assert "step" not in trained  # nothing trained again
    assert resumed.steps == whole.steps == 3
    assert resumed.final_loss == whole.final_loss
    assert resumed.metrics == whole.metrics


def _resume(tokenizer, out_dir, backbone_seed=0, flip_labels=False, lora=None, **changes):
    """A 3-step run into ``out_dir`` (continuing its checkpoint), with ``changes`` to its TrainConfig
    and ``lora`` (LoraSettings fields) to the model's adapter."""
    spec = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])
    train = [Example(text=ex.text, label=1 - ex.label if flip_labels else ex.label) for ex in _sentiment(0, 20)]
    config = TrainConfig(**{**FAST, "epochs": 1, "checkpoint_every": 1, **changes})
    return train_task(_model(tiny_bert(tokenizer, seed=backbone_seed), spec, **(lora or {})), "sent", train, _sentiment(1, 4), config,
                      progress=False, out_dir=out_dir, report_to=())


def _stopped_after_step_2(tokenizer, out_dir, monkeypatch):
    def interrupt(where, step):
        if step == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("mtpeft.train.fault_point", interrupt)
        with pytest.raises(KeyboardInterrupt):
            _resume(tokenizer, out_dir)


@pytest.mark.parametrize("change, differing", [
    ({"backbone_seed": 1}, "backbone: the backbone's weights differ"),  # same shapes, other weights
    ({"flip_labels": True}, "features: the training examples differ"),  # other data with as many rows: a mix
    ({"lr": FAST["lr"] / 2}, f"config: lr {FAST['lr']!r} there, {FAST['lr'] / 2!r} here"),  # named, not just "config"
    # The model's adapter, which the TrainConfig's lora need not describe: other scaling, same shapes.
    ({"lora": {"alpha": 64.0}}, "adapter: alpha 16.0 there, 64.0 here"),
])
def test_a_checkpoint_does_not_resume_on_another_backbone_data_or_recipe(tokenizer, tmp_path, monkeypatch, change,
                                                                          differing):
    from mtpeft.checkpoint import CheckpointMismatchError

    _stopped_after_step_2(tokenizer, tmp_path, monkeypatch)
    with pytest.raises(CheckpointMismatchError, match=rf"different settings \({re.escape(differing)}\)"):
        _resume(tokenizer, tmp_path, **change)


def test_a_run_resumes_with_other_evaluation_and_checkpoint_settings(tokenizer, tmp_path, monkeypatch):
    _stopped_after_step_2(tokenizer, tmp_path, monkeypatch)
    result = _resume(tokenizer, tmp_path, eval_batch_size=3, max_eval_examples=5, checkpoint_every=7)
    assert result.steps == 3 and result.metrics["examples"] == 5


def test_a_checkpoint_keeps_and_restores_the_gpu_generator(tmp_path, monkeypatch):
    """GPU dropout draws from the CUDA generator: a resumed GPU run needs it back, not a fresh one."""
    from mtpeft.checkpoint import RunPosition, load_checkpoint, save_checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.arange(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path / "ckpt.safetensors", {"w": weight.detach()}, optimizer.state_dict(), scheduler,
                    RunPosition(step=3), {"seed": 0}, 1)
    load_checkpoint(tmp_path / "ckpt.safetensors", {"w": weight}, scheduler, {"seed": 0})
    assert len(restored) == 1 and restored[0].tolist() == list(range(8))


def test_a_run_on_a_named_gpu_keeps_and_restores_that_gpus_generator(tmp_path, monkeypatch):
    """A run on cuda:1 draws dropout from cuda:1's generator; torch's default is the current GPU's."""
    from mtpeft.checkpoint import RunPosition, load_checkpoint, save_checkpoint
    from mtpeft.distributed import local_rng_state

    generators = {"cuda": torch.zeros(8, dtype=torch.uint8), "cuda:1": torch.ones(8, dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": generators[str(device)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((str(device), state)))
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path / "ckpt.safetensors", {"w": weight.detach()}, optimizer.state_dict(), scheduler,
                    RunPosition(step=3), {"seed": 0}, 1, [local_rng_state(torch.device("cuda:1"))])
    load_checkpoint(tmp_path / "ckpt.safetensors", {"w": weight}, scheduler, {"seed": 0}, device=torch.device("cuda:1"))
    assert [(device, state.tolist()) for device, state in restored] == [("cuda:1", [1] * 8)]


def test_each_process_takes_back_its_own_gpu_generator(tmp_path, monkeypatch):
    """Two processes on two GPUs draw different dropout masks from their own CUDA generators."""
    from mtpeft.checkpoint import RunPosition, load_checkpoint, save_checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    per_rank = [{"torch": torch.get_rng_state(), "cuda": torch.full((8,), rank, dtype=torch.uint8)} for rank in (0, 1)]
    save_checkpoint(tmp_path / "ckpt.safetensors", {"w": weight.detach()}, optimizer.state_dict(), scheduler,
                    RunPosition(step=3), {"seed": 0}, 1, per_rank)
    for rank in (1, 0):
        load_checkpoint(tmp_path / "ckpt.safetensors", {"w": weight}, scheduler, {"seed": 0}, rank=rank)
    assert [state.tolist() for state in restored] == [[1] * 8, [0] * 8]


def _infinite_loss_at_call(monkeypatch, n):
    """The classification loss made infinite at its ``n``th call (a diverging step)."""
    from mtpeft.tasks.classification import Classification

    calls, loss = [], Classification.loss

    def diverging(self, spec, outputs, batch):
        calls.append(1)
        return loss(self, spec, outputs, batch) * (float("inf") if len(calls) == n else 1.0)

    monkeypatch.setattr(Classification, "loss", diverging)


def test_a_non_finite_loss_stops_the_run_before_its_update(backbone, tmp_path, monkeypatch):
    # It went on with every weight NaN, saved that adapter and scored it, without a word.
    spec = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])
    model = _model(backbone, spec)
    _infinite_loss_at_call(monkeypatch, 2)
    config = TrainConfig(**{**FAST, "epochs": 1, "checkpoint_every": 1})
    with pytest.raises(ValueError, match="'sent': the loss is inf at step 2; stopped before the update"):
        train_task(model, "sent", _sentiment(0, 20), _sentiment(1, 4), config, out_dir=tmp_path, progress=False,
                   report_to=())
    assert all(torch.isfinite(p).all() for p in model.task_parameters("sent").values())
    assert (tmp_path / "checkpoint.safetensors").exists() and not (tmp_path / "task.json").exists()
