"""Language-modelling data through `datasets`: batched tokenisation and packing, on in-memory and streamed sources.

Everything is local (generators and files in `tmp_path`): no network.
"""

import json

import pytest
from datasets import Dataset, IterableDataset

from tests.test_convert import tiny_tokenizer
from training.comet_config import CometTrainingConfig
from training.comet_trainer import build_recall_data, load_texts
from training.lm_data import lm_datasets, load_text_dataset, pack_dataset, split_eval

VOCAB = 64
EOS = 1  # tiny_tokenizer: "w1" is EOS, "w2" BOS, "w0" unknown
# Special tokens match inside words ("w27" would read "w2", "7"): draw words that do not start with them.
WORDS = [i for i in range(3, VOCAB) if not str(i).startswith(("1", "2"))]


def documents(n: int = 40, seed: int = 0) -> list[str]:
    """`n` documents of 1 to 30 words of `WORDS`, of varied lengths."""
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.choice(WORDS)}" for _ in range(rng.randrange(1, 31))) for _ in range(n)]


def expected_rows(texts: list[str], sample_tokens: int, batch_size: int) -> list[list[int]]:
    """What packing must give: per batch of texts, their tokens each followed by EOS, cut into full rows."""
    rows = []
    for start in range(0, len(texts), batch_size):
        stream = [tok for text in texts[start : start + batch_size] for tok in [*map(lambda w: int(w[1:]), text.split()), EOS]]
        rows += [stream[i : i + sample_tokens] for i in range(0, len(stream) - sample_tokens + 1, sample_tokens)]
    return rows


def config(tmp_path, **kwargs) -> CometTrainingConfig:
    return CometTrainingConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(VOCAB)


@pytest.mark.parametrize("batch_size", [1000, 7])
def test_packed_rows_are_exact_in_order_and_equal_for_streams(tokenizer, batch_size):
    texts = documents()
    in_memory = pack_dataset(Dataset.from_dict({"text": texts}), tokenizer, 16, batch_size=batch_size)

    def generate():
        for text in texts:
            yield {"text": text, "id": len(text)}  # an extra column is dropped

    stream = pack_dataset(IterableDataset.from_generator(generate), tokenizer, 16, batch_size=batch_size)
    assert isinstance(stream, IterableDataset)
    want = expected_rows(texts, 16, batch_size)
    assert len(want) > 10
    assert in_memory["input_ids"] == want and in_memory["labels"] == want
    streamed = list(stream)
    assert [row["input_ids"] for row in streamed] == want
    assert all(row["labels"] == row["input_ids"] and len(row["input_ids"]) == 16 for row in streamed)
    assert set(streamed[0]) == {"input_ids", "labels"}


def test_local_jsonl_streams_through_load_dataset(tmp_path, tokenizer):
    texts = documents(60, seed=1)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    args = config(tmp_path, train_files=str(path), text_field="body", streaming=True, max_steps=3,
                  sample_tokens=16, eval_samples=2, shuffle_buffer_size=0)  # fmt: skip
    source = load_text_dataset(args)
    assert isinstance(source, IterableDataset)
    assert [row["text"] for row in source] == texts
    train, held_out = lm_datasets(args, tokenizer)
    assert isinstance(train, IterableDataset) and isinstance(held_out, IterableDataset)
    want = expected_rows(texts, 16, 1000)
    assert [r["input_ids"] for r in held_out] == want[:2]  # the first rows are held out ...
    assert [r["input_ids"] for r in train] == want[2:]  # ... and skipped for training
    shuffled, _ = split_eval(pack_dataset(source, tokenizer, 16), 2, seed=0, shuffle_buffer_size=8)
    rows = [r["input_ids"] for r in shuffled]
    assert rows != want[2:] and sorted(rows) == sorted(want[2:])

    # The same file without streaming gives the same rows (before the non-streamed shuffle).
    in_memory = pack_dataset(load_text_dataset(args, streaming=False), tokenizer, 16)
    assert isinstance(in_memory, Dataset) and in_memory["input_ids"] == want


def test_dataset_name_with_config_name_streams(tmp_path, tokenizer):
    """`--dataset_name` + `--dataset_config` on a local `datasets` folder with two configurations."""
    folder = tmp_path / "two_configs"
    for name, seed in (("small", 2), ("large", 3)):
        (folder / name).mkdir(parents=True)
        (folder / name / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(30, seed)))
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n    path: small/train.jsonl\n"
        "- config_name: large\n  data_files:\n  - split: train\n    path: large/train.jsonl\n---\n"
    )
    for streaming in (True, False):
        args = config(tmp_path, dataset_name=str(folder), dataset_config="large", streaming=streaming, max_steps=1)
        assert [row["text"] for row in load_text_dataset(args)] == documents(30, 3)
    bad = config(tmp_path, dataset_name=str(folder), dataset_config="large", text_field="body")
    with pytest.raises(ValueError, match="no column 'body'"):
        load_text_dataset(bad)
    assert load_texts(bad.__class__(**{**bad.to_dict(), "text_field": "text"})) == documents(30, 3)


def test_streaming_needs_max_steps(tmp_path):
    with pytest.raises(ValueError, match="--streaming .* set --max_steps"):
        config(tmp_path, streaming=True)
    config(tmp_path, streaming=True, task="passkey")  # recall data has a length: no max_steps needed


def test_default_and_plain_text_sources_still_work(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("w5 w6\nw7")
    (tmp_path / "b.txt").write_text("w8")
    files = config(tmp_path, train_files=f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}")
    assert load_texts(files) == ["w5 w6\nw7", "w8"]  # a plain-text file is one document
    assert pack_dataset(load_text_dataset(files), tokenizer, 3)["input_ids"] == [[5, 6, 7], [1, 8, 1]]
    default = load_texts(config(tmp_path))
    assert len(default) > 50 and all(isinstance(t, str) for t in default)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts(config(tmp_path, train_files=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match="no sample of 500 tokens"):
        pack_dataset(load_text_dataset(files), tokenizer, 500)


def test_recall_filler_reads_a_streamed_dataset_only_as_far_as_needed(tmp_path, tokenizer, monkeypatch):
    import training.lm_data as lm_data

    folder = tmp_path / "big"
    folder.mkdir()
    texts = documents(5000, seed=4)
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    real, calls, read = lm_data.load_text_dataset, [], []

    def spy(cfg, streaming=None):
        calls.append(streaming)
        return real(cfg, streaming).map(lambda row: read.append(1) or row)

    monkeypatch.setattr(lm_data, "load_text_dataset", spy)
    args = config(tmp_path, dataset_name=str(folder), task="passkey", filler_tokens=2000, recall_rows=4,
                  recall_chunks="2,2", curriculum_distances="1")  # fmt: skip
    data, _, _ = build_recall_data(args, tokenizer, chunk_size=16)
    assert len(data) == 4 and len(data[0]["input_ids"]) >= 32
    assert calls == [True]  # a named dataset is streamed for the filler, even without --streaming
    assert 60 < len(read) < 1000  # ~2000 tokens of ~16-token documents, not the 5000 documents


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny Llama and its word-level tokenizer, saved: what `--model_name_or_path` loads."""
    from tests.test_convert import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("lm_data") / "tiny-llama", vocab_size=VOCAB, hidden_size=32)


def test_trainer_trains_on_a_stream(tiny_base, tmp_path):
    import math

    from training.comet_trainer import main

    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(200, seed=5)))
    out = tmp_path / "run"
    summary = main([
        "--model_name_or_path", str(tiny_base), "--train_files", str(path), "--streaming", "--output_dir", str(out),
        "--chunk_size", "8", "--global_mem_size", "2", "--temp_beacon_stride", "4", "--temp_mem_budget", "4",
        "--sample_tokens", "24", "--eval_samples", "2", "--per_device_train_batch_size", "2", "--max_steps", "3",
        "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "--save_strategy", "no",
        "--shuffle_buffer_size", "16", "--logging_steps", "1",
    ])  # fmt: skip
    assert math.isfinite(summary["eval_loss_before"]) and math.isfinite(summary["eval_loss_after"])
    assert (out / "comet_trained.safetensors").is_file()


def test_recall_filler_can_be_repetitive(tmp_path, tokenizer):
    """`repeat_filler_fraction` swaps the source's prose for `RepeatedFiller` sentences in that share of samples.
    The word-level tokenizer maps every English word of those sentences to its unknown token (id 0), while the
    source's documents are made of its own `w<i>` words, so the two fillers are told apart by their ids."""
    (tmp_path / "corpus.txt").write_text("\n".join(documents(400, seed=5)))
    ids = {}
    for fraction in (0.0, 1.0):
        args = config(tmp_path, train_files=str(tmp_path / "corpus.txt"), task="passkey", recall_rows=6,
                      recall_chunks="3,3", curriculum_distances="1", repeat_filler_fraction=fraction)  # fmt: skip
        data, _, _ = build_recall_data(args, tokenizer, chunk_size=48)
        ids[fraction] = {t for row in data for t in row["input_ids"]}
    assert len(ids[0.0]) > 20  # prose from the corpus
    assert ids[1.0] <= {0, 1, 2}  # repeated sentences (and the unknown-word templates) only
    with pytest.raises(ValueError, match="repeat_filler_fraction"):
        config(tmp_path, repeat_filler_fraction=1.5)
