"""Prediction objects turn into the JSON the API returns."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from mtpeft.predictions import AnswerPrediction, LabelPrediction, ScorePrediction


@pytest.mark.parametrize("prediction, kind", [
    (LabelPrediction("sentiment", "positive", 0.9, {"negative": 0.1, "positive": 0.9}), "label"),
    (ScorePrediction("similarity", 4.2), "score"),
    (AnswerPrediction("faq-answer", "nine", 10, 14, 0.7), "answer"),
])
def test_to_dict_has_every_field_and_its_type(prediction, kind):
    out = prediction.to_dict()
    assert out == {"type": kind, **asdict(prediction)}  # a field added later must show up here too
    json.dumps(out)


def test_to_dict_copies_the_probabilities():
    prediction = LabelPrediction("sentiment", "positive", 0.9, {"negative": 0.1, "positive": 0.9})
    prediction.to_dict()["probabilities"]["positive"] = 0.0
    assert prediction.probabilities["positive"] == 0.9
