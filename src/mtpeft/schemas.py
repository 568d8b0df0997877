"""Request and response models of the HTTP API.

Pydantic models rather than plain dicts so that malformed requests are answered with a
422 naming the field, and so that the OpenAPI schema (``/docs``) documents every shape.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr


def _unicode(value: str) -> str:
    """JSON may carry a lone surrogate (``"\\ud800"``), which is no text: no tokenizer or file name takes it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (it holds a lone surrogate)") from None
    return value


Text = Annotated[StrictStr, AfterValidator(_unicode)]  # every string a request carries


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextInput(_Strict):
    text: Text


class PairInput(_Strict):
    """Two texts for a pair task (also accepted as a two-string list ``["a", "b"]``)."""

    text: Text
    text_pair: Text


class QAInput(_Strict):
    question: Text
    context: Text


Pair = Annotated[list[Text], Field(min_length=2, max_length=2)]
InputItem = Text | QAInput | PairInput | TextInput | Pair


class PredictRequest(_Strict):
    """One ``input`` or a list of ``inputs``; ``task`` names the task for all of them, one per
    input (``null`` entries are routed), or is left out to let the router decide."""

    input: InputItem | None = None
    inputs: list[InputItem] | None = None
    task: Text | list[Text | None] | None = None

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"input": "My parcel arrived broken!", "task": "sentiment"},
        {"inputs": ["Thanks, great service", ["where is my order?", "has my parcel shipped?"],
                    {"question": "How long is the warranty?", "context": "Every product has a 2-year warranty."}]},
    ]})


class LabelOut(BaseModel):
    type: Literal["label"]
    task: str
    label: str
    score: float
    probabilities: dict[str, float]


class ScoreOut(BaseModel):
    type: Literal["score"]
    task: str
    score: float


class AnswerOut(BaseModel):
    type: Literal["answer"]
    task: str
    answer: str
    start: int
    end: int
    score: float


PredictionOut = Annotated[LabelOut | ScoreOut | AnswerOut, Field(discriminator="type")]


class Candidate(BaseModel):
    task: str
    probability: float


class RouteOut(BaseModel):
    """How the task was chosen: ``explicit`` (the request named it), ``router`` or ``shape`` (fallback rule)."""

    task: str | None
    confidence: float
    source: str
    reason: str = ""
    candidates: list[Candidate] = []


class PredictResult(BaseModel):
    """One input's result: a prediction, or ``error`` saying why there is none (e.g. no task matched)."""

    task: str | None
    prediction: PredictionOut | None = None
    route: RouteOut
    error: str | None = None


class PredictResponse(BaseModel):
    results: list[PredictResult]


class TaskInfo(BaseModel):
    name: str
    type: str
    input: Literal["text", "pair", "qa"]
    labels: list[str] | None
    description: str
    metrics: dict = Field(description="metrics recorded when the task was trained")


class RouterInfo(BaseModel):
    kind: Literal["learned", "shape"]
    threshold: float | None = None
    classes: list[str] = []


class TasksResponse(BaseModel):
    tasks: list[TaskInfo]
    router: RouterInfo
    support: bool


class SupportRequest(_Strict):
    message: Text = Field(min_length=1, description="the customer's message")
    # strict: JSON true is not a count (lax mode would read it as 1)
    top_k: int | None = Field(None, ge=1, le=20, strict=True, description="FAQ questions to retrieve and re-rank")


class SimilarOut(BaseModel):
    id: str
    question: str
    score: float = Field(description="the similarity task's score for (message, question)")
    retrieval_score: float = Field(description="the FAQ index's score, from bare-backbone embeddings: the mean of "
                                               "the message's cosine with the entry's question and context as one "
                                               "text and its cosine with the closest sentence of the context")


class SupportAnswerOut(BaseModel):
    text: str
    score: float
    start: int
    end: int
    no_answer: bool
    faq_id: str
    question: str
    context: str


class SupportResponse(BaseModel):
    message: str
    sentiment: LabelOut
    similar: list[SimilarOut]
    answer: SupportAnswerOut


class Health(BaseModel):
    status: Literal["ok"]
    tasks: int
    router: str
    support: bool


class ErrorOut(BaseModel):
    detail: str
    errors: list[dict] | None = Field(None, description="each field's error, for a malformed request body")


class TaskLoadRequest(_Strict):
    path: Text = Field(min_length=1, max_length=1024,
                            description="a task folder inside a bundle, or a bundle, relative to the server's admin root")
    task: Text | None = Field(None, max_length=64, description="which task of a bundle (default: its only one)")


class TaskReloadRequest(_Strict):
    path: Text | None = Field(None, min_length=1, max_length=1024,
                                   description="where the new version is, relative to the admin root "
                                               "(default: the admin root itself, a bundle holding the task)")


class AdminResult(BaseModel):
    action: Literal["loaded", "reloaded", "unloaded"]
    task: str
    source: str | None = Field(description="the folder read, relative to the admin root")
    tasks: list[str] = Field(description="the tasks loaded now")
    seconds: float
