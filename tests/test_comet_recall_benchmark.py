"""The from-scratch recall benchmark: batches are laid out as specified; results are kept and resumed."""

import json

import pytest
import torch

from benchmarks import comet_recall
from benchmarks.comet_recall import QUERY, RecallSpec, make_batch


def test_make_batch_plants_each_key_at_its_distance_and_labels_only_the_answers():
    spec = RecallSpec(chunk_size=32)
    gen = torch.Generator().manual_seed(0)
    distances = torch.tensor([[0, 3], [2, 1]])
    ids, labels = make_batch(spec, gen, 2, 4, distances, 2)
    assert ids.shape == labels.shape == (2, 128)
    for b in range(2):
        for j in range(2):
            marker = spec.first_marker + j
            where = (ids[b] == marker).nonzero().flatten().tolist()
            fact, query = where[0], where[1]
            assert ids[b, query - 1] == QUERY and 3 - fact // 32 == distances[b, j]
            key = ids[b, fact + 1 : fact + 1 + spec.key_len]
            assert torch.equal(ids[b, query + 1 : query + 1 + spec.key_len], key)
            assert torch.equal(labels[b, query + 1 : query + 1 + spec.key_len], key)
        assert int((labels[b] != -100).sum()) == 2 * spec.key_len


def test_results_are_kept_and_a_rerun_skips_finished_variants(tmp_path, capsys):
    argv = ["--steps", "2", "--batch", "2", "--eval-samples", "2", "--distances", "0", "9", "--train-chunks", "3",
            "--output-dir", str(tmp_path)]  # fmt: skip
    first = comet_recall.main([*argv, "--variants", "temp_only", "full_attention"])
    assert first["variants"]["full_attention"]["exact_recall"]["9"] is None  # beyond its position range
    assert set(first["variants"]["temp_only"]["exact_recall"]) == {"0", "9"}
    assert (tmp_path / "comet_recall.png").is_file()
    stored = json.loads((tmp_path / "comet_recall.json").read_text())
    assert stored == json.loads(json.dumps(first))
    again = comet_recall.main([*argv, "--variants", "temp_only"])
    assert "temp_only: kept" in capsys.readouterr().out and again == stored
    with pytest.raises(SystemExit, match="other settings"):
        comet_recall.main([*argv[:1], "3", *argv[2:]])
