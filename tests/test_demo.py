"""The main job runs end to end on the packaged data (shortened epochs)."""

from __future__ import annotations

import json

from mtpeft.cli import main


def test_demo_trains_saves_reloads_and_answers(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs-scale", "0.1"]) == 0
    out = capsys.readouterr().out
    for skill in ("sentiment", "similar-questions", "faq-answer"):
        assert f"[{skill}] held-out" in out
        record = json.loads((tmp_path / "demo" / skill / "task.json").read_text())
        assert record["metrics"]["examples"] > 0
    assert "loaded it back" in out and "LearnedRouter" in out
    assert (tmp_path / "demo" / "router" / "router.json").is_file()
    assert "router/router.safetensors" in json.loads((tmp_path / "demo" / "bundle.json").read_text())["files"]
    assert "routed by the router" in out and out.count("\n    -> ") == 4
    assert out.count("message: ") == 5 and out.count("sentiment          -> ") == 5


def test_demo_refuses_an_epochs_scale_that_trains_nothing(tmp_path, capsys):
    for scale in ("0", "-1", "nan"):
        assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs-scale", scale]) == 2
        assert "--epochs-scale must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
