"""One passkey grid from several runs of `evaluation.passkey`, e.g. 1k–32k in one job and 64k and 128k in others.

    python -m evaluation.passkey_merge results/passkey_1k_32k results/passkey_64k results/passkey_128k \\
        --output-dir results/passkey_1k_128k

Each input folder holds a complete ``passkey.json``. The runs must share their depths, samples, seed, answer length,
prompt and dtype; a (model, length) column may come from one run only. A model missing from a run's lengths shows
as "not run" in the heatmap. The merged ``passkey.json`` lists the folders it came from (``merged_from``).
``--name MODEL=LABEL`` shows a model (e.g. one run from a temporary folder) under a readable label; the label must
not be another model's name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import atomic_write_json
from .passkey import accuracy_summary, format_length, plot

SHARED = ("depths", "samples", "seed", "max_new_tokens", "prompt", "dtype")


def merge(runs: dict[str, dict[str, Any]], names: dict[str, str] | None = None) -> dict[str, Any]:
    """The merged result of ``runs`` (folder name → its ``passkey.json``), models renamed by ``names``."""
    if not runs:
        raise ValueError("nothing to merge: give at least one passkey result folder")
    first_name, first = next(iter(runs.items()))
    for name, run in runs.items():
        if not run.get("complete"):
            raise ValueError(f"{name}: the passkey run is not complete; finish it (rerun its command) before merging")
        for key in SHARED:
            if run.get(key) != first.get(key):
                raise ValueError(f"{name} and {first_name} differ in {key!r}: {run.get(key)!r} vs {first.get(key)!r}")
    lengths = sorted({length for run in runs.values() for length in run["lengths"]})
    depths = first["depths"]
    models: dict[str, dict[str, Any]] = {}
    sources: dict[tuple[str, int], str] = {}
    for name, run in runs.items():
        for model, result in run["models"].items():
            merged = models.setdefault(model, {"accuracy": [[None] * len(lengths) for _ in depths], "cells": [],
                                               "max_positions": result.get("max_positions"),
                                               "chunked_forward": result.get("chunked_forward"),
                                               "model_type": result.get("model_type"), "seconds": 0.0})  # fmt: skip
            for j, length in enumerate(run["lengths"]):
                if (model, length) in sources:
                    raise ValueError(f"{model} at {format_length(length)} is in both {sources[model, length]} and "
                                     f"{name}; merge one of them")  # fmt: skip
                sources[model, length] = name
                column = lengths.index(length)
                for i in range(len(depths)):
                    merged["accuracy"][i][column] = result["accuracy"][i][j]
            merged["cells"].extend(result["cells"])
            merged["seconds"] += result.get("seconds") or 0.0
    for model, merged in models.items():
        limit = merged["max_positions"]
        for length in lengths:  # a length no run gave this model, past its position limit: say so, not "not run"
            if (model, length) not in sources and limit is not None and length > limit:
                merged["cells"].extend({"length": length, "depth": depth, "exceeds_max_positions": True, "keys": [],
                                        "answers": None, "correct": None, "accuracy": None} for depth in depths)
        merged["cells"].sort(key=lambda cell: (cell["length"], cell["depth"]))
        merged.update(accuracy_summary(merged["accuracy"]))
        merged["seconds"] = round(merged["seconds"], 1)
    if names:
        unknown = sorted(set(names) - set(models))
        if unknown:
            raise ValueError(f"--name gives labels to {unknown}, which no run holds (models: {sorted(models)})")
        labels = [names.get(model, model) for model in models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"--name would give two models the same label: {labels}")
        models = {names.get(model, model): result for model, result in models.items()}
    return {"complete": True, "merged_from": list(runs), "lengths": lengths,
            **{key: first[key] for key in SHARED}, "models": models}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders of complete passkey runs (each with passkey.json)")
    parser.add_argument("--output-dir", required=True, help="folder for the merged passkey.json and passkey.png")
    parser.add_argument("--overwrite", action="store_true", help="replace a merged result already there")
    parser.add_argument("--name", action="append", default=[], metavar="MODEL=LABEL",
                        help="show MODEL under LABEL (repeatable)")
    args = parser.parse_args(argv)
    names = {}
    for item in args.name:
        model, sep, label = item.partition("=")
        if not sep or not model or not label:
            raise ValueError(f"--name takes MODEL=LABEL, got {item!r}")
        names[model] = label
    runs = {}
    for folder in args.folders:
        path = Path(folder) / "passkey.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: give folders written by `python -m evaluation.passkey`")
        runs[folder] = json.loads(path.read_text())
    output_dir = Path(args.output_dir)
    target = output_dir / "passkey.json"
    if target.exists() and not args.overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    merged = merge(runs, names)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(target, merged)
    plot(merged["models"], merged["lengths"], merged["depths"], output_dir / "passkey.png")
    for name, result in merged["models"].items():
        per_length = ", ".join(
            f"{format_length(length)}: {'n/a' if acc is None else f'{acc:.2f}'}"
            for length, acc in zip(merged["lengths"], result["accuracy_per_length"], strict=True)
        )
        print(f"{name}: {per_length}")
    print(f"wrote {target} and .png")
    return merged


if __name__ == "__main__":
    main()
