"""Every training method trains exactly its own parameters, counts them right, and saves them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from mtpeft.bottleneck import add_bottleneck_adapter, bottleneck_sites
from mtpeft.examples import Example
from mtpeft.methods import METHODS, MethodNotApplicable, get_method, weights_bytes
from mtpeft.model import MultiTaskModel
from mtpeft.tasks import TaskSpec
from mtpeft.train import train_task
from mtpeft.zero_shot import best_threshold, label_descriptions, zero_shot_scores

PAIR = TaskSpec(name="p", type="pair-classification", labels=["no", "yes"], text_pair_column="b")
HEAD = 32 * 2 + 2  # linear head of the tiny BERT (hidden 32) for two labels
# Trainable parameters of each method on the tiny BERT (2 layers, hidden 32, FFN 64) besides the head.
EXPECTED = {
    "head-only": 0,
    "tiny": 2 * 2 * 1 * (32 + 32),  # layers x {query, value} x r x (in + out)
    "lora-r2": 2 * 2 * 2 * (32 + 32),
    "lora-r8": 2 * 2 * 8 * (32 + 32),
    # query, key, value, attention output 32->32; FFN in 32->64 and out 64->32
    "lora-r8-all": 2 * 8 * (4 * (32 + 32) + 2 * (32 + 64)),
    "dora": 2 * 2 * 8 * (32 + 32) + 2 * 2 * 32,  # LoRA + one magnitude per output
    "vera": 2 * 2 * (256 + 32),  # lambda_d (r) + lambda_b (out) per layer
    "ia3": 2 * (32 + 32 + 32 + 64),  # keys, values, attention-output input, FFN-output input
    "prompt-tuning": 20 * 32,
    "prefix-tuning": 20 * 2 * 2 * 32,  # tokens x layers x (key, value) x hidden
    "houlsby": 2 * 2 * (32 * 2 + 2 + 2 * 32 + 32),  # 2 sites per layer, bottleneck 32 / 16 = 2
    "pfeiffer": 2 * 1 * (32 * 2 + 2 + 2 * 32 + 32),
}
TRAINED = [*EXPECTED, "full"]


def _pairs(n: int) -> list[Example]:
    return [Example(text=f"the order {i} came", text_pair=("great thing" if i % 2 else "awful thing"), label=i % 2)
            for i in range(n)]


def test_registry_names_and_errors():
    assert get_method("lora-r8").settings == {"r": 8, "alpha": 16.0, "targets": None}
    assert get_method("lora-r32-all").settings["targets"] == ["all-linear"]
    assert {"zero-shot", "head-only", "tiny", "full", "ia3", "prompt-tuning", "prefix-tuning", "dora", "vera",
            "houlsby", "pfeiffer", "joint-proportional", "joint-temperature"} <= set(METHODS)
    with pytest.raises(ValueError, match="unknown method 'lora-x'.*lora-r8"):
        get_method("lora-x")
    with pytest.raises(ValueError, match="unknown method"):
        get_method("lora-r0")
    with pytest.raises(ValueError, match="unknown method 'lora-r08'"):  # it ran as (and was named) lora-r8
        get_method("lora-r08")


def test_train_config_layers_preset_method_and_user_settings():
    preset = {"epochs": 4.0, "lr": 1e-3}
    full = get_method("full").train_config(preset)
    assert (full.lr, full.head_lr, full.epochs, full.lora) == (5e-5, 1e-3, 4.0, None)  # backbone 5e-5, head the task's
    lora = get_method("lora-r4").train_config(preset, {"epochs": 1.0, "lr": None})
    assert (lora.lr, lora.head_lr, lora.epochs, lora.lora.r, lora.lora.alpha) == (1e-3, None, 1.0, 4, 8.0)
    assert get_method("head-only").train_config(preset).head_lr == 3e-3


def test_a_method_with_its_own_lr_keeps_the_tasks_head_lr():
    # A task file's recipe may set the head's rate apart; vera/ia3/full set only the adapter's
    # (or backbone's) rate, and used to give the head the task's lr instead of its head_lr.
    preset = {"epochs": 4.0, "lr": 1e-3, "head_lr": 2e-3}
    for name in ("vera", "ia3", "full"):
        config = get_method(name).train_config(preset)
        assert config.lr == get_method(name).recipe["lr"] and config.head_lr == 2e-3, name
    assert get_method("head-only").train_config(preset).head_lr == 3e-3  # the method's own head rate wins


def test_a_presets_full_entry_applies_to_full_fine_tuning_only():
    preset = {"epochs": 2.0, "lr": 1e-3, "full": {"epochs": 1.0, "head_lr": 5e-4}}
    full = get_method("full").train_config(preset)
    assert (full.lr, full.head_lr, full.epochs) == (5e-5, 5e-4, 1.0)
    assert get_method("full").train_config(preset, {"epochs": 3.0}).epochs == 3.0  # the user's word is last
    for name in ("lora-r8", "tiny", "head-only", "ia3"):
        config = get_method(name).train_config(preset)
        assert config.epochs == 2.0 and config.head_lr != 5e-4


def test_a_presets_methods_entry_applies_to_the_named_method_only():
    from mtpeft.tasks.presets import get_preset

    preset = {"epochs": 4.0, "lr": 1e-3, "methods": {"tiny": {"lr": 3e-3}}}
    tiny = get_method("tiny").train_config(preset)
    assert (tiny.lr, tiny.head_lr, tiny.epochs) == (3e-3, None, 4.0)  # adapter and head at 3e-3
    assert get_method("tiny").train_config(preset, {"lr": 1e-4}).lr == 1e-4  # the user's word is last
    for name in ("lora-r8", "lora-r1", "full"):
        assert get_method(name).train_config(preset).lr in (1e-3, 5e-5)
    assert "methods" not in get_preset("stsb").adapter_recipe()  # mtpeft train: not a TrainConfig field
    assert get_method("tiny").train_config(get_preset("stsb").recipe).lr == 3e-3


def test_methods_compared_on_a_warm_started_task_start_fresh():
    # faq-answer trains from the packaged SQuAD adapter; a comparison of methods starts each from
    # its own initialisation (the adapter fits one rank only).
    from mtpeft.tasks.presets import get_preset

    recipe = get_preset("faq-answer").recipe
    assert recipe["init_from"] and get_preset("faq-answer").adapter_recipe()["init_from"] == recipe["init_from"]
    for name in ("lora-r8-all", "lora-r2", "full", "head-only"):
        assert get_method(name).train_config(recipe).init_from is None


def test_an_unknown_recipe_field_is_a_clear_error():
    # A task file's recipe with a typo ended in TrainConfig's TypeError traceback.
    with pytest.raises(ValueError, match="'epoch'"):
        get_method("lora-r8").train_config({"epoch": 2})
    with pytest.raises(ValueError, match="'lrate'"):
        get_method("full").train_config({"full": {"lrate": 1e-5}})
    with pytest.raises(ValueError, match="'lora'"):  # the method's settings set its adapter
        get_method("lora-r8").train_config({"methods": {"lora-r8": {"lora": {"r": 2}}}})


@pytest.mark.parametrize("name", TRAINED)
def test_method_trains_only_its_parameters(name, tokenizer, tmp_path):
    method = get_method(name)
    backbone = tiny_bert(tokenizer)
    backbone_count = sum(p.numel() for p in backbone.model.parameters())
    model = method.build(backbone, PAIR, seed=0)
    model.bf16 = False  # fp32 throughout: a backbone held in bf16 would read as "changed"
    trainable = model.task_parameters("p")
    count = sum(p.numel() for p in trainable.values())
    pooler_count = sum(p.numel() for p in backbone.model.pooler.parameters())  # no head uses it
    assert count == (backbone_count - pooler_count + HEAD if name == "full" else EXPECTED[name] + HEAD)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = method.train_config({}, {"epochs": 2, "batch_size": 8, "bf16": False, "lr": 1e-2, "head_lr": 1e-2})
    result = train_task(model, "p", _pairs(16), None, config, progress=False)
    assert result.trainable_parameters == count
    ids = {id(p) for p in trainable.values()}
    frozen_changed = [n for n, p in model.named_parameters() if id(p) not in ids and not torch.equal(p, before[n])]
    assert frozen_changed == []
    changed = {n for n, p in model.named_parameters() if id(p) in ids and not torch.equal(p, before[n])}
    assert any(n.startswith("heads.") for n in changed)
    # Every trainable parameter moves: one that gets no gradient would also stop DDP
    # (which refuses parameters that take no part in the loss).
    assert changed == {n for n, p in model.named_parameters() if id(p) in ids}
    folder = method.save(model, "p", tmp_path / name)
    assert weights_bytes(folder) >= 4 * count * (0 if name == "vera" else 1)  # fp32 weights on disk
    assert (folder / ("task.json" if method.kind in ("lora", "head-only") else "method.json")).is_file()


def test_tiny_is_over_2000x_smaller_than_minilm():
    from mtpeft.backbone import load_backbone

    backbone = load_backbone()  # the packaged all-MiniLM-L6-v2: 6 layers, hidden 384
    backbone_count = sum(p.numel() for p in backbone.model.parameters())
    assert backbone_count == 22_713_216
    model = get_method("tiny").build(backbone, TaskSpec(name="sst2", type="classification", labels=["n", "p"]))
    # 6 layers x {query, value} x r=1 x (384 + 384), plus a 384 x 2 + 2 head
    count = sum(p.numel() for p in model.task_parameters("sst2").values())
    assert count == 6 * 2 * (384 + 384) + 384 * 2 + 2 == 9_986
    assert backbone_count / count >= 2000


def test_prompt_methods_keep_positions_padding_and_segments(tokenizer):
    for name in ("prompt-tuning", "prefix-tuning"):
        model = get_method(name).build(tiny_bert(tokenizer), PAIR)
        model.bf16 = False
        peft = model.backbone.peft
        with torch.no_grad():
            peft.prompt_encoder.default.embedding.weight.normal_(std=1.0)
        short = tokenizer(["a b"], ["c"], return_tensors="pt")
        batch = tokenizer(["a b", "a much longer first text here"], ["c", "d e f"], return_tensors="pt", padding=True)
        with torch.no_grad():
            alone = model.encode(dict(short), "p")
            padded = model.encode(dict(batch), "p")
            bare = MultiTaskModel(tiny_bert(tokenizer)).encode(dict(short), None)
        assert padded.shape[:2] == batch["input_ids"].shape  # states line up with the input tokens
        torch.testing.assert_close(padded[0, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(alone, bare, atol=1e-3)  # the prompt/prefix does reach the states
        flipped = dict(short, token_type_ids=1 - short["token_type_ids"])
        with torch.no_grad():
            assert not torch.allclose(model.encode(flipped, "p"), alone)  # segment ids are not dropped


def _tiny_distilbert(tokenizer):
    from transformers import DistilBertConfig, DistilBertModel

    from mtpeft.backbone import from_model

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    return from_model(DistilBertModel(config), tokenizer, name="tiny-distilbert")


def test_peft_methods_build_on_distilbert(tokenizer, tmp_path):
    # peft has no IA3 default for DistilBERT's module names and reads prompt sizes from config keys
    # DistilBERT's lacks: both methods failed to build. A prefix never reaches its attention.
    from peft import PeftModel

    batch = dict(tokenizer(["a b", "c d e f"], ["x", "y z"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        bare = MultiTaskModel(_tiny_distilbert(tokenizer)).encode(batch, None)
    # IA3: keys and values (32 each) and the feed-forward output's input (64), per layer
    for name, count in (("ia3", 2 * (32 + 32 + 64)), ("prompt-tuning", 20 * 32)):
        method = get_method(name)
        model = method.build(_tiny_distilbert(tokenizer), PAIR)
        model.bf16 = False
        params = model.extra_parameters["p"]
        assert sum(p.numel() for p in params.values()) == count, name
        with torch.no_grad():
            for param in params.values():
                param.add_(torch.randn_like(param))
            ours = model.encode(batch, "p")
        assert not torch.allclose(ours, bare, atol=1e-3), name
        if name == "ia3":
            method.save(model, "p", tmp_path)
            peft_model = PeftModel.from_pretrained(_tiny_distilbert(tokenizer).model, tmp_path / "peft").eval()
            with torch.no_grad():
                torch.testing.assert_close(peft_model(**batch).last_hidden_state, ours, rtol=1e-5, atol=1e-5)
    with pytest.raises(MethodNotApplicable, match="distilbert's attention"):
        get_method("prefix-tuning").build(_tiny_distilbert(tokenizer), PAIR)


def test_peft_methods_refuse_a_max_length_their_backbone_has_no_positions_for(tokenizer):
    # A prompt's or prefix's 20 virtual tokens take positions before the text's, and the peft wrapper
    # hid RoBERTa's two reserved positions from the check: a long input failed deep in the backbone
    # ("The size of tensor a (532) must match the size of tensor b (512)", or an IndexError).
    from transformers import RobertaConfig, RobertaModel

    from mtpeft.backbone import from_model

    def spec(max_length):
        return TaskSpec(name="t", type="classification", labels=["a", "b"], max_length=max_length)

    for name in ("prompt-tuning", "prefix-tuning"):  # the tiny BERT has 512 positions
        with pytest.raises(ValueError, match="max_length <= 488"):  # inference pads to a multiple of 8
            get_method(name).build(tiny_bert(tokenizer), spec(492))
        model = get_method(name).build(tiny_bert(tokenizer), spec(488))
        model.bf16 = False
        assert len(model.predict(" ".join(["word"] * 600), task="t").probabilities) == 2
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="max_length <= 64"):
        get_method("ia3").build(from_model(RobertaModel(config), tokenizer, name="tiny-roberta"), spec(66))


def test_prompt_tuning_on_embeddings_narrower_than_the_hidden_states(tokenizer):
    # ELECTRA-small's embeddings are 128 wide, projected up to its 256 hidden size: the prompt was
    # made hidden-size wide, and concatenating it with the input embeddings failed.
    from transformers import ElectraConfig, ElectraModel

    from mtpeft.backbone import from_model

    config = ElectraConfig(vocab_size=tokenizer.vocab_size, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64)
    model = get_method("prompt-tuning").build(from_model(ElectraModel(config), tokenizer, name="tiny-electra"), PAIR)
    model.bf16 = False
    assert sum(p.numel() for p in model.extra_parameters["p"].values()) == 20 * 16
    assert len(model.predict([("a b", "c d e")] * 2, task="p")) == 2


def test_a_backbone_already_holding_a_methods_adapters_is_refused(tokenizer):
    # build adds a method's adapters to the backbone in place: a second method built on the same one
    # also ran the first's (trained) adapters, outside its own parameters and counts (houlsby then
    # pfeiffer, lora-r2-all then lora-r2), or failed on peft's layers ("LoRA supports nn.Linear and
    # Conv1D layers, not Linear").
    for first, second in (("houlsby", "pfeiffer"), ("lora-r2-all", "lora-r2"), ("ia3", "lora-r2"),
                          ("lora-r2", "head-only"), ("lora-r2", "dora")):
        backbone = tiny_bert(tokenizer)
        get_method(first).build(backbone, PAIR)
        with pytest.raises(ValueError, match="freshly loaded backbone"):
            get_method(second).build(backbone, PAIR)
    backbone = tiny_bert(tokenizer)
    get_method("prompt-tuning").build(backbone, PAIR)  # the prompt lives in peft's wrapper, not in the backbone
    get_method("lora-r2").build(backbone, PAIR)


def test_bottleneck_starts_as_the_base_model_and_routes_rows(tokenizer):
    backbone = tiny_bert(tokenizer)
    model = MultiTaskModel(backbone)
    model.bf16 = False
    batch = dict(tokenizer(["one two", "three four five", "six"], return_tensors="pt", padding=True))
    with torch.no_grad():
        base = model.encode(batch, None)
    assert len(bottleneck_sites(model.backbone, "bert", "houlsby")) == 4
    assert len(bottleneck_sites(model.backbone, "bert", "pfeiffer")) == 2
    for task, style in (("a", "houlsby"), ("b", "pfeiffer")):
        model.add_task(TaskSpec(name=task, type="classification", labels=["x", "y"]), head_only=True)
        model.extra_parameters[task] = add_bottleneck_adapter(model.backbone, "bert", task, style, reduction=8)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(batch, "a"), base)  # zero-initialised up-projection
        for params in model.extra_parameters.values():
            for param in params.values():
                param.normal_(std=0.5)
        single = {t: model.encode(batch, t) for t in ("a", "b")}
        mixed = model.encode(batch, ["b", "a", "b"])
    assert not torch.allclose(single["a"], base, atol=1e-3)
    for row, task in enumerate(["b", "a", "b"]):
        torch.testing.assert_close(mixed[row], single[task][row], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown bottleneck style"):
        bottleneck_sites(model.backbone, "bert", "parallel")
    with pytest.raises(ValueError, match="no bottleneck adapter sites known"):
        bottleneck_sites(model.backbone, "t5", "houlsby")


def test_a_removed_tasks_bottleneck_adapters_leave_the_backbone(tokenizer):
    # They stayed: a task added later under the same name ran its rows through the old adapters.
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.bf16 = False
    batch = dict(tokenizer(["one two", "three four five"], return_tensors="pt", padding=True))
    with torch.no_grad():
        base = model.encode(batch, None)
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]), head_only=True)
    model.extra_parameters["a"] = add_bottleneck_adapter(model.backbone, "bert", "a", "houlsby", reduction=8)
    with torch.no_grad():
        for param in model.extra_parameters["a"].values():
            param.normal_(std=0.5)
        assert not torch.allclose(model.encode(batch, "a"), base, atol=1e-3)
    model.remove_task("a")
    model.add_task(TaskSpec(name="a", type="classification", labels=["x", "y"]), head_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(batch, "a"), base)


def test_best_threshold_maximises_accuracy():
    cosines = torch.tensor([0.1, 0.2, 0.35, 0.6, 0.7, 0.9])
    assert best_threshold(cosines, [0, 0, 0, 1, 1, 1]) == pytest.approx(0.475)
    assert best_threshold(cosines, [1, 1, 1, 1, 1, 1]) < 0.1  # everything positive


def test_best_threshold_never_splits_tied_cosines():
    cosines, labels = torch.tensor([0.1, 0.5, 0.5, 0.5, 0.9]), [0, 0, 0, 1, 1]
    threshold = best_threshold(cosines, labels)
    correct = sum(int(c >= threshold) == y for c, y in zip(cosines.tolist(), labels))
    assert correct == 4  # the three 0.5 pairs share a side; 0.5 -> 0 gets 4 right, 0.5 -> 1 only 3


def test_best_threshold_separates_cosines_one_float_apart():
    # Their float64 midpoint rounds down to the lower float32 cosine, which then counted as positive.
    low = torch.tensor(0.5)
    cosines = torch.stack([low, torch.nextafter(low, torch.tensor(1.0))])
    threshold = best_threshold(cosines, [0, 1])
    assert (cosines >= threshold).long().tolist() == [0, 1]


def test_zero_shot_rules(tokenizer):
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.bf16 = False
    labels = {"neg": "an awful broken thing", "pos": "a great wonderful gift"}
    spec = TaskSpec(name="mood", type="classification", labels=["neg", "pos"], extra={"label_descriptions": labels})
    texts = [Example(text=labels["pos"], label=1), Example(text=labels["neg"], label=0)]
    metrics, details = zero_shot_scores(model, spec, texts)
    assert metrics["accuracy"] == 100.0  # each text is its label's own description
    assert details["rule"] == "nearest label-description embedding"

    sts = TaskSpec(name="sts", type="regression", text_pair_column="b", label_range=[0, 5])
    pairs = [Example(text="a b c", text_pair="a b c", label=5.0), Example(text="a b c", text_pair="x y", label=1.0),
             Example(text="d e", text_pair="d e f", label=3.0)]
    metrics, _ = zero_shot_scores(model, sts, pairs)
    assert metrics["spearman"] == pytest.approx(100.0)  # identical texts: cosine 1, the top score

    mrpc = TaskSpec(name="para", type="pair-classification", labels=["no", "yes"], text_pair_column="b")
    para = [Example(text=f"w{i} same", text_pair=f"w{i} same" if i % 2 else f"other {i} words here", label=i % 2)
            for i in range(10)]
    metrics, details = zero_shot_scores(model, mrpc, para, train_examples=para)
    assert metrics["accuracy"] == 100.0 and "uses their labels" in details["threshold_fit_on"]

    with pytest.raises(MethodNotApplicable, match="extractive QA"):
        zero_shot_scores(model, TaskSpec(name="qa", type="extractive-qa", text_pair_column="c", max_length=384), [])
    with pytest.raises(MethodNotApplicable, match="label_descriptions"):
        label_descriptions(TaskSpec(name="topic", type="classification", labels=["a", "b"]))
    assert label_descriptions(TaskSpec(name="sst2", type="classification", labels=["negative", "positive"]))


def test_zero_shot_threshold_is_fit_on_pairs_from_across_a_label_sorted_training_set(tokenizer, monkeypatch):
    # Only the first 4000 pairs were used: a file sorted by label gave a threshold fit on one label alone.
    import mtpeft.zero_shot as zero_shot

    seen = []
    fit = zero_shot.best_threshold
    monkeypatch.setattr(zero_shot, "best_threshold", lambda cosines, labels: seen.extend(labels) or fit(cosines, labels))
    monkeypatch.setattr(zero_shot, "THRESHOLD_FIT_EXAMPLES", 4)
    model = MultiTaskModel(tiny_bert(tokenizer))
    model.bf16 = False
    spec = TaskSpec(name="para", type="pair-classification", labels=["no", "yes"], text_pair_column="b")
    train = sorted((Example(text=f"w{i}", text_pair=f"w{i}" if i % 2 else f"v{i}", label=i % 2) for i in range(10)),
                   key=lambda ex: ex.label)
    _, details = zero_shot_scores(model, spec, train[:2], train_examples=train)
    assert sorted(seen) == [0, 0, 1, 1]
    assert details["threshold_fit_on"] == "4 of 10 training pairs, taken evenly across them (uses their labels)"


@pytest.mark.parametrize("name", TRAINED)
def test_method_predicts_with_a_bf16_held_backbone(name, tokenizer):
    model = get_method(name).build(tiny_bert(tokenizer), PAIR)
    model.bf16 = True  # inference holds a frozen backbone's weights in bf16; peft buffers stay fp32
    predictions = model.predict([("a b", "c d e")] * 9, task="p")  # 9 rows: the merged single-task path too
    assert len(predictions) == 9 and all(0 <= p.score <= 1 for p in predictions)
