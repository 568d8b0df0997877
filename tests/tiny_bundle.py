"""A tiny random model with the three customer-support skills, for serving tests.

Real adapters would take minutes to train; the serving code only needs the right task
shapes, with non-zero adapters so that mixing them up would show.
"""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_bert
from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.backbone import from_model
from mtpeft.faq import FaqEntry

SPECS = [
    TaskSpec(name="sentiment", type="classification", labels=["negative", "neutral", "positive"], max_length=32,
             description="Sentiment of a customer message."),
    TaskSpec(name="similar-questions", type="pair-classification", labels=["different", "duplicate"],
             text_column="question1", text_pair_column="question2", pair_encoding="bi", max_length=32),
    TaskSpec(name="faq-answer", type="extractive-qa", text_pair_column="context", max_length=64, doc_stride=16,
             max_question_length=16, max_answer_length=8),
]

FAQ = [
    FaqEntry("faq-1", "How do I return an item?", "You can return most items within 30 days of delivery for free."),
    FaqEntry("faq-2", "How long does a refund take?", "Refunds are issued within 3 business days of arrival."),
    FaqEntry("faq-3", "How much does shipping cost?", "Standard shipping is free on orders over $50."),
    FaqEntry("faq-4", "Can I change my delivery address?", "Change the address in the app before the order ships."),
]

QA = {"question": "when do you open?", "context": "We open at nine."}
# Router examples whose words a tiny random backbone can still tell apart (its embeddings are noise, words are not).
ROUTER_EXAMPLES = (
    [("sentiment", t) for t in ("I love it, great service", "awful, broken and late", "thanks, lovely",
                                "terrible support, I am angry", "happy with the sofa", "great great great")]
    + [("faq-answer", t) for t in ("what does the FAQ say about returns", "look up shipping in the FAQ",
                                   "FAQ answer about refunds", "search the help centre FAQ")]
    + [("similar-questions", t) for t in ("are these two questions duplicates", "same question or duplicate",
                                          "duplicate questions check")]
    + [(None, t) for t in ("weather in paris tomorrow", "tell me a joke", "capital of france weather")]
    + [("similar-questions", ("where is my order", "has my parcel shipped")), ("faq-answer", QA)])


def support_model(backbone) -> MultiTaskModel:
    """The three support skills on ``backbone``, with random non-zero adapters, in fp32."""
    model = MultiTaskModel(backbone)
    for spec in SPECS:
        model.add_task(spec)
    torch.manual_seed(5)
    for layer in model.lora_layers().values():
        for task in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B[task].weight, std=0.2)
    model.bf16 = False
    model.task_metrics["sentiment"] = {"accuracy": 0.5, "examples": 10}
    return model


def saved_backbone(folder: Path, tokenizer) -> Path:
    """A tiny backbone written to ``folder``, so bundles can name it by path (as the CLI loads them)."""
    tiny_bert(tokenizer).model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def path_backbone(folder: Path):
    from transformers import AutoModel, AutoTokenizer

    return from_model(AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), name=str(folder))


def support_app(tokenizer, folder: Path, api_key: str | None = None, **settings):
    """A server app with the three skills, a learned router, the support pipeline and task
    management (its bundle saved to ``folder``, the admin root): every endpoint has work to do."""
    from mtpeft.router import LearnedRouter
    from mtpeft.serve import ServeSettings, create_app
    from mtpeft.support import SupportPipeline

    model = support_model(tiny_bert(tokenizer))
    model.save(folder)
    return create_app(model, LearnedRouter.fit(model, ROUTER_EXAMPLES), SupportPipeline(model, FAQ, top_k=2),
                      ServeSettings(**settings), admin_root=folder, api_key=api_key)


def slowed(model, monkeypatch, seconds: float) -> None:
    """Make every ``model.run`` take ``seconds`` longer: a model thread that stays busy."""
    import time

    run = model.run

    def slow(items, batch_size=64):
        time.sleep(seconds)
        return run(items, batch_size=batch_size)

    monkeypatch.setattr(model, "run", slow)
