"""Evaluation reruns resume and keep: output folder checked before the model loads, partial results reused,
complete results replaced only with --overwrite, SCROLLS saved after every example."""

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from evaluation import common, forgetting_curve, passkey, scrolls
from tests.evaluation_helpers import InductionLM, TinyConfig, char_tokenizer

FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "scrolls"


@pytest.fixture
def model_folder(tmp_path):
    AutoConfig.register("tiny_eval", TinyConfig, exist_ok=True)
    AutoModelForCausalLM.register(TinyConfig, InductionLM, exist_ok=True)
    folder = tmp_path / "model"
    InductionLM(TinyConfig(max_position_embeddings=4096)).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


class LoadRecorder:
    """Stands in for `load_model_and_tokenizer`: one InductionLM per call, every instance kept for inspection."""

    def __init__(self):
        self.names, self.models = [], []

    def __call__(self, name, *args, **kwargs):
        self.names.append(name)
        self.models.append(InductionLM(TinyConfig(max_position_embeddings=4096)).eval())
        return self.models[-1], char_tokenizer()


def forbid_loading(monkeypatch, module):
    monkeypatch.setattr(module, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))


# ----------------------------------------------------------------------------------------------- the shared helper
def test_prepare_output_keeps_complete_and_foreign_results_and_returns_matching_partials(tmp_path):
    settings = {"model": "m", "lengths": [8, 16]}
    assert common.prepare_output(tmp_path / "new", "r.json", settings) is None and (tmp_path / "new").is_dir()
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"complete": False, "model": "m", "lengths": [8, 16], "rows": [1]}))
    assert common.prepare_output(tmp_path, "r.json", settings)["rows"] == [1]
    with pytest.raises(FileExistsError, match=r"partial result of other settings \(lengths: \[8, 16\] there"):
        common.prepare_output(tmp_path, "r.json", {**settings, "lengths": [8]})
    path.write_text(json.dumps({"complete": True, "model": "m", "lengths": [8, 16]}))
    with pytest.raises(FileExistsError, match="holds a complete result; pass --overwrite"):
        common.prepare_output(tmp_path, "r.json", settings)
    path.write_text("my notes, not JSON")
    with pytest.raises(FileExistsError, match="not a result of this evaluation"):
        common.prepare_output(tmp_path, "r.json", settings)
    assert common.prepare_output(tmp_path, "r.json", settings, overwrite=True) is None
    assert path.read_text() == "my notes, not JSON"  # overwrite replaces on the first save, not before
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        common.prepare_output(tmp_path / "file", "r.json", settings)


# ----------------------------------------------------------------------------------------------- forgetting curve
def test_forgetting_curve_resumes_a_partial_result_without_rescoring_finished_lengths(tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog while a cat sleeps in the sun. " * 20)
    out = tmp_path / "out"
    args = ["--model", "tiny", "--output-dir", str(out), "--text-files", str(text), "--no-progress",
            "--max-length", "40", "--num-points", "4", "--samples", "3", "--train-length", "64"]  # fmt: skip
    loads = LoadRecorder()
    monkeypatch.setattr(forgetting_curve, "load_model_and_tokenizer", loads)
    full = forgetting_curve.main(args)
    saved = json.loads((out / "forgetting_curve.json").read_text())

    forbid_loading(monkeypatch, forgetting_curve)
    with pytest.raises(FileExistsError, match="complete result"):
        forgetting_curve.main(args)

    partial = {**saved, "complete": False, "per_length": saved["per_length"][:2]}
    (out / "forgetting_curve.json").write_text(json.dumps(partial))
    with pytest.raises(FileExistsError, match="partial result of other settings"):
        forgetting_curve.main([*args[:-6], "--samples", "2", "--train-length", "64", "--max-length", "40"])

    loads = LoadRecorder()
    monkeypatch.setattr(forgetting_curve, "load_model_and_tokenizer", loads)
    resumed = forgetting_curve.main(args)
    assert resumed["per_length"] == full["per_length"] and resumed["complete"]
    finished = {2 * length + 2 for length in saved["lengths"][:2]}
    assert finished.isdisjoint(loads.models[0].forward_lengths)  # the first two lengths were not scored again
    assert json.loads((out / "forgetting_curve.json").read_text())["per_length"] == full["per_length"]

    resumed_again = forgetting_curve.main([*args, "--overwrite"])
    assert resumed_again["per_length"] == full["per_length"]


# ----------------------------------------------------------------------------------------------- passkey
def test_passkey_skips_finished_models_and_cells(tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--model", "a", "b", "--output-dir", str(out), "--lengths", "300", "450", "--num-depths", "2",
            "--no-progress"]  # fmt: skip
    loads = LoadRecorder()
    monkeypatch.setattr(passkey, "load_model_and_tokenizer", loads)
    full = passkey.main(args)
    saved = json.loads((out / "passkey.json").read_text())

    forbid_loading(monkeypatch, passkey)
    with pytest.raises(FileExistsError, match="complete result"):
        passkey.main(args)

    # Killed while scoring model b: a is finished, b has one of its four cells.
    b = saved["models"]["b"]
    partial_b = {key: value for key, value in b.items() if key not in ("seconds", "model_type")}
    partial_b["cells"] = b["cells"][:1]
    (out / "passkey.json").write_text(json.dumps({**saved, "complete": False, "models": {"a": saved["models"]["a"],
                                                                                         "b": partial_b}}))
    loads = LoadRecorder()
    monkeypatch.setattr(passkey, "load_model_and_tokenizer", loads)
    resumed = passkey.main(args)
    assert loads.names == ["b"]  # model a was not loaded again
    prompts = [length for length in loads.models[0].forward_lengths if length in (300, 450)]  # first step of each
    assert len(prompts) == 3  # the three cells left, one prompt each
    for name in ("a", "b"):
        assert resumed["models"][name]["cells"] == full["models"][name]["cells"]
        assert resumed["models"][name]["accuracy"] == full["models"][name]["accuracy"]
    assert resumed["complete"]


def test_weights_fingerprint_follows_the_folder_content(model_folder, tmp_path):
    import shutil

    import torch

    first = common.weights_fingerprint(str(model_folder))
    assert first.startswith("sha256:")
    copy = tmp_path / "copy"
    shutil.copytree(model_folder, copy)
    assert common.weights_fingerprint(str(copy)) == first  # content, not the path
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(reversed(list(config.items())))))  # same settings, new layout
    assert common.weights_fingerprint(str(copy)) == first
    pipelines = {"comet-text-generation": {"impl": "pipeline_comet.CometTextGenerationPipeline"}}
    (copy / "config.json").write_text(json.dumps({**config, "custom_pipelines": pipelines}))
    assert common.weights_fingerprint(str(copy)) == first  # the pipelines a config names do not change outputs
    (copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 123}))
    assert common.weights_fingerprint(str(copy)) != first
    (copy / "config.json").write_text(json.dumps(config))
    model = InductionLM.from_pretrained(copy)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(copy)
    assert common.weights_fingerprint(str(copy)) != first
    assert common.weights_fingerprint("some-org/some-repo") is None  # a Hub id: only its name is known


def test_passkey_refuses_to_resume_answers_of_other_weights(model_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    name = str(model_folder)
    args = ["--model", name, "--output-dir", str(out), "--lengths", "300", "--num-depths", "2", "--no-progress"]
    monkeypatch.setattr(passkey, "load_model_and_tokenizer", LoadRecorder())
    full = passkey.main(args)
    assert full["models"][name]["weights"] == common.weights_fingerprint(name)

    # Interrupted after one cell; then the folder was re-exported with other weights.
    partial = {**full, "complete": False}
    partial["models"] = {name: {**full["models"][name], "cells": full["models"][name]["cells"][:1]}}
    del partial["models"][name]["seconds"]
    partial["models"][name]["weights"] = "sha256:" + "0" * 64
    (out / "passkey.json").write_text(json.dumps(partial))
    forbid_loading(monkeypatch, passkey)
    with pytest.raises(FileExistsError, match=r"partial result of .* from other weights \(sha256:0+ there"):
        passkey.main(args)
    assert json.loads((out / "passkey.json").read_text()) == partial  # kept as it was

    # The same weights resume: only the missing cell is scored.
    partial["models"][name]["weights"] = full["models"][name]["weights"]
    (out / "passkey.json").write_text(json.dumps(partial))
    loads = LoadRecorder()
    monkeypatch.setattr(passkey, "load_model_and_tokenizer", loads)
    assert passkey.main(args)["models"][name]["cells"] == full["models"][name]["cells"]
    assert loads.names == [name]


def test_forgetting_curve_refuses_to_resume_a_result_of_other_weights(model_folder, tmp_path, monkeypatch):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog while a cat sleeps in the sun. " * 20)
    out = tmp_path / "out"
    args = ["--model", str(model_folder), "--output-dir", str(out), "--text-files", str(text), "--no-progress",
            "--max-length", "40", "--num-points", "4", "--samples", "3", "--train-length", "64"]  # fmt: skip
    monkeypatch.setattr(forgetting_curve, "load_model_and_tokenizer", LoadRecorder())
    saved = forgetting_curve.main(args)
    assert saved["weights"] == common.weights_fingerprint(str(model_folder))
    stale = {**saved, "complete": False, "per_length": saved["per_length"][:2], "weights": "sha256:" + "1" * 64}
    (out / "forgetting_curve.json").write_text(json.dumps(stale))
    forbid_loading(monkeypatch, forgetting_curve)
    with pytest.raises(FileExistsError, match="partial result of other settings \\(weights: 'sha256:1+' there"):
        forgetting_curve.main(args)


# ----------------------------------------------------------------------------------------------- SCROLLS
def scrolls_args(out):
    return ["--model", "tiny", "--output-dir", str(out), "--no-progress", "--tasks", "qasper", "contract_nli",
            "--data-files", f"qasper={FIXTURES / 'qasper.jsonl'}", f"contract_nli={FIXTURES / 'contract_nli.jsonl'}"]


def test_scrolls_saves_after_every_example_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(scrolls, "load_model_and_tokenizer", LoadRecorder())
    full = scrolls.main(scrolls_args(tmp_path / "reference"))

    out = tmp_path / "out"
    real_generate, calls = scrolls.generate, []

    def generate_then_die(*args, **kwargs):
        if len(calls) == 3:  # the fourth prediction: killed
            raise KeyboardInterrupt
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(scrolls, "generate", generate_then_die)
    with pytest.raises(KeyboardInterrupt):
        scrolls.main(scrolls_args(out))
    partial = json.loads((out / "scrolls.json").read_text())
    assert partial["complete"] is False
    assert len(partial["tasks"]["qasper"]["examples"]) == 2 and len(partial["tasks"]["contract_nli"]["examples"]) == 1

    calls.clear()
    monkeypatch.setattr(scrolls, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    resumed = scrolls.main(scrolls_args(out))
    assert len(calls) == 1  # only the last contract_nli example was generated
    assert resumed["scores"] == full["scores"] and resumed["complete"]
    for task in ("qasper", "contract_nli"):
        assert resumed["tasks"][task]["examples"] == full["tasks"][task]["examples"]

    forbid_loading(monkeypatch, scrolls)
    with pytest.raises(FileExistsError, match="complete result"):
        scrolls.main(scrolls_args(out))


def test_scrolls_refuses_an_unusable_output_folder_before_the_model_loads(tmp_path, monkeypatch):
    forbid_loading(monkeypatch, scrolls)
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        scrolls.main(scrolls_args(tmp_path / "taken"))
