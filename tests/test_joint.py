"""Joint multi-task training: task sampling, one shared adapter, separate learning rates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert

from mtpeft.config import LoraSettings, TrainConfig
from mtpeft.examples import Example
from mtpeft.joint import (
    SHARED_ADAPTER,
    TaskSampler,
    build_joint_model,
    joint_optimizer,
    sampling_probabilities,
    shared_parameters,
    train_joint,
)
from mtpeft.tasks import TaskSpec

SIZES = {"big": 900, "mid": 90, "small": 10}
SENT = TaskSpec(name="sent", type="classification", labels=["neg", "pos"])
SIM = TaskSpec(name="sim", type="regression", text_pair_column="b", label_range=[0, 5])


def test_sampling_probabilities():
    proportional = sampling_probabilities(SIZES, "proportional")
    assert proportional == pytest.approx({"big": 0.9, "mid": 0.09, "small": 0.01})
    tempered = sampling_probabilities(SIZES, "temperature", temperature=2.0)
    roots = {t: n ** 0.5 for t, n in SIZES.items()}
    assert tempered == pytest.approx({t: r / sum(roots.values()) for t, r in roots.items()})
    assert sampling_probabilities(SIZES, "temperature", 1.0) == pytest.approx(proportional)
    flat = sampling_probabilities(SIZES, "temperature", 1e6)
    assert max(flat.values()) - min(flat.values()) < 1e-4  # T -> infinity: uniform
    with pytest.raises(ValueError, match="unknown task sampling"):
        sampling_probabilities(SIZES, "round-robin")
    for bad in (0.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            sampling_probabilities(SIZES, "temperature", bad)
    with pytest.raises(ValueError, match="every task needs training examples"):
        sampling_probabilities({"a": 3, "b": 0})


@pytest.mark.parametrize("sampling", ["proportional", "temperature"])
def test_sampler_draws_match_the_probabilities(sampling):
    probabilities = sampling_probabilities(SIZES, sampling, temperature=3.0)
    draws = Counter(TaskSampler(probabilities, seed=7).draw(40_000))
    for task, p in probabilities.items():
        assert draws[task] / 40_000 == pytest.approx(p, abs=0.01)
    assert TaskSampler(probabilities, seed=7).draw(50) == TaskSampler(probabilities, seed=7).draw(50)


def _data():
    sentences = [Example(text=f"{w} item {i}", label=int(w == "great")) for i, w in
                 enumerate(["great", "awful"] * 12)]
    pairs = [Example(text=f"a{i} b", text_pair=f"a{i} b" if i % 2 else "zz", label=5.0 * (i % 2)) for i in range(8)]
    return {"sent": (sentences, sentences[:6]), "sim": (pairs, pairs)}


def test_joint_training_shares_one_adapter_and_keeps_the_backbone(tokenizer):
    backbone = tiny_bert(tokenizer)
    model = build_joint_model(backbone, [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    model.bf16 = False
    assert model.lora_layers("sent") == {} and len(model.lora_layers(SHARED_ADAPTER)) == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-2, head_lr=5e-3, bf16=False, seed=0)
    optimizer = joint_optimizer(model, config)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 5e-3]  # shared adapter, heads
    result = train_joint(model, _data(), config, "temperature", 2.0, task_epochs={"sent": 1, "sim": 2},
                         progress=False)
    assert result.total_steps == 6 + 4  # 1 epoch x 6 batches of sent + 2 epochs x 2 batches of sim
    assert sum(result.steps.values()) == result.total_steps and min(result.steps.values()) > 0
    assert set(result.metrics) == {"sent", "sim"} and "accuracy" in result.metrics["sent"]
    assert result.shared_parameters == 2 * 2 * 4 * (32 + 32)
    assert result.head_parameters == {"sent": 66, "sim": 33}
    model.unmerge_adapters()  # evaluation may have folded the shared adapter into the weights
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    shared = {id(p) for p in shared_parameters(model).values()}
    names = {n for n, p in model.named_parameters() if id(p) in shared}
    assert changed & names and any(n.startswith("heads.sent") for n in changed) and any(
        n.startswith("heads.sim") for n in changed)
    assert all(n in names or n.startswith("heads.") for n in changed)  # the backbone never moved
    batch = dict(tokenizer(["great item", "awful"], return_tensors="pt", padding=True))
    with torch.no_grad():
        both = model.encode(batch, ["sent", "sim"])
        torch.testing.assert_close(model.encode(batch, "sent"), both)  # both tasks' rows use the shared adapter
        assert not torch.allclose(model.encode(batch, None), both)


def test_joint_training_takes_the_first_n_examples_as_train_task_does(tokenizer):
    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    config = TrainConfig(epochs=1, batch_size=4, bf16=False, max_train_examples=4, max_eval_examples=3)
    result = train_joint(model, _data(), config, progress=False)
    assert result.total_steps == 2  # one batch of 4 per task, not 6 + 2
    assert {t: m["examples"] for t, m in result.metrics.items()} == {"sent": 3, "sim": 3}


def test_compare_runs_a_joint_cell(tokenizer, tmp_path, monkeypatch):
    import json

    from test_compare import write_task_files
    from tiny_bundle import saved_backbone

    from mtpeft.compare import GridSettings, run_grid

    monkeypatch.chdir(tmp_path)
    saved_backbone(tmp_path / "tiny", tokenizer)
    files = write_task_files(tmp_path)
    settings = GridSettings(tasks=["mood", "same"], methods=["joint-temperature"], seeds=[3], task_files=files,
                            backbone="tiny", in_process=True, progress=False, epochs=1, batch_size=4)
    from mtpeft import joint
    checkpoint_dirs = []

    def train_joint_checkpointing(*args, out_dir=None, **kwargs):
        checkpoint_dirs.append(out_dir)
        return train_joint(*args, out_dir=out_dir, **kwargs)

    monkeypatch.setattr(joint, "train_joint", train_joint_checkpointing)
    summary = run_grid(settings, log=lambda line: None)
    assert summary.failed == [] and len(summary.done) == 1
    # The cell checkpoints into its work folder, so a killed cell continues where it stopped.
    assert checkpoint_dirs == [Path("runs/compare/mood+same/joint-temperature-seed3")]
    for task in ("mood", "same"):
        run = json.loads((tmp_path / "results" / "compare" / task / "joint-temperature-seed3.json").read_text())
        assert run["joint"]["tasks"] == ["mood", "same"] and run["hyperparameters"]["temperature"] == 2.0
        assert run["parameters"]["trainable"] == run["joint"]["shared_parameters"] + run["joint"]["head_parameters"][task]
        assert run["adapter_bytes"] > 4 * run["joint"]["shared_parameters"]
    assert run_grid(settings, log=lambda line: None).skipped  # resumable: nothing left to run


def test_a_saved_joint_model_loads_as_a_bundle_with_the_same_predictions(tokenizer, tmp_path):
    from peft import PeftModel

    from mtpeft.model import MultiTaskModel
    from mtpeft.storage import read_json

    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    model.bf16 = False
    train_joint(model, _data(), TrainConfig(epochs=1, batch_size=4, lr=1e-2, bf16=False, seed=0), progress=False)
    model.save(tmp_path / "bundle")
    loaded = MultiTaskModel.load(tmp_path / "bundle", backbone=tiny_bert(tokenizer))
    loaded.bf16 = False
    inputs, tasks = ["great item 3", ("a1 b", "a1 b"), "awful", ("a2 b", "zz")], ["sent", "sim", "sent", "sim"]
    before, after = model.predict(inputs, task=tasks), loaded.predict(inputs, task=tasks)
    for old, new in zip(before, after):
        assert (new.task, getattr(new, "label", None)) == (old.task, getattr(old, "label", None))
        assert new.score == pytest.approx(old.score, abs=1e-5)
    record = read_json(tmp_path / "bundle" / "sent" / "task.json")
    assert record["adapter"]["shared_with"] == ["sent", "sim"]
    assert record["trainable_parameters"] == 2 * 2 * 4 * (32 + 32) + 66  # the shared adapter and the task's head
    # Each task folder stands alone in the PEFT layout, the shared adapter copied into it.
    peft_model = PeftModel.from_pretrained(tiny_bert(tokenizer).model, tmp_path / "bundle" / "sim")
    peft_a = {n: p for n, p in peft_model.named_parameters() if "lora_A" in n}
    assert len(peft_a) == 4
    ours = shared_parameters(model)
    first = next(n for n in peft_a if "layer.0." in n and "query" in n)
    torch.testing.assert_close(peft_a[first], ours["encoder.layer.0.attention.self.query.lora_A"])


def test_a_loaded_joint_bundle_shares_one_adapter_again_and_merges_it_for_mixed_batches(tokenizer, tmp_path):
    from mtpeft.model import MultiTaskModel

    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    train_joint(model, _data(), TrainConfig(epochs=1, batch_size=4, lr=1e-2, bf16=False, seed=0), progress=False)
    model.save(tmp_path / "bundle")
    loaded = MultiTaskModel.load(tmp_path / "bundle", backbone=tiny_bert(tokenizer))
    assert loaded.adapter_alias == {"sent": SHARED_ADAPTER, "sim": SHARED_ADAPTER}
    assert loaded.lora_layers("sent") == loaded.lora_layers("sim") == {}
    assert len(loaded.lora_layers(SHARED_ADAPTER)) == 4

    copies = MultiTaskModel.load(tmp_path / "bundle", backbone=tiny_bert(tokenizer))
    copies.unshare_adapter("sent")
    copies.unshare_adapter("sim")  # each task its own copy: a mixed batch runs two adapters, unmerged
    assert copies.adapter_alias == {} and copies.adapters_equal(["sent", "sim"])
    for m in (loaded, copies):
        m.bf16 = False
    inputs = ["great item 3", ("a1 b", "a1 b"), "awful", ("a2 b", "zz"), "fine", ("a3", "a3 b"), "bad 7", ("x", "y")]
    tasks = ["sent", "sim"] * 4
    shared, separate = loaded.predict(inputs, task=tasks), copies.predict(inputs, task=tasks)
    assert loaded._merged_task() == SHARED_ADAPTER and copies._merged_task() is None
    assert [p.score for p in shared] == pytest.approx([p.score for p in separate], abs=1e-5)

    with torch.no_grad():
        next(iter(copies.lora_layers("sim").values())).lora_B["sim"].weight.add_(0.1)  # "retrained"
    assert not copies.adapters_equal(["sent", "sim"])
    with pytest.raises(ValueError, match="do not hold equal LoRA adapters"):
        copies.share_adapter(["sent", "sim"])
    copies.save(tmp_path / "retrained")
    assert MultiTaskModel.load(tmp_path / "retrained", backbone=tiny_bert(tokenizer)).adapter_alias == {}


def test_tasks_of_a_joint_model_loaded_one_at_a_time_share_one_adapter(tokenizer, tmp_path):
    from mtpeft.model import MultiTaskModel
    from mtpeft.storage import install_task, read_task

    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    train_joint(model, _data(), TrainConfig(epochs=1, batch_size=4, lr=1e-2, bf16=False, seed=0), progress=False)
    model.save(tmp_path / "bundle")
    served = MultiTaskModel(tiny_bert(tokenizer))
    for name in ("sent", "sim"):  # as a server's task loads add them: one folder at a time
        install_task(served, read_task(tmp_path / "bundle" / name))
    assert served.adapter_alias == {"sent": SHARED_ADAPTER, "sim": SHARED_ADAPTER}
    assert served.lora_layers("sent") == served.lora_layers("sim") == {}

    # Reloading one task joins it to the adapter its partner already shares ...
    served.remove_task("sim")
    assert served.adapter_alias == {"sent": SHARED_ADAPTER}
    saved = read_task(tmp_path / "bundle" / "sim")
    install_task(served, saved)
    assert served.adapter_alias == {"sent": SHARED_ADAPTER, "sim": SHARED_ADAPTER}
    # ... unless its weights changed since: a retrained version keeps its own copy.
    served.remove_task("sim")
    with torch.no_grad():
        key = next(k for k in saved.adapter if k.endswith("lora_B.weight"))
        saved.adapter[key] += 0.1
    install_task(served, saved)
    assert served.adapter_alias == {"sent": SHARED_ADAPTER} and served.adapter_of("sim") == "sim"
    assert not served.adapters_equal(["sent", "sim"])

    # The adapter cache swaps tasks in one at a time too.
    from mtpeft.adapter_cache import AdapterStore

    store = AdapterStore.from_bundle(MultiTaskModel(tiny_bert(tokenizer)), tmp_path / "bundle", capacity=2)
    inputs, tasks = ["great item 3", ("a1 b", "a1 b"), "awful", ("a2 b", "zz")], ["sent", "sim"] * 2
    got = store.predict(inputs, task=tasks)
    assert store.model.adapter_alias == {"sent": SHARED_ADAPTER, "sim": SHARED_ADAPTER}
    model.bf16 = store.model.bf16
    assert [p.score for p in got] == pytest.approx([p.score for p in model.predict(inputs, task=tasks)], abs=1e-3)


def test_one_task_of_a_joint_model_trains_alone_only_on_its_own_copy_of_the_adapter(tokenizer):
    from mtpeft.train import train_task

    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    model.bf16 = False
    data = _data()
    train_joint(model, data, TrainConfig(epochs=1, batch_size=4, lr=1e-2, bf16=False, seed=0), progress=False)
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-2, bf16=False, seed=1, checkpoint_every=-1)
    with pytest.raises(ValueError, match=r"shares its adapter with \['sim'\].*unshare_adapter\('sent'\)"):
        train_task(model, "sent", *data["sent"], config, progress=False, report_to=())

    inputs, tasks = ["great item 3", ("a1 b", "a1 b"), "awful", ("a2 b", "zz")], ["sent", "sim", "sent", "sim"]
    joint = model.predict(inputs, task=tasks)
    model.unshare_adapter("sent")
    assert model.adapter_alias == {"sim": SHARED_ADAPTER} and model.adapters["sent"].r == 4
    assert len(model.lora_layers("sent")) == len(model.lora_layers(SHARED_ADAPTER)) == 4
    assert [p.score for p in model.predict(inputs, task=tasks)] == pytest.approx([p.score for p in joint], abs=1e-6)

    train_task(model, "sent", *data["sent"], config, progress=False, report_to=())
    after = model.predict(inputs, task=tasks)
    assert [p.score for p in after[1::2]] == pytest.approx([p.score for p in joint[1::2]], abs=1e-6)  # sim as it was
    assert max(abs(a.score - b.score) for a, b in zip(after[::2], joint[::2])) > 1e-3  # sent trained
    model.unshare_adapter("sim")  # the last task to use it: the shared adapter goes
    assert model.adapter_alias == {} and model.shared_adapters == {} and model.lora_layers(SHARED_ADAPTER) == {}
    assert [p.score for p in model.predict(inputs, task=tasks)] == pytest.approx([p.score for p in after], abs=1e-6)


def test_train_joint_command_writes_a_bundle_that_serves(tokenizer, tmp_path, monkeypatch, capsys):
    from test_compare import write_task_files
    from tiny_bundle import saved_backbone

    from mtpeft.cli import main
    from mtpeft.model import MultiTaskModel
    from mtpeft.storage import read_json

    monkeypatch.chdir(tmp_path)
    saved_backbone(tmp_path / "tiny", tokenizer)
    files = write_task_files(tmp_path)
    argv = ["train-joint", "--tasks", "mood,same", "--task-file", files[0], "--task-file", files[1],
            "--backbone", "tiny", "--out", "joint", "--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--seed", "4",
            "--r", "2", "--no-progress", "--fp32", "--pad-to-multiple-of", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert '\nmood: {"accuracy": ' in "\n" + out and '\nsame: {"accuracy": ' in out
    training = read_json(tmp_path / "joint" / "joint" / "training.json")
    assert training["tasks"] == ["mood", "same"] and training["sampling"] == "temperature"
    assert training["total_steps"] == 2 * (5 + 5) and training["config"]["seed"] == 4  # 2 epochs x 40 rows / 8
    assert training["config"]["pad_to_multiple_of"] == 8
    assert training["config"]["lora"]["r"] == 2 and training["config"]["lora"]["alpha"] == 4.0  # the adapter trained
    assert "joint/training.json" in read_json(tmp_path / "joint" / "bundle.json")["files"]
    model = MultiTaskModel.load(tmp_path / "joint")  # the manifest's checksums hold
    assert model.task_names == ["mood", "same"] and model.shared_adapters[model.adapter_alias["mood"]].r == 2
    assert model.task_metrics["mood"] == training["metrics"]["mood"]
    predictions = model.predict(["the great item", ("order 3 came", "order 3 came")], task=["mood", "same"])
    assert [p.task for p in predictions] == ["mood", "same"]
    assert main(["train-joint", "--tasks", "mood", "--task-file", files[0], "--out", "x"]) == 2
    assert "at least two different tasks" in capsys.readouterr().err


def test_an_interrupted_joint_run_resumes_to_the_same_weights(tokenizer, tmp_path, monkeypatch):
    from mtpeft import joint
    from mtpeft.checkpoint import CHECKPOINT_FILE, CheckpointMismatchError

    config = TrainConfig(epochs=2, batch_size=4, lr=1e-2, bf16=False, seed=0, checkpoint_every=3)

    def run(out_dir, settings=config, lora=LoraSettings(r=4, alpha=8)):
        model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], lora, seed=0)
        model.bf16 = False
        result = train_joint(model, _data(), settings, progress=False, out_dir=out_dir)
        return result, {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}

    whole, expected = run(None)

    def stop_at_step_8(kind, at):
        if (kind, at) == ("step", 8):
            raise KeyboardInterrupt

    monkeypatch.setattr(joint, "fault_point", stop_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    assert (tmp_path / CHECKPOINT_FILE).exists()  # written at step 6
    monkeypatch.undo()
    with pytest.raises(CheckpointMismatchError, match="different settings"):
        run(tmp_path, TrainConfig(epochs=2, batch_size=4, lr=5e-3, bf16=False, seed=0, checkpoint_every=3))
    # The shared adapter's scaling, which config.lora does not carry (train-joint --alpha sets the adapter alone).
    with pytest.raises(CheckpointMismatchError, match="adapter: alpha 8 there, 16 here"):
        run(tmp_path, lora=LoraSettings(r=4, alpha=16))
    resumed, weights = run(tmp_path)
    assert resumed.steps == whole.steps and resumed.total_steps == whole.total_steps
    for name, weight in expected.items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=0)
    assert not (tmp_path / CHECKPOINT_FILE).exists()  # the finished run removes it


def test_a_joint_run_that_fails_in_evaluation_resumes_without_training_again(tokenizer, tmp_path, monkeypatch):
    from mtpeft import joint
    from mtpeft.checkpoint import CHECKPOINT_FILE

    config = TrainConfig(epochs=1, batch_size=4, lr=1e-2, bf16=False, seed=0, checkpoint_every=100)

    def run():
        model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
        return train_joint(model, _data(), config, progress=False, out_dir=tmp_path)

    def broken_evaluation(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(joint, "evaluate_task", broken_evaluation)
        with pytest.raises(KeyboardInterrupt):
            run()
    assert (tmp_path / CHECKPOINT_FILE).exists()  # the finished training, though no step divides by 100

    trained = []
    monkeypatch.setattr(joint, "fault_point", lambda kind, at: trained.append(at))
    result = run()
    assert trained == [] and result.metrics and result.final_loss == result.final_loss  # no step again, loss kept
    assert not (tmp_path / CHECKPOINT_FILE).exists()


@pytest.mark.parametrize("run_bf16", [False, True])
def test_joint_training_computes_in_the_runs_precision_and_gives_the_model_its_settings_back(
        tokenizer, monkeypatch, run_bf16):
    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    model.bf16 = not run_bf16  # the model's own setting, unlike the run's
    dtypes = []
    model.backbone.embeddings.register_forward_hook(
        lambda module, args, out: dtypes.append(out.dtype) if torch.is_grad_enabled() else None)
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-2, bf16=run_bf16, backbone_dropout=True, seed=0)
    train_joint(model, _data(), config, progress=False)
    assert set(dtypes) == {torch.bfloat16 if run_bf16 else torch.float32}  # the frozen backbone ran as asked
    assert (model.bf16, model.backbone_dropout) == (not run_bf16, False)

    def interrupt(where, step):
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("mtpeft.joint.fault_point", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_joint(model, _data(), config, progress=False)
    assert (model.bf16, model.backbone_dropout) == (not run_bf16, False)  # also after an interrupted run


def test_a_task_without_training_examples_is_a_clear_error(tokenizer):
    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    data = {**_data(), "sim": ([], None)}
    with pytest.raises(ValueError, match="'sim': no training examples"):
        train_joint(model, data, TrainConfig(epochs=1, batch_size=4, bf16=False), progress=False)


def test_task_epochs_or_total_steps_that_would_change_the_run_silently_are_clear_errors(tokenizer):
    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    config = TrainConfig(epochs=1, batch_size=4, bf16=False)
    with pytest.raises(ValueError, match=r"not trained here: \['snt'\]"):  # a typo took config.epochs
        train_joint(model, _data(), config, task_epochs={"snt": 2}, progress=False)
    with pytest.raises(ValueError, match=r"task_epochs\['sim'\] must be > 0"):  # TrainConfig refuses epochs=0
        train_joint(model, _data(), config, task_epochs={"sent": 1, "sim": 0}, progress=False)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):  # trained nothing, reported metrics
        train_joint(model, _data(), config, total_steps=0, progress=False)


def test_joint_training_launched_on_several_processes_is_a_clear_error(tokenizer, monkeypatch):
    # Its loop takes no data-parallel share: every process would train the whole run and write it.
    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"train_joint runs in one process.*\(2 processes\).*mtpeft train"):
        train_joint(model, _data(), TrainConfig(epochs=1, batch_size=4, bf16=False), progress=False)


def test_a_warm_start_that_joint_training_would_ignore_is_a_clear_error(tokenizer, tmp_path):
    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    config = TrainConfig(epochs=1, batch_size=4, bf16=False, init_from=str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="init_from=.*train_joint trains its shared adapter from a fresh start"):
        train_joint(model, _data(), config, progress=False)


def test_joint_training_takes_the_models_bf16_setting_unless_the_config_names_one(tokenizer, monkeypatch):
    from mtpeft import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    config = TrainConfig(epochs=1, batch_size=4, max_train_examples=4, max_eval_examples=2)
    model.bf16 = False  # e.g. a QLoRA model with fp32 compute
    assert train_joint(model, _data(), config, progress=False).bf16 is False
    model.bf16 = None
    assert train_joint(model, _data(), config, progress=False).bf16 is True


def test_a_non_finite_loss_stops_the_joint_run_before_its_update(tokenizer, monkeypatch):
    from test_train import _infinite_loss_at_call

    model = build_joint_model(tiny_bert(tokenizer), [SENT, SIM], LoraSettings(r=4, alpha=8), seed=0)
    _infinite_loss_at_call(monkeypatch, 1)  # sent's first step
    with pytest.raises(ValueError, match=r"'sent': the loss is inf at step \d+; stopped before the update"):
        train_joint(model, _data(), TrainConfig(epochs=1, batch_size=4, bf16=False), progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.is_floating_point())
