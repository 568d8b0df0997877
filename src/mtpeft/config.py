"""Typed settings: the single source of truth for adapters and training runs.

Each run directory stores its resolved ``TrainConfig`` in ``training.json`` (``mtpeft.train.RUN_RECORD``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LoraSettings:
    """A task's LoRA adapter.

    Attributes:
        r: rank of the update.
        alpha: scale; the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapter's input during training.
        target_modules: names of the layers to adapt; ``None`` takes the architecture's
            default (query/value attention projections), ``["all-linear"]`` every linear
            layer of the encoder blocks.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora r must be >= 1, got {self.r}")
        if not self.alpha > 0:  # NaN too
            # 0 scales every update to nothing (the adapter never learns: a head-only run that
            # says LoRA); a negative alpha only flips the sign of what the adapter learns.
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """How one task is trained. Defaults are the recipe the README reports.

    Attributes:
        epochs: passes over the training data.
        batch_size: examples (QA: windows) per optimizer step.
        lr: learning rate of the adapter.
        head_lr: learning rate of the head (defaults to ``lr``).
        weight_decay: AdamW weight decay of the adapter's matrices; not applied to biases,
            norms (1-d tensors) or the head.
        warmup_ratio: fraction of steps with a linear warm-up, then linear decay to zero.
        max_grad_norm: gradient clipping; 0 disables it.
        seed: seeds initialisation and data order.
        bf16: bf16 compute; ``None`` takes the model's own setting (``MultiTaskModel.bf16``:
            by default bf16 where the hardware has it fast; a QLoRA model with another
            compute dtype says no).
        max_train_examples: train on a fixed random N of the training examples (``data.fixed_subset``;
            quick runs).
        max_eval_examples: evaluate on a fixed random N of the evaluation examples.
        eval_batch_size: batch size for evaluation and prediction.
        checkpoint_every: steps between checkpoints (0: only at epoch ends; -1: none).
        compile: run the backbone through ``torch.compile`` while training (``mtpeft.compiled``):
            faster steps after a compilation of about a minute; for long runs.
        pad_to_multiple_of: training batches are padded to their longest input rounded up to
            this. 1 (the longest input exactly) trains 1.16x faster on SST-2 than 8 on a CPU
            (``benchmarks/padding.py``); GPUs' tensor cores may prefer 8 (not measured here).
        backbone_dropout: keep the backbone's dropout layers on while training. ``None``: the
            model's own choice (``MultiTaskModel.backbone_dropout``: off for a frozen backbone,
            on for full fine-tuning).
        lora: the adapter; ``None`` trains the head alone on the frozen backbone.
        init_from: a saved task folder (``mtpeft train --out``) whose adapter, and head where it
            fits, the run starts from instead of a fresh initialisation (``mtpeft.warm_start``).
    """

    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 5e-4
    head_lr: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    eval_batch_size: int = 64
    checkpoint_every: int = 500
    compile: bool = False
    pad_to_multiple_of: int = 1
    backbone_dropout: bool | None = None
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        # Not `head_lr or lr` silently: 0 would train the head at lr, and AdamW takes a negative
        # group rate without a word (it checks its default rate only) and trains the head uphill.
        if self.head_lr is not None and not self.head_lr > 0:
            raise ValueError(f"head_lr must be > 0 (or None: the lr), got {self.head_lr}")
        # A negative clipping norm flips every gradient's sign, and a warm-up past the run's end
        # never reaches the learning rate: both train without an error, just wrongly.
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1] (a fraction of the steps), got {self.warmup_ratio}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.checkpoint_every < -1:  # -5 read as "none", which only -1 says
            raise ValueError(f"checkpoint_every must be >= 1 steps, 0 (epoch ends only) or -1 (none), "
                             f"got {self.checkpoint_every}")
        # None means all: 0 would read as "all" too, and a negative count would cut from the end.
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for all), got {value}")
        if self.init_from is not None:
            self.init_from = str(self.init_from)  # a Path from the Python API; training.json holds text
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
