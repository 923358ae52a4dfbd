"""Model cards for CoMeT and RAM checkpoints, rendered with `huggingface_hub`'s `ModelCard` / `ModelCardData`.

The templates are `hub_cards/comet.md` and `hub_cards/ram.md` (Jinja). The metadata block carries the base model's
repo id and license, `library_name`, `pipeline_tag`, tags (`custom_code` and the method), `datasets`, and the
evaluation results read from this project's JSON files (passkey, forgetting curve, SCROLLS) as `model-index`.

    >>> from convert.cards import base_model_info  # doctest: +SKIP
    >>> base_model_info("HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0").repo_id  # doctest: +SKIP
    'HuggingFaceTB/SmolLM2-135M-Instruct'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_comet.requirements import MIN_TRANSFORMERS_VERSION

TEMPLATES = Path(__file__).resolve().parent.parent / "hub_cards"
SMOLLM2_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
METHODS = {
    "comet": {
        "template": "comet.md",
        "pipeline_tag": "text-generation",
        "tags": ["custom_code", "comet", "long-context", "memory"],
        "fields": ("chunk_size", "global_mem_size", "temp_beacon_stride", "temp_mem_budget", "adapter_rank",
                   "position_layout", "global_write", "temp_write", "fold_delay"),
    },
    "ram": {
        "template": "ram.md",
        "pipeline_tag": "question-answering",
        "tags": ["custom_code", "ram", "context-compression", "long-context", "ram-question-answering"],
        "fields": ("encoder_layers", "segment_size", "keep_ratio", "position_layout", "contrastive_temperature",
                   "contrastive_weight"),
    },
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class BaseModelInfo:
    """What a card says about the base model: its Hub repo id, license and languages."""

    repo_id: str | None
    license: str | None = None
    language: list[str] = field(default_factory=list)


def _embedded_smollm2_folder() -> Path | None:
    from .smollm2 import cache_root

    return (cache_root() / "smollm2-135m-instruct").resolve()


def _gguf_metadata() -> dict:
    """License and languages recorded in the embedded SmolLM2 GGUF (``general.license``, ``general.languages``)."""
    from gguf import GGUFReader

    from .smollm2 import GGUF_FILE, gguf_folder

    fields = GGUFReader(str(gguf_folder() / GGUF_FILE)).fields
    info = {}
    if "general.license" in fields:
        info["license"] = fields["general.license"].contents()
    if "general.languages" in fields:
        info["language"] = list(fields["general.languages"].contents())
    return info


def base_model_info(
    base: str | Path, repo_id: str | None = None, license: str | None = None, required: bool = True
) -> BaseModelInfo:
    """Describe a base model for a card; explicit `repo_id` / `license` win over what is found.

    * a repo id (``org/name``, not a local folder) is its own id; its license is read from its card in the local
      Hugging Face cache when there is one;
    * the embedded SmolLM2 folder (``convert.smollm2``) is `HuggingFaceTB/SmolLM2-135M-Instruct`, with the license and
      languages recorded in its GGUF;
    * a folder inside a Hugging Face cache (``models--org--name/snapshots/...``) is ``org/name``;
    * any folder with a `README.md` contributes that card's `license` and `language`.

    With `required` (the default) a `ValueError` is raised when no repo id can be found: a published card's
    `base_model` must be a Hub id, never a local path. Without it the id is left `None`.
    """
    found: dict = {}
    path = Path(base)
    if path.is_dir():
        resolved = path.resolve()
        if resolved == _embedded_smollm2_folder():
            found["repo_id"] = SMOLLM2_REPO_ID
            try:
                found.update(_gguf_metadata())
            except (FileNotFoundError, ImportError):
                pass
        match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", resolved.as_posix() + "/")
        if match:
            found["repo_id"] = f"{match.group(1)}/{match.group(2)}"
        card_file = path / "README.md"
        if card_file.is_file():
            data = ModelCard.load(card_file).data
            for key in ("license", "language"):
                if data.get(key):
                    found.setdefault(key, data.get(key))
    elif _REPO_ID.match(str(base)):
        found["repo_id"] = str(base)
        found.update(_cached_card_metadata(str(base)))
    repo_id = repo_id or found.get("repo_id")
    if repo_id is None and required:
        raise ValueError(
            f"cannot tell the Hub repo id of the base model {str(base)!r} (a local folder): pass it explicitly "
            "(--base-model-id org/name)"
        )
    language = found.get("language") or []
    return BaseModelInfo(
        repo_id=repo_id,
        license=license or found.get("license"),
        language=[language] if isinstance(language, str) else list(language),
    )


def _cached_card_metadata(repo_id: str) -> dict:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "README.md")
    if not isinstance(cached, str):
        return {}
    data = ModelCard.load(cached).data
    return {key: data.get(key) for key in ("license", "language") if data.get(key)}


# ----- evaluation results ---------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Results of one evaluation file: `model-index` entries and a Markdown table for the card body."""

    name: str
    source: str
    results: list[EvalResult]
    table: str
    weights: str | None = None  # the fingerprint of the weights it was measured on (`weights_fingerprint`), if recorded
    weights_note: str = ""  # what the card says about those weights (set by `render_card`)


def _range(values: list) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def _inputs_note(payload: dict) -> str:
    """How long the scored inputs are under the protocol the forgetting-curve JSON was recorded with."""
    if payload.get("protocol") == "paper":
        return "inputs are 2L+3 tokens, the authors' protocol"
    return "inputs are 2L+2 tokens"


def _fmt(value: float) -> str:
    return f"{value:.2f}"


def _passkey(payload: dict, source: str) -> Evaluation:
    model = next(iter(payload["models"].values()))
    depths = ", ".join(f"{depth:.0%}" for depth in payload["depths"])
    dataset = dict(task_type="text-generation", task_name="Passkey retrieval", dataset_type="passkey",
                   dataset_name=f"Passkey retrieval (synthetic filler; key at depths {depths})")
    results = [
        EvalResult(metric_type="accuracy", metric_name=f"accuracy @ {length} tokens", metric_value=accuracy, **dataset)
        for length, accuracy in zip(payload["lengths"], model["accuracy_per_length"], strict=True)
    ]
    lengths = _range(payload["lengths"])
    results.append(EvalResult(metric_type="accuracy", metric_name=f"mean accuracy over {lengths} tokens",
                              metric_value=model["mean_accuracy"], **dataset))
    header = "| depth \\ prompt tokens | " + " | ".join(str(length) for length in payload["lengths"]) + " |"
    rows = [header, "|" + " --- |" * (len(payload["lengths"]) + 1)]
    for depth, row in zip(payload["depths"], model["accuracy"], strict=True):
        rows.append(f"| {depth:.0%} | " + " | ".join(_fmt(value) for value in row) + " |")
    rows.append("| mean | " + " | ".join(_fmt(value) for value in model["accuracy_per_length"]) + " |")
    return Evaluation(f"Passkey retrieval, {lengths} tokens", source, results, "\n".join(rows), model.get("weights"))


def _forgetting_curve(payload: dict, source: str) -> Evaluation:
    dataset = dict(task_type="text-generation", task_name="Forgetting curve (copy vs LM accuracy)",
                   dataset_type="forgetting-curve", dataset_name=f"Forgetting curve on {payload['corpus']}")
    results = [
        EvalResult(metric_type="accuracy", metric_name=f"copy accuracy @ L={point['length']}",
                   metric_value=point["copy_mean"], **dataset)
        for point in payload["per_length"]
    ]
    for key in ("fine_memory_length", "coarse_memory_length"):
        results.append(EvalResult(metric_type=key, metric_name=key.replace("_", " "), metric_value=payload[key],
                                  **dataset))
    lengths = [point["length"] for point in payload["per_length"]]
    rows = ["| L | " + " | ".join(str(length) for length in lengths) + " |", "|" + " --- |" * (len(lengths) + 1)]
    for label, key in (("copy", "copy_mean"), ("LM", "lm_mean")):
        rows.append(f"| {label} | " + " | ".join(_fmt(point[key]) for point in payload["per_length"]) + " |")
    rows.append(f"\nFine memory length {payload['fine_memory_length']}, coarse {payload['coarse_memory_length']} "
                f"({_inputs_note(payload)}; {payload['samples']} samples per length).")
    return Evaluation(f"Forgetting curve, L = {_range(lengths)}", source, results, "\n".join(rows),
                      payload.get("weights"))


def _scrolls(payload: dict, source: str) -> Evaluation:
    results, rows = [], ["| task | metric | score |", "| --- | --- | --- |"]
    for task, result in payload["tasks"].items():
        metric = result.get("metric", "score")
        results.append(EvalResult(
            task_type="text-generation", task_name="SCROLLS", dataset_type="tau/scrolls", dataset_name="SCROLLS",
            dataset_config=task, dataset_split=payload.get("split"), metric_type=metric, metric_name=f"{task} {metric}",
            metric_value=payload["scores"][task],
        ))
        rows.append(f"| {task} | {metric} | {_fmt(payload['scores'][task])} |")
    return Evaluation("SCROLLS", source, results, "\n".join(rows), payload.get("weights"))


def _ram_synthetic(payload: dict, source: str) -> Evaluation:
    dataset = dict(task_type="question-answering", task_name="Long-context QA (synthetic)", dataset_type="ram-synthetic-qa",
                   dataset_name=f"Synthetic long-context QA ({payload['context_tokens']} context tokens, "
                                f"{payload['distractors']} distractor facts, {payload['test_examples']} questions)")
    results, rows = [], ["| method | compression | layout | accuracy |", "| --- | --- | --- | --- |"]
    for row in payload["rows"]:
        if row["method"].startswith("RAM"):  # the baselines (full prompt, truncation) stay in the table only
            results.append(EvalResult(metric_type="accuracy", metric_value=row["accuracy"],
                                      metric_name=f"{row['method']} @ {row['compression']}, {row['layout']} layout",
                                      **dataset))
        rows.append(f"| {row['method']} | {row['compression']} | {row['layout']} | {_fmt(row['accuracy'])} |")
    return Evaluation("Synthetic long-context QA", source, results, "\n".join(rows))


def load_evaluation(path: str | Path) -> Evaluation:
    """Read an evaluation JSON of this project (passkey, forgetting curve, SCROLLS, RAM synthetic QA) into card results.

    Only complete runs are accepted (``"complete": false`` is an error), so a card never reports a partial grid.
    """
    path = Path(path)
    payload = json.loads(path.read_text())
    if payload.get("complete") is False:
        raise ValueError(f"{path} records an incomplete run (\"complete\": false); finish it before publishing")
    try:
        source = path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        source = path.name
    if "models" in payload and "depths" in payload:
        return _passkey(payload, source)
    if "per_length" in payload:
        return _forgetting_curve(payload, source)
    if "tasks" in payload and "scores" in payload:
        return _scrolls(payload, source)
    if "rows" in payload and "segment_size" in payload:
        return _ram_synthetic(payload, source)
    raise ValueError(f"{path} is not a passkey, forgetting-curve, SCROLLS or RAM synthetic-QA result of this project")


# ----- rendering -----------------------------------------------------------------------------------------------------


def render_card(
    config,
    base: BaseModelInfo,
    *,
    model_name: str,
    repo_id: str | None = None,
    revision: str | None = None,
    datasets: list[str] | tuple[str, ...] = (),
    evaluations: list[str | Path] | tuple[str | Path, ...] = (),
    training_note: str = "",
    training_command: str | None = None,
    require_hub_metadata: bool = True,
    weights_fingerprint: str | None = None,
) -> ModelCard:
    """The card of a CoMeT or RAM checkpoint (chosen by `config.model_type`).

    Args:
        config: the checkpoint's `CometConfig` or `RamConfig`.
        base (`BaseModelInfo`): the base model (`base_model_info`).
        model_name (`str`): title of the card and name of the `model-index` entry.
        repo_id (`str`, *optional*): where the checkpoint is published; the usage snippet loads it. Without one
            the snippet loads `model_name` as a local folder.
        revision (`str`, *optional*): commit (or tag) the snippet pins with `revision=`.
        datasets (`list[str]`, *optional*): Hub ids of the datasets the added parameters were trained on.
        evaluations (`list[path]`, *optional*): evaluation JSON files of this checkpoint (`load_evaluation`).
        training_note (`str`, *optional*): how it was trained, in prose.
        training_command (`str`, *optional*): the command that trained it.
        require_hub_metadata (`bool`, *optional*, defaults to `True`): refuse a base without a repo id or license
            (publishing); converters writing a local folder pass `False` and those fields are left out.
        weights_fingerprint (`str`, *optional*): `evaluation.common.weights_fingerprint` of the checkpoint. An
            evaluation that recorded other weights is refused; each one says whether it was measured on these.
    """
    method = METHODS.get(config.model_type)
    if method is None:
        raise ValueError(f"no card template for model_type {config.model_type!r}; expected one of {sorted(METHODS)}")
    if require_hub_metadata and base.repo_id is None:
        raise ValueError("the base model's Hub repo id is unknown: pass it explicitly (--base-model-id org/name)")
    if require_hub_metadata and base.license is None:
        raise ValueError(
            f"the license of the base model {base.repo_id} is unknown: pass it explicitly (--license, e.g. apache-2.0)"
        )
    loaded = [load_evaluation(path) for path in evaluations]
    for evaluation in loaded if weights_fingerprint is not None else ():
        if evaluation.weights is None:
            evaluation.weights_note = "It records no weights fingerprint, so it is not checked against these weights."
        elif evaluation.weights != weights_fingerprint:
            raise ValueError(
                f"{evaluation.source} was measured on other weights ({evaluation.weights}) than this checkpoint's "
                f"({weights_fingerprint}): evaluate this checkpoint, or leave that result out"
            )
        else:
            evaluation.weights_note = (
                f"Measured on these weights and settings (`{weights_fingerprint[:19]}…` of the safetensors files and "
                "`config.json`)."
            )
    card_data = ModelCardData(
        base_model=base.repo_id,
        license=base.license,
        language=base.language or None,
        library_name="transformers",
        pipeline_tag=method["pipeline_tag"],
        tags=list(method["tags"]),
        datasets=list(datasets) or None,
        model_name=model_name,
        eval_results=[result for evaluation in loaded for result in evaluation.results] or None,
    )
    fields = {name: getattr(config, name) for name in method["fields"]}
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / method["template"]),
        model_name=model_name,
        model_ref=repo_id or model_name,
        revision=revision,
        base_model=base.repo_id or "a local base model",
        base_is_hub=base.repo_id is not None,
        fields=fields,
        evaluations=loaded,
        training_note=training_note.strip(),
        training_command=training_command,
        min_transformers=MIN_TRANSFORMERS_VERSION,
        datasets=list(datasets),
    )


__all__ = [
    "BaseModelInfo",
    "Evaluation",
    "METHODS",
    "SMOLLM2_REPO_ID",
    "base_model_info",
    "load_evaluation",
    "render_card",
]
