"""Metrics against hand-computed values."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mtpeft.metrics import classification_metrics, normalize_answer, regression_metrics, squad_metrics


def test_normalize_answer_follows_squad_rules():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theory") == "theory"  # 'the' only as a whole word


def test_squad_em_and_f1_by_hand():
    references = {"q1": ["Denver Broncos", "The Denver Broncos"], "q2": ["1,000 years"], "q3": ["blue"]}
    predictions = {"q1": "the Denver Broncos.", "q2": "about 1,000 years ago"}  # q3 unanswered
    scores = squad_metrics(predictions, references)
    # q1: exact after normalisation. q2: pred tokens {about, 1000, years, ago}, gold {1000, years}:
    # precision 2/4, recall 2/2 -> F1 = 2/3. q3: missing -> 0.
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


def test_squad_takes_the_best_gold_answer():
    scores = squad_metrics({"q": "in 1990"}, {"q": ["1991", "1990"]})
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(100 * 2 * (1 / 2 * 1) / (1 / 2 + 1))


def test_classification_binary_and_macro_f1():
    binary = classification_metrics([1, 1, 0, 0], [1, 0, 0, 0], num_labels=2)
    assert binary["accuracy"] == 75.0
    assert binary["f1"] == pytest.approx(100 * 2 / 3)  # class 1: precision 1/2, recall 1
    macro = classification_metrics([0, 1, 2, 2], [0, 1, 2, 1], num_labels=3)
    # per class F1: 1.0, 2/3, 2/3 -> mean 7/9
    assert macro["f1"] == pytest.approx(100 * 7 / 9)


def test_regression_correlations():
    scores = regression_metrics([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 9.0])
    assert scores["spearman"] == pytest.approx(100.0)
    assert 95 < scores["pearson"] < 100
    assert regression_metrics([1.0, 1.0], [0.0, 1.0])["pearson"] == 0.0  # constant predictions


def test_equal_gold_scores_are_reported_not_just_scored_zero(caplog):
    """A held-out split whose scores are all equal cannot measure a correlation: say so."""
    with caplog.at_level("WARNING", logger="mtpeft.metrics"):
        assert regression_metrics([0.2, 0.4, 0.3], [0.5, 0.5, 0.5])["spearman"] == 0.0
        regression_metrics([1.0, 1.0], [0.0, 1.0])  # constant predictions: a fair 0, no warning
    assert [r.getMessage() for r in caplog.records] == [
        "the 3 evaluation scores are all 0.5: their correlation with any prediction is undefined (reported as 0); "
        "evaluate on rows with varied scores"]


def test_qa_score_counts_every_example_even_with_repeated_or_missing_ids():
    """Examples sharing an id (or an id equal to another row's position) are still scored one by one."""
    from mtpeft.examples import Example
    from mtpeft.predictions import AnswerPrediction
    from mtpeft.tasks import TaskSpec, task_type

    spec = TaskSpec(name="qa", type="extractive-qa", text_pair_column="context", doc_stride=32)
    examples = [Example("Who?", "Alice met Bob.", answers=[{"text": "Bob", "answer_start": 10}], id="q1"),
                Example("Who?", "Carol met Dan.", answers=[{"text": "Dan", "answer_start": 10}], id="q1"),
                Example("Who?", "Eve met Fay.", answers=[{"text": "Fay", "answer_start": 8}], id="3"),
                Example("Who?", "Gil met Hal.", answers=[{"text": "Hal", "answer_start": 8}])]  # no id: position 3
    predictions = [AnswerPrediction("qa", a, 0, 0, 1.0) for a in ("Bob", "met", "Fay", "met")]
    scores = task_type(spec).score(spec, predictions, examples)
    assert scores["exact_match"] == pytest.approx(50.0)


def test_squad_v2_scores_unanswerable_questions_and_each_part():
    gold = {"a": ["Bob"], "b": [], "c": [], "d": ["the red car"]}
    predictions = {"a": "Bob", "b": "", "c": "Alice", "d": "red"}
    scores = squad_metrics(predictions, gold, allow_no_answer=True)
    assert scores["exact_match"] == pytest.approx(50.0) and scores["f1"] == pytest.approx(100 * (1 + 1 + 0 + 2 / 3) / 4)
    assert scores["has_answer_exact_match"] == pytest.approx(50.0) and scores["has_answer_examples"] == 2
    assert scores["no_answer_exact_match"] == pytest.approx(50.0) and scores["no_answer_f1"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="has no gold answer"):
        squad_metrics(predictions, gold)  # SQuAD v1.1: every question has an answer


def test_an_unanswerable_qa_example_trains_the_no_answer_position_and_may_be_answered_so(tokenizer):
    from mtpeft.examples import Example
    from mtpeft.tasks import TaskSpec, task_type

    spec = TaskSpec(name="qa", type="extractive-qa", text_pair_column="context", doc_stride=32, allow_no_answer=True)
    kind = task_type(spec)
    examples = [Example("Who?", "Alice met Bob.", answers=[{"text": "Bob", "answer_start": 10}]),
                Example("Who called?", "Alice met Bob.", answers=[])]
    features = kind.encode(spec, tokenizer, examples)
    assert (features[0]["start_position"], features[1]["start_position"], features[1]["end_position"]) != (0, 0, 0)
    assert (features[1]["start_position"], features[1]["end_position"]) == (0, 0)
    length = max(len(f["input_ids"]) for f in features)
    logits = torch.zeros(2, length, 2)
    bob = [f["offsets"].index((10, 13)) for f in features]  # "Bob", after questions of different lengths
    logits[0, bob[0]] = 5.0  # a confident span on the first; "no answer" (token 0) wins on the second
    logits[1, 0] = 5.0
    logits[1, bob[1]] = 2.0
    predictions = kind.predict(spec, kind.summarize(spec, logits, features), features, examples)
    assert predictions[0].answer == "Bob"
    assert predictions[1].answer == "" and predictions[1].score > 0.9  # the probability of "no answer"
    v1 = dataclasses.replace(spec, allow_no_answer=False)
    assert kind.predict(v1, kind.summarize(v1, logits, features), features, examples)[1].answer == "Bob"
    assert kind.score(spec, predictions, examples)["exact_match"] == pytest.approx(100.0)


def test_a_question_without_a_prediction_scores_zero_whatever_its_gold():
    """A missing prediction was scored as "", which matched a gold answer that normalises to "" ("The")
    and, with ``allow_no_answer``, every unanswerable question."""
    assert squad_metrics({}, {"q": ["The", "a pear"]}) == {"exact_match": 0.0, "f1": 0.0}
    assert squad_metrics({"q": "an"}, {"q": ["The"]})["exact_match"] == 100.0  # a prediction "" still matches
    scores = squad_metrics({"a": "Bob"}, {"a": ["Bob"], "b": []}, allow_no_answer=True)
    assert scores["exact_match"] == 50.0 and scores["no_answer_exact_match"] == 0.0


def test_regression_without_examples_says_so():
    with pytest.raises(ValueError, match="no labelled scores"):
        regression_metrics([], [])
