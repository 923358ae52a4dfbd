"""evaluation.passkey_compare: paired counts and the exact McNemar test on two passkey runs."""

import json

import pytest

from evaluation.passkey_compare import compare, load_run, main, mcnemar_exact


def run(correct_by_cell, keys=None, seed=0, model="m"):
    cells = [
        {"length": length, "depth": depth, "keys": (keys or {}).get((length, depth), ["1", "2"]), "correct": correct,
         "answers": [" x"] * len(correct) if correct is not None else None}
        for (length, depth), correct in correct_by_cell.items()
    ]
    return {"complete": True, "seed": seed, "prompt": "classic", "models": {model: {"cells": cells}}}


def write(tmp_path, name, payload):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "passkey.json").write_text(json.dumps(payload))
    return folder


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    assert mcnemar_exact(1, 4) == pytest.approx(2 * (1 + 5) / 32)
    assert mcnemar_exact(3, 3) == 1.0


def test_counts_are_paired_per_key_and_per_length(tmp_path):
    a = write(tmp_path, "a", run({(4096, 0.0): [True, False], (4096, 1.0): [True, True], (8192, 0.5): [False, False],
                                  (8192, 1.0): None}))
    b = write(tmp_path, "b", run({(4096, 0.0): [False, True], (4096, 1.0): [True, True], (8192, 0.5): [True, True],
                                  (8192, 1.0): [True, True]}))
    result = main([str(a), str(b), "--output", str(tmp_path / "cmp.json")])
    assert result["per_length"]["4096"] == {"keys": 4, "a_found": 3, "b_found": 3, "a_only": 1, "b_only": 1,
                                            "p_value": 1.0}
    # the unscored cell of A (8192, depth 1.0) is left out rather than counted as a miss
    assert result["per_length"]["8192"]["keys"] == 2 and result["per_length"]["8192"]["b_only"] == 2
    assert result["total"]["a_only"] == 1 and result["total"]["b_only"] == 3
    assert result["total"]["p_value"] == pytest.approx(mcnemar_exact(1, 3))
    assert json.loads((tmp_path / "cmp.json").read_text())["total"] == result["total"]


def test_runs_that_asked_other_keys_or_name_no_model_are_refused(tmp_path):
    cells = {(4096, 0.0): [True, True]}
    with pytest.raises(ValueError, match="different keys"):
        compare(run(cells)["models"]["m"], run(cells, keys={(4096, 0.0): ["7", "8"]})["models"]["m"])
    with pytest.raises(ValueError, match="seed or prompt"):
        compare({**run(cells)["models"]["m"], "seed": 0, "prompt": "p"},
                {**run(cells)["models"]["m"], "seed": 1, "prompt": "p"})
    two = run(cells)
    two["models"]["base"] = two["models"]["m"]
    folder = write(tmp_path, "two", two)
    with pytest.raises(ValueError, match="name one"):
        load_run(str(folder))
    label, result = load_run(f"{folder}:base")
    assert label.endswith(":base") and result["seed"] == 0
    with pytest.raises(KeyError, match="no model"):
        load_run(f"{folder}:other")
    with pytest.raises(FileNotFoundError):
        load_run(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="share no scored"):
        compare(run(cells)["models"]["m"] | {"seed": 0, "prompt": "classic"},
                run({(8192, 0.0): [True, True]})["models"]["m"] | {"seed": 0, "prompt": "classic"})
