"""The customer-support pipeline and the FAQ it reads."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import BertConfig, BertModel

from conftest import tiny_bert
from mtpeft import MultiTaskModel, TaskSpec
from mtpeft.backbone import from_model
from mtpeft.data import DataError
from mtpeft.faq import FaqEntry, FaqIndex, faq_entries, load_faq, packaged_faq_path, sentences
from mtpeft.predictions import LabelPrediction, ScorePrediction
from mtpeft.support import SupportPipeline, answer, match_score
from tiny_bundle import FAQ, support_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return support_model(tiny_bert(tokenizer))


@pytest.fixture(scope="module")
def pipeline(model):
    return SupportPipeline(model, FAQ, top_k=3)


def test_faq_reads_jsonl_csv_and_answer_column(tmp_path):
    assert len(load_faq(packaged_faq_path())) == 40
    (tmp_path / "faq.csv").write_text('question,answer\n"Do you ship abroad?","Yes, to 30 countries."\n')
    entry = load_faq(tmp_path / "faq.csv")[0]
    assert (entry.id, entry.question, entry.context) == ("faq-1", "Do you ship abroad?", "Yes, to 30 countries.")


def test_faq_csv_rows_of_empty_cells_are_skipped_as_blank_lines(tmp_path):
    # A spreadsheet export ends with ",," rows; they failed the load instead of being skipped like blank lines.
    (tmp_path / "faq.csv").write_text('question,answer\n"Do you ship abroad?","Yes."\n,\n\n"Returns?","30 days."\n,\n,\n')
    assert [(e.id, e.question) for e in load_faq(tmp_path / "faq.csv")] == [("faq-1", "Do you ship abroad?"),
                                                                            ("faq-2", "Returns?")]


@pytest.mark.parametrize("content, message", [
    ('{"question": "q"}\n', r"faq.jsonl:1: field 'context': missing; an FAQ row needs 'context' or 'answer'; the row has \['question'\]"),
    ('{"question": "q", "context": "  "}\n', r"faq.jsonl:1: field 'context': expected non-empty text"),
    ('{"question": "\\u200b", "context": "c"}\n', r"faq.jsonl:1: field 'question': expected non-empty text"),
    ('{"id": "a", "question": "q", "context": "c"}\n{"id": "a", "question": "r", "context": "d"}\n', "duplicate FAQ id 'a'"),
    ("\n", "no FAQ entries"),
    # A JSON escape of half a surrogate pair loaded, then failed in the tokenizer with a bare TypeError.
    ('{"question": "Where is it\\ud83d?", "context": "c"}\n', r"faq.jsonl:1: field 'question': not valid Unicode"),
    ('{"question": "q", "answer": "\\udc00"}\n', r"faq.jsonl:1: field 'answer': not valid Unicode"),
])
def test_faq_errors_name_file_line_and_field(tmp_path, content, message):
    (tmp_path / "faq.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        load_faq(tmp_path / "faq.jsonl")


def test_faq_rows_may_be_dicts(model):
    rows = [{"question": "Do you ship abroad?", "answer": "Yes, to 30 countries."}, {"question": "q2", "context": "c2"}]
    pipeline = SupportPipeline(model, rows, top_k=1)
    assert [e.id for e in pipeline.entries] == ["faq-1", "faq-2"]
    with pytest.raises(DataError, match=r"FAQ row 1: field 'context': missing"):
        SupportPipeline(model, [rows[0], {"question": "no context"}])


def test_index_finds_the_same_entry_first(model):
    index = FaqIndex.build(model, FAQ)
    query = index.vectors[2]
    hits = index.search(query, 2)
    assert hits[0][0].id == "faq-3" and len(hits) == 2
    assert hits[0][1] == pytest.approx(float(index.scores(query)[2])) and hits[0][1] >= hits[1][1]
    assert len(index.search(query, 99)) == len(FAQ)


def test_reply_has_sentiment_reranked_questions_and_answer(pipeline):
    reply = pipeline.answer("How do I return an item?")
    assert reply.sentiment.task == "sentiment" and reply.sentiment.label in ("negative", "neutral", "positive")
    assert len(reply.similar) == 3
    assert [s.score for s in reply.similar] == sorted((s.score for s in reply.similar), reverse=True)
    best = next(e for e in FAQ if e.id == max(reply.similar, key=lambda s: s.retrieval_score).id)
    a = reply.answer
    assert a.faq_id == best.id and a.context == best.context and best.context[a.start:a.end] == a.text
    data = json.loads(json.dumps(reply.to_dict()))
    assert set(data) == {"message", "sentiment", "similar", "answer"}
    assert set(data["answer"]) == {"text", "score", "start", "end", "no_answer", "faq_id", "question", "context"}


def test_sentiment_and_similarity_share_one_mixed_run_and_qa_follows(pipeline, model):
    calls = []

    def run(items):
        calls.append([task for task, _ in items])
        return model.run(items)

    pipeline.answer("refund please", run=run)
    assert calls == [["sentiment"] + ["similar-questions"] * 3, ["faq-answer"]]


def test_similarity_scores_rerank_the_retrieved_questions(pipeline, model):
    def run(items):  # the similarity task prefers the last retrieved question
        if items[0][0] == "faq-answer":
            return model.run(items)
        pairs = items[1:]
        return [model.run(items[:1])[0]] + [
            LabelPrediction("similar-questions", "duplicate", 0.0, {"different": 1 - p, "duplicate": p})
            for p in [i / len(pairs) for i in range(len(pairs))]]

    reply = pipeline.answer("How do I return an item?", run=run)
    retrieval_order = sorted(reply.similar, key=lambda s: -s.retrieval_score)
    assert [s.id for s in reply.similar] == [s.id for s in reversed(retrieval_order)]
    assert reply.answer.faq_id == retrieval_order[0].id  # the answer's entry is retrieval's first


def test_no_answer_below_threshold(model):
    reply = SupportPipeline(model, FAQ, answer_threshold=1.0).answer("shipping cost?")
    assert reply.answer.no_answer
    assert not SupportPipeline(model, FAQ, answer_threshold=0.0).answer("shipping cost?").answer.no_answer


def test_wrong_task_kinds_list_the_tasks_that_fit(model):
    with pytest.raises(ValueError, match=r"similarity task 'sentiment' is a classification task.*fit: \['similar-questions'\]"):
        SupportPipeline(model, FAQ, similarity_task="sentiment")
    with pytest.raises(KeyError, match="needs a QA task named .nope., which this model does not hold"):
        SupportPipeline(model, FAQ, qa_task="nope")
    with pytest.raises(ValueError, match="message is empty"):
        SupportPipeline(model, FAQ).answer("  ")
    with pytest.raises(ValueError, match="message is empty"):
        SupportPipeline(model, FAQ).answer("\u200b\ufeff")


def test_a_message_that_is_no_valid_unicode_is_a_clear_error(pipeline):
    # A lone surrogate (non-UTF-8 bytes on the command line, a JSON escape) failed in the tokenizer with a TypeError.
    with pytest.raises(ValueError, match="message is not valid Unicode text"):
        pipeline.answer("refund \udcff")


def test_match_score_for_labels_and_regression():
    pair = TaskSpec(name="p", type="pair-classification", labels=["no", "yes"], text_pair_column="b")
    assert match_score(LabelPrediction("p", "yes", 0.8, {"no": 0.2, "yes": 0.8}), pair) == 0.8
    sts = TaskSpec(name="s", type="regression", text_pair_column="b", label_range=[0, 5])
    assert match_score(ScorePrediction("s", 4.0), sts) == pytest.approx(0.8)
    assert match_score(ScorePrediction("s", 7.0), sts) == 1.0


def test_one_call_answer_builds_the_index_once(model, tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text("".join(json.dumps({"id": e.id, "question": e.question, "context": e.context}) + "\n" for e in FAQ))
    first = answer(model, "refund time?", faq=path, top_k=2)
    second = answer(model, "refund time?", faq=path, top_k=2)
    assert len(first.similar) == 2 and first.to_dict() == second.to_dict()
    from mtpeft.support import _pipelines
    assert len(_pipelines(model)) == 1


def test_one_call_answer_takes_top_k_per_call_without_building_another_index(model, tmp_path):
    # top_k was part of the cache key: each new value embedded the whole FAQ again and kept one more index alive.
    from mtpeft.support import _pipelines

    path = tmp_path / "faq.jsonl"
    _write_faq(path, FAQ)
    before = len(_pipelines(model))
    assert [len(answer(model, "refund time?", faq=path, top_k=k).similar) for k in (1, 2, 3, 1)] == [1, 2, 3, 1]
    assert len(_pipelines(model)) == before + 1
    assert len(answer(model, "refund time?", faq=path).similar) == 4  # the pipeline's default of 5, FAQ of 4
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        answer(model, "refund time?", faq=path, top_k=0)


def test_faq_id_zero_is_kept_and_missing_ids_are_numbered():
    entries = faq_entries([{"id": 0, "question": "a?", "context": "A."}, {"question": "b?", "context": "B."},
                           {"id": "", "question": "c?", "context": "C."}])
    assert [e.id for e in entries] == ["0", "faq-2", "faq-3"]


def test_one_call_answer_does_not_keep_the_model_alive(tokenizer):
    import gc
    import weakref

    model = support_model(tiny_bert(tokenizer))
    answer(model, "refund time?", top_k=2)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_numbered_ids_never_clash_with_ids_given_by_other_rows():
    entries = faq_entries([{"question": "a?", "context": "A."}, {"id": "faq-1", "question": "b?", "context": "B."},
                           {"id": "faq-4", "question": "c?", "context": "C."}, {"question": "d?", "context": "D."}])
    ids = [e.id for e in entries]
    assert ids[1:3] == ["faq-1", "faq-4"] and len(set(ids)) == 4
    with pytest.raises(DataError, match="duplicate FAQ id 'x'"):
        faq_entries([{"id": "x", "question": "a?", "context": "A."}, {"id": "x", "question": "b?", "context": "B."}])


def test_equal_scores_rank_in_faq_order_whatever_k():
    import torch

    from mtpeft.faq import FaqEntry

    entries = [FaqEntry(f"e{i}", f"q{i}?", "c.") for i in range(40)]
    vectors = torch.zeros(40, 2)
    vectors[:, 1] = 1.0
    vectors[[0, 1, 39]] = torch.tensor([1.0, 0.0])  # three entries tie for first
    index = FaqIndex(entries, vectors)
    query = torch.tensor([1.0, 0.0])
    assert [e.id for e, _ in index.search(query, 3)] == ["e0", "e1", "e39"]
    assert [e.id for e, _ in index.search(query, 1)] == ["e0"]


def test_faq_contexts_are_cut_into_sentences():
    assert sentences("Refunds take 3 days. Banks need 5 more!  Why?\nCall us") == [
        "Refunds take 3 days.", "Banks need 5 more!", "Why?", "Call us"]
    assert sentences("Costs $5.99 per item.") == ["Costs $5.99 per item."]  # no cut inside a number


def test_an_entry_scores_the_mean_of_its_whole_text_and_its_closest_sentence():
    import torch

    entries = [FaqEntry("a", "a?", "x."), FaqEntry("b", "b?", "y."), FaqEntry("c", "c?", "z.")]
    query = torch.tensor([1.0, 0.0])
    whole = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])  # cosines 0.8, 0.6, 0.0
    # a's sentences stay far from the query; one of b's names exactly what it asks; c has none
    sentence_vectors = torch.tensor([[0.0, 1.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    index = FaqIndex(entries, whole, sentence_vectors, torch.tensor([0, 0, 1, 1]))
    assert torch.allclose(index.scores(query), torch.tensor([(0.8 + 0.6) / 2, (0.6 + 1.0) / 2, 0.0]))
    assert [e.id for e, _ in index.search(query, 3)] == ["b", "a", "c"]
    assert [e.id for e, _ in FaqIndex(entries, whole).search(query, 3)] == ["a", "b", "c"]  # whole texts alone
    with pytest.raises(ValueError, match="one entry index per sentence"):
        FaqIndex(entries, whole, sentence_vectors, torch.tensor([0, 1]))


def test_the_index_embeds_each_context_sentence_for_its_entry(model):
    entries = faq_entries(FAQ)
    index = FaqIndex.build(model, entries)
    owners = [i for i, e in enumerate(entries) for _ in sentences(e.context)]
    assert index.sentence_entries.tolist() == owners
    assert index.sentence_vectors.shape == (len(owners), index.vectors.shape[1])
    assert FaqIndex.build(model, entries, with_context=False).sentence_vectors is None


def test_a_model_without_a_support_skill_says_which_one_is_missing(tokenizer):
    from mtpeft.tasks.spec import UnknownTaskError

    model = MultiTaskModel(tiny_bert(tokenizer))
    model.add_task(TaskSpec(name="sentiment", type="classification", labels=["neg", "pos"]))
    with pytest.raises(UnknownTaskError, match=r"needs a similarity task named 'similar-questions', which this model "
                                               r"does not hold \(its tasks: \['sentiment'\]\).*similarity_task="):
        SupportPipeline(model)


@pytest.mark.parametrize("top_k", [0, -1])
def test_answer_refuses_a_top_k_below_one(pipeline, top_k):
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        pipeline.answer("how long does a refund take?", top_k=top_k)


def test_an_empty_faq_path_is_an_error_not_the_demo_faq(model):
    with pytest.raises(FileNotFoundError, match="the FAQ path is empty"):
        SupportPipeline(model, "")
    with pytest.raises(FileNotFoundError):
        answer(model, "refund time?", faq="")


def test_a_malformed_json_faq_names_its_file_and_line(tmp_path):
    path = tmp_path / "faq.json"
    path.write_text('[{"question": "a?", "context": "A."},\n{"question": "b?" "context": "B."}]')
    with pytest.raises(DataError, match=r"faq.json:2: invalid JSON: Expecting ',' delimiter"):
        load_faq(path)


@pytest.mark.parametrize("content, message", [
    ('question,context\n"a?","A.\nb?,B.\nc?,C.\n', r"faq.csv:2: a quoted field opened on this line is never closed"),
    ('question,context\na?,A.\nb?,"B."x\n', r"faq.csv:3: malformed CSV: ',' expected after '\"'"),
])
def test_a_csv_quote_left_open_names_its_line_instead_of_swallowing_the_rest(tmp_path, content, message):
    # The unclosed quote took every later line into one context: the FAQ loaded with entries missing.
    path = tmp_path / "faq.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_faq(path)


@pytest.mark.parametrize("threshold", [30, 1.01, -0.1, float("nan")])
def test_an_answer_threshold_that_is_no_probability_is_refused(model, threshold):
    # 30 (meant as 30 %) marked every reply "no answer"; NaN answered every one, however unsure.
    with pytest.raises(ValueError, match="answer_threshold must be a probability in"):
        SupportPipeline(model, FAQ, answer_threshold=threshold)


@pytest.mark.parametrize("top_k", [2.0, "3"])
def test_a_top_k_that_is_no_whole_number_is_a_clear_error(model, pipeline, top_k):
    # 2.0 passed the ">= 1" check and failed in the index search with "slice indices must be integers".
    with pytest.raises(ValueError, match="top_k must be >= 1 \\(a whole number\\)"):
        SupportPipeline(model, FAQ, top_k=top_k)
    with pytest.raises(ValueError, match="top_k must be >= 1 \\(a whole number\\)"):
        pipeline.answer("how long does a refund take?", top_k=top_k)


def _write_faq(path, entries):
    path.write_text("".join(json.dumps({"id": e.id, "question": e.question, "context": e.context}) + "\n"
                            for e in entries))


def test_an_edited_faq_file_is_read_again_without_a_restart(model, tmp_path):
    path = tmp_path / "faq.jsonl"
    _write_faq(path, FAQ[:2])
    assert {s.id for s in answer(model, "refund time?", faq=path, top_k=5).similar} == {"faq-1", "faq-2"}
    _write_faq(path, FAQ)
    os.utime(path, ns=(1, 1))  # a stamp that differs even where the clock's step is coarse
    assert {s.id for s in answer(model, "refund time?", faq=path, top_k=5).similar} == {e.id for e in FAQ}


def test_a_faq_edit_that_does_not_load_keeps_the_last_good_one(model, tmp_path, caplog):
    path = tmp_path / "faq.jsonl"
    _write_faq(path, FAQ)
    pipeline = SupportPipeline(model, path, top_k=5)
    path.write_text('{"question": "no context"}\n')
    with caplog.at_level("WARNING", logger="mtpeft.support"):
        reply = pipeline.answer("refund time?")
        assert not pipeline.refresh()  # reported once, not again on every call
    assert len(reply.similar) == len(FAQ)
    assert [r.getMessage() for r in caplog.records if "does not load" in r.getMessage()] == [
        f"FAQ {path} changed but does not load, still answering from the last good one: "
        f"{path}:1: field 'context': missing; an FAQ row needs 'context' or 'answer'; the row has ['question']"]
    _write_faq(path, FAQ[:1])
    os.utime(path, ns=(2, 2))
    assert pipeline.refresh() and [e.id for e in pipeline.entries] == ["faq-1"]


def test_a_failed_faq_rebuild_keeps_answering_and_is_tried_again_later(model, tmp_path, monkeypatch, caplog):
    """A re-index that times out on the model thread must not turn every support request into an error."""
    import mtpeft.support as support

    path = tmp_path / "faq.jsonl"
    _write_faq(path, FAQ)
    pipeline = SupportPipeline(model, path, top_k=5)
    _write_faq(path, FAQ[:3])
    os.utime(path, ns=(3, 3))
    calls = []

    def timing_out(texts, **options):
        calls.append(len(texts))
        raise TimeoutError("the model thread did not answer")

    with caplog.at_level("WARNING", logger="mtpeft.support"):
        reply = pipeline.answer("refund time?", embed=lambda texts, **options: (
            timing_out(texts) if len(texts) > 1 else support.embed_texts(model, texts, **options)))
    assert len(reply.similar) == 4 and calls == [3]  # answered from the last good FAQ
    assert "could not be re-indexed (TimeoutError: the model thread did not answer)" in caplog.text
    assert not pipeline.refresh(timing_out) and calls == [3]  # not again right away
    monkeypatch.setattr(pipeline, "_retry_at", 0.0)  # the minute has passed
    assert pipeline.refresh() and len(pipeline.entries) == 3


@pytest.mark.parametrize("content, message", [
    ('{"data": [{"question": "a?", "context": "A."}]}', r" \(article 1 ''\): expected a SQuAD file .*; found no 'paragraphs'"),
    ('{"data": [{"paragraphs": [{"context": "A.", "qas": [{"id": "1"}]}]}]}',
     r" \(article 1 '', question 1\): field 'question': missing"),
    ('{"data": 5}', ": expected a SQuAD file .*; found 'data' is int, not a list"),
])
def test_a_json_faq_that_is_no_list_nor_squad_names_its_file(tmp_path, content, message):
    # A {"data": [...]} export was read as SQuAD and failed with a bare KeyError: 'paragraphs'.
    path = tmp_path / "faq.json"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"faq.json{message}"):
        load_faq(path)


@pytest.mark.parametrize("content", ['{"data": [{"question": "a?", "context": "A."}]}', "[" * 100_000])
def test_a_faq_edit_that_fails_in_any_way_keeps_the_last_good_one(model, tmp_path, caplog, content):
    # A KeyError (a {"data": ...} JSON) or RecursionError (JSON nested too deep) escaped: every reply failed.
    path = tmp_path / "faq.json"
    path.write_text(json.dumps([{"id": e.id, "question": e.question, "context": e.context} for e in FAQ]))
    pipeline = SupportPipeline(model, path, top_k=5)
    path.write_text(content)
    os.utime(path, ns=(4, 4))
    with caplog.at_level("WARNING", logger="mtpeft.support"):
        assert len(pipeline.answer("refund time?").similar) == len(FAQ)
    assert "changed but does not load" in caplog.text


def test_a_faq_replaced_by_one_of_the_same_size_and_mtime_is_read_again(model, tmp_path):
    # cp -p / rsync -t keep the mtime: a same-size edit (a typo fixed) was never re-read.
    path, new = tmp_path / "faq.jsonl", tmp_path / "faq.new"
    _write_faq(path, [FaqEntry(e.id, e.question, "Refunds take 3 days.") for e in FAQ])
    pipeline = SupportPipeline(model, path, top_k=1)
    _write_faq(new, [FaqEntry(e.id, e.question, "Refunds take 5 days.") for e in FAQ])
    stat = path.stat()
    os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(new, path)
    assert pipeline.refresh() and pipeline.answer("refund?").answer.context == "Refunds take 5 days."


def test_a_backbone_shorter_than_the_index_still_indexes_and_answers_long_entries(tokenizer):
    """The FAQ index embeds up to 256 tokens; a 64-position backbone keeps each entry's start."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    model = support_model(from_model(BertModel(config), tokenizer, name="short-bert"))
    long_entry = FaqEntry("long", "What is in the warranty?", " ".join(["The warranty covers parts and labour."] * 30))
    index = FaqIndex.build(model, [*faq_entries(FAQ), long_entry])
    assert index.vectors.shape[0] == len(FAQ) + 1
    reply = SupportPipeline(model, [*FAQ, long_entry], top_k=2).answer("What is in the warranty?")
    assert len(reply.similar) == 2 and reply.answer.faq_id in {e.id for e in [*FAQ, long_entry]}
