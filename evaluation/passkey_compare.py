"""Is model B better than model A on the passkey grid? A paired comparison of two `evaluation.passkey` runs.

    python -m evaluation.passkey_compare results/passkey_default results/passkey_step50 --output compare.json

Both runs must have asked the same keys (same depths, samples and seed) at the lengths they share; every key is then
scored twice, once per model, and the comparison counts the keys only one of them found. With ``a`` keys found by A
only and ``b`` by B only, the exact McNemar test gives the two-sided probability of a split at least that uneven if
both models were equally good: ``min(1, 2 · P[Binomial(a + b, 1/2) <= min(a, b)])``. Few cells cannot separate close
models: 6 keys gained and none lost is the fewest that reach p < 0.05 (p = 0.031; 5 and none give 0.0625).

A folder argument may name the model inside its ``passkey.json`` as ``FOLDER:MODEL`` (needed when the run scored
several models, e.g. SmolLM2 beside CoMeT).
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path
from typing import Any

from .common import atomic_write_json
from .passkey import format_length


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value for ``a_only`` and ``b_only`` discordant pairs (1.0 when there are none)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def load_run(spec: str) -> tuple[str, dict[str, Any]]:
    """``FOLDER`` or ``FOLDER:MODEL`` (a folder or a passkey.json) → (label, that model's result with the run's
    settings)."""
    folder, _, model = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    path = Path(folder)
    path = path / "passkey.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a folder written by `python -m evaluation.passkey`")
    run = json.loads(path.read_text())
    models = run.get("models") or {}
    if not model:
        if len(models) != 1:
            raise ValueError(f"{path} scored {sorted(models)}: name one as {folder}:MODEL")
        model = next(iter(models))
    if model not in models:
        raise KeyError(f"{path} has no model {model!r}; it scored {sorted(models)}")
    return f"{folder}:{model}", {"cells": models[model]["cells"], "seed": run.get("seed"), "prompt": run.get("prompt")}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Paired counts per length and overall for two model results (``load_run``'s second item)."""
    if (a.get("seed"), a.get("prompt")) != (b.get("seed"), b.get("prompt")):
        raise ValueError("the runs differ in seed or prompt: their keys cannot be paired")
    cells_b = {(c["length"], c["depth"]): c for c in b["cells"] if c.get("correct") is not None}
    per_length: dict[int, dict[str, int]] = {}
    for cell in a["cells"]:
        other = cells_b.get((cell["length"], cell["depth"]))
        if cell.get("correct") is None or other is None:
            continue
        if other["keys"] != cell["keys"]:
            raise ValueError(f"{format_length(cell['length'])} depth {cell['depth']}: the runs asked different keys "
                             f"({cell['keys']} vs {other['keys']})")
        counts = per_length.setdefault(cell["length"], {"keys": 0, "a_found": 0, "b_found": 0, "a_only": 0, "b_only": 0})
        for found_a, found_b in zip(cell["correct"], other["correct"], strict=True):
            counts["keys"] += 1
            counts["a_found"] += found_a
            counts["b_found"] += found_b
            counts["a_only"] += found_a and not found_b
            counts["b_only"] += found_b and not found_a
    if not per_length:
        raise ValueError("the runs share no scored (length, depth) cell")
    total = {key: sum(c[key] for c in per_length.values()) for key in ("keys", "a_found", "b_found", "a_only", "b_only")}
    for counts in [*per_length.values(), total]:
        counts["p_value"] = mcnemar_exact(counts["a_only"], counts["b_only"])
    return {"per_length": {str(length): per_length[length] for length in sorted(per_length)}, "total": total}


def table(result: dict[str, Any], label_a: str, label_b: str) -> str:
    lines = [f"A = {label_a}", f"B = {label_b}", f"{'length':>8} {'A found':>9} {'B found':>9} {'A only':>7} "
             f"{'B only':>7} {'p':>7}"]
    rows = [(format_length(int(k)), v) for k, v in result["per_length"].items()] + [("all", result["total"])]
    for name, c in rows:
        lines.append(f"{name:>8} {c['a_found']:>4}/{c['keys']:<4} {c['b_found']:>4}/{c['keys']:<4} {c['a_only']:>7} "
                     f"{c['b_only']:>7} {c['p_value']:>7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="the reference run: FOLDER or FOLDER:MODEL")
    parser.add_argument("b", help="the run compared with it: FOLDER or FOLDER:MODEL")
    parser.add_argument("--output", help="also write the comparison as JSON here")
    args = parser.parse_args(argv)
    label_a, a = load_run(args.a)
    label_b, b = load_run(args.b)
    result = {"a": label_a, "b": label_b, **compare(a, b)}
    print(table(result, label_a, label_b))
    if args.output:
        atomic_write_json(args.output, result)
    return result


if __name__ == "__main__":
    main()
