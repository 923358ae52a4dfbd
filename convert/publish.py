"""Publish a CoMeT or RAM checkpoint folder to the Hugging Face Hub.

    python -m convert.publish SRC REPO_ID [--private] [--revision BRANCH] [--commit-message MSG] [--dry-run]
        [--results FILE ...] [--dataset ID ...] [--training-command CMD] [--base-model-id ORG/NAME] [--license ID]

SRC is a checkpoint written by `convert.to_comet`, `convert.to_ram` or a trainer. The Hub folder is built from
scratch in a temporary folder:

* the weights as safetensors, `config.json` with `auto_map` (and, for RAM, `custom_pipelines`), the model files
  the checkpoint needs and nothing else of this package, `generation_config.json`;
* the tokenizer with its chat template;
* the model card (`convert.cards`): base model repo id and license, tags, datasets, the evaluation results given
  with `--results` as `model-index`, the memory settings, the training command and the transformers floor.

It is then validated: the folder holds exactly the expected files; in a fresh process where this package cannot be
imported, the config, model and tokenizer load from it with `trust_remote_code=True` and the model gives the same
logits as SRC; the card parses with the expected metadata. Only then is it uploaded with `huggingface_hub`
(`create_repo`, `create_branch` for a new `--revision`, `upload_folder`), after which the card is updated to pin its
usage snippet to the commit that holds the weights and code. `--dry-run` builds and validates, lists what would be
sent and leaves the folder in place.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoTokenizer
from transformers.dynamic_module_utils import get_relative_import_files

from .cards import BaseModelInfo, base_model_info, render_card
from .to_comet import looks_like_path

# Packages of this project: the built folder must load in a process where none of them can be imported.
PROJECT_PACKAGES = ("modeling_comet", "training", "convert", "evaluation", "benchmarks")
TOKENIZER_FILES = ("tokenizer_config.json",)
REQUIRED_FILES = ("config.json", "generation_config.json", "README.md")
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")


@dataclass
class PublishOptions:
    """What the card says beyond the checkpoint itself (see `python -m convert.publish --help`)."""

    base_model_id: str | None = None
    license: str | None = None
    datasets: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    training_command: str | None = None
    training_note: str | None = None
    model_name: str | None = None


def model_class(model_type: str):
    """The class of this package that loads a checkpoint of `model_type`."""
    if model_type == "comet":
        from modeling_comet import CometForCausalLM

        return CometForCausalLM
    if model_type == "ram":
        from modeling_comet.modeling_ram import RamForCausalLM

        return RamForCausalLM
    raise ValueError(f"can only publish CoMeT or RAM checkpoints (model_type 'comet' or 'ram'), got {model_type!r}")


def read_source(src: str | Path) -> tuple[Path, dict]:
    """The checkpoint folder and its parsed config.json, with clear errors for anything else."""
    src = Path(src).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {src}")
    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{src} has no config.json: not a checkpoint folder")
    config = json.loads(config_file.read_text())
    model_class(config.get("model_type"))  # refuse other model types early
    return src, config


def training_from_card(markdown: str) -> tuple[str | None, str | None]:
    """(note, command) of a card's `## Training` section: its prose and its first code block."""
    match = re.search(r"^## Training\n(.*?)(?=^## |\Z)", markdown, flags=re.S | re.M)
    if match is None:
        return None, None
    section = match.group(1)
    command = re.search(r"```\w*\n(.*?)\n```", section, flags=re.S)
    note = re.sub(r"```.*?```", "", section, flags=re.S)
    note = re.sub(r"^Data: .*$", "", note, flags=re.M).strip()  # datasets are re-rendered from the metadata
    return note or None, command.group(1).strip() if command else None


def card_inputs(src: Path, config: dict, options: PublishOptions) -> tuple[BaseModelInfo, PublishOptions]:
    """Base model and the card's other inputs: the options first, then SRC's own card, then the base itself.

    Returns the base and a copy of `options` completed from SRC's card (training note and command, datasets).

    A `base_model` in SRC's card that is a local path (cards written before publishing) is resolved like the base
    folder recorded in the config (`convert.cards.base_model_info`): it never reaches the published card.
    """
    existing = ModelCard.load(src / "README.md") if (src / "README.md").is_file() else None
    data = existing.data if existing is not None else None
    card_base = data.base_model if data is not None else None
    card_base = card_base[0] if isinstance(card_base, list) and card_base else card_base
    repo_id, license, language = options.base_model_id, options.license, []
    if data is not None:
        license = license or data.license
        if data.language:
            language = [data.language] if isinstance(data.language, str) else list(data.language)
    if repo_id is None and card_base and not looks_like_path(str(card_base)):
        repo_id = card_base
    for candidate in (card_base, (config.get("base_config") or {}).get("_name_or_path")):
        if candidate and (repo_id is None or license is None or not language):
            found = base_model_info(candidate, required=False)
            repo_id, license = repo_id or found.repo_id, license or found.license
            language = language or found.language
    if repo_id is None:
        raise ValueError(
            f"cannot tell the base model's Hub repo id for {src} (its card and config do not say): pass --base-model-id"
        )
    if license is None:
        raise ValueError(f"the license of the base model {repo_id} is unknown: pass --license (e.g. apache-2.0)")
    note, command = training_from_card(existing.text) if existing is not None else (None, None)
    completed = replace(
        options,
        training_note=options.training_note if options.training_note is not None else note,
        training_command=options.training_command or command,
        datasets=options.datasets or list((data.datasets if data is not None else None) or []),
    )
    return BaseModelInfo(repo_id=repo_id, license=license, language=language), completed


def build_folder(src: str | Path, folder: str | Path, repo_id: str, options: PublishOptions | None = None,
                 revision_pin: str | None = None) -> Path:
    """Write the complete Hub folder of checkpoint `src` into `folder` (created; must be empty)."""
    options = options or PublishOptions()
    src, raw_config = read_source(src)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty")
    base, options = card_inputs(src, raw_config, options)
    model = model_class(raw_config["model_type"]).from_pretrained(src, dtype="auto")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{src} has no usable tokenizer ({error}); save the base's tokenizer into it") from None
    model.save_pretrained(folder, safe_serialization=True)
    model.generation_config.save_pretrained(folder)  # always, even when it equals the defaults
    tokenizer.save_pretrained(folder)
    card_for(model.config, base, options, repo_id, revision_pin, src).save(folder / "README.md")
    return folder


def card_for(config, base: BaseModelInfo, options: PublishOptions, repo_id: str, revision: str | None, src: Path):
    """The published card of the checkpoint built from `src` (`options` completed by `card_inputs`): results measured
    on other weights or settings than SRC's are refused (`render_card`'s `weights_fingerprint`). The built folder
    holds SRC's safetensors unchanged; its config.json may gain fields that were defaults in SRC's."""
    from evaluation.common import weights_fingerprint

    return render_card(
        config, base,
        model_name=options.model_name or repo_id.split("/")[-1],
        repo_id=repo_id,
        revision=revision,
        datasets=options.datasets,
        evaluations=options.results,
        training_note=options.training_note or "",
        training_command=options.training_command,
        weights_fingerprint=weights_fingerprint(str(src)),
    )


# ----- validation ----------------------------------------------------------------------------------------------------


def expected_code_files(folder: Path, config: dict) -> set[str]:
    """The `.py` files the checkpoint needs: the modules `auto_map` and `custom_pipelines` name, and their imports."""
    references = list((config.get("auto_map") or {}).values())
    references += [task["impl"] for task in (config.get("custom_pipelines") or {}).values()]
    needed = set()
    for reference in references:
        reference = reference[0] if isinstance(reference, (list, tuple)) else reference
        if reference is None:
            continue
        module_file = folder / (reference.split("--")[-1].rsplit(".", 1)[0] + ".py")
        if not module_file.is_file():
            raise FileNotFoundError(f"{reference} is referenced by config.json but {module_file.name} is missing")
        needed.add(module_file.name)
        needed.update(Path(path).name for path in get_relative_import_files(module_file))
    return needed


def check_files(folder: Path, tokenizer_has_chat_template: bool) -> list[str]:
    """Fail unless `folder` holds exactly what a Hub checkpoint of ours needs; returns the sorted file list."""
    names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    config = json.loads((folder / "config.json").read_text())
    problems = [f"missing {name}" for name in (*REQUIRED_FILES, *TOKENIZER_FILES) if name not in names]
    if not any(name.endswith(".safetensors") for name in names):
        problems.append("no safetensors weights")
    problems += [f"{name}: not a safetensors file" for name in names if name.endswith(FORBIDDEN_SUFFIXES)]
    if tokenizer_has_chat_template and not {"chat_template.jinja", "chat_template.json"} & set(names):
        problems.append("the tokenizer's chat template was not saved")
    for key in ("AutoConfig", "AutoModelForCausalLM"):
        if key not in (config.get("auto_map") or {}):
            problems.append(f"config.json auto_map has no {key}")
    code = {name for name in names if name.endswith(".py")}
    needed = expected_code_files(folder, config)
    if code != needed:
        problems.append(f"code files {sorted(code)} differ from what the checkpoint needs {sorted(needed)}")
    if config.get("model_type") == "ram" and "ram-question-answering" not in (config.get("custom_pipelines") or {}):
        problems.append("config.json declares no ram-question-answering custom pipeline")
    if problems:
        raise ValueError(f"the built folder {folder} is not publishable: " + "; ".join(problems))
    return names


def check_card(folder: Path, base: BaseModelInfo | None = None, expect_results: bool = False) -> ModelCard:
    """Parse the card back; its metadata must name the base, license, library and `custom_code`."""
    card = ModelCard.load(folder / "README.md")
    data = card.data
    problems = []
    for key in ("base_model", "license", "library_name", "pipeline_tag"):
        if not data.get(key):
            problems.append(f"no {key}")
    if base is not None and data.base_model != base.repo_id:
        problems.append(f"base_model {data.base_model!r} is not {base.repo_id!r}")
    if "custom_code" not in (data.tags or []):
        problems.append("no custom_code tag")
    if expect_results and not data.eval_results:
        problems.append("no evaluation results in model-index")
    if problems:
        raise ValueError(f"the card of {folder} is incomplete: " + "; ".join(problems))
    return card


def blocked_import_preamble(packages=PROJECT_PACKAGES) -> str:
    """Python source that makes `packages` unimportable (a finder that refuses them), for fresh-process checks."""
    return textwrap.dedent(
        f"""
        import sys
        class _BlockProject:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {tuple(packages)!r}:
                    raise ImportError("this package must not be importable here: " + name)
        sys.meta_path.insert(0, _BlockProject())
        """
    )


def _probe_inputs(config: dict, vocab_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    if config["model_type"] == "ram":
        return {"context_ids": torch.randint(0, vocab_size, (1, 24), generator=generator),
                "question_ids": torch.randint(0, vocab_size, (1, 4), generator=generator)}
    return {"input_ids": torch.randint(0, vocab_size, (1, 12), generator=generator)}


def check_loads(folder: Path, src: Path, timeout: float = 900) -> float:
    """Load `folder` in a fresh process that cannot import this package: config, tokenizer, model (its logits must
    equal SRC's) and its pipelines (`text-generation` and the shipped `comet-text-generation` for CoMeT, the shipped
    `ram-question-answering` for RAM)."""
    config = json.loads((folder / "config.json").read_text())
    model = model_class(config["model_type"]).from_pretrained(src, dtype="auto").eval()
    inputs = _probe_inputs(config, model.get_input_embeddings().num_embeddings)
    with torch.no_grad():
        expected = model(**inputs).logits
    with tempfile.TemporaryDirectory(prefix="publish-check-") as scratch:
        reference = Path(scratch) / "reference.pt"
        torch.save({"inputs": inputs, "logits": expected}, reference)
        script = blocked_import_preamble() + textwrap.dedent(
            f"""
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
            folder = {str(folder)!r}
            AutoConfig.from_pretrained(folder, trust_remote_code=True)
            AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype="auto").eval()
            assert model.__class__.__module__.startswith("transformers_modules"), model.__class__.__module__
            ref = torch.load({str(reference)!r})
            with torch.no_grad():
                print("MAXDIFF", (model(**ref["inputs"]).logits - ref["logits"]).abs().max().item())
            from transformers import pipeline
            if model.config.model_type == "ram":
                answer = pipeline("ram-question-answering", model=folder, trust_remote_code=True)(
                    {{"context": "A short context.", "question": "What is it?"}}, max_new_tokens=1)
                assert isinstance(answer[0]["answer"], str), answer
            else:
                generated = pipeline("text-generation", model=folder, trust_remote_code=True)(
                    "A short prompt", max_new_tokens=1, do_sample=False)
                assert isinstance(generated[0]["generated_text"], str), generated
                # The long-prompt pipeline the config names, from the checkpoint's own pipeline_comet.py.
                long = pipeline("comet-text-generation", model=folder, trust_remote_code=True)
                assert type(long).__module__.startswith("transformers_modules"), type(long).__module__
                assert long("A short prompt", max_new_tokens=1, do_sample=False) == generated, generated
            """
        )
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env["HF_MODULES_CACHE"] = str(Path(scratch) / "modules")
        result = subprocess.run([sys.executable, "-c", script], cwd=scratch, env=env, capture_output=True, text=True,
                                timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"the built folder does not load without this package:\n{result.stderr[-3000:]}")
    diff = float(result.stdout.split("MAXDIFF")[-1].split()[0])
    if diff > 1e-5:
        raise RuntimeError(f"the built folder's logits differ from {src}'s by {diff}")
    return diff


def validate(folder: Path, src: Path, base: BaseModelInfo | None = None, expect_results: bool = False) -> list[str]:
    """All checks on a built folder; returns its file list."""
    tokenizer = AutoTokenizer.from_pretrained(src)
    names = check_files(folder, tokenizer_has_chat_template=bool(getattr(tokenizer, "chat_template", None)))
    check_card(folder, base, expect_results)
    check_loads(folder, src)
    return names


# ----- upload --------------------------------------------------------------------------------------------------------


def publish(
    src: str | Path,
    repo_id: str,
    options: PublishOptions | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    workdir: str | Path | None = None,
) -> dict:
    """Build, validate and (unless `dry_run`) upload; returns what was done (folder, files, commit, url)."""
    options = options or PublishOptions()
    src_path, raw_config = read_source(src)
    base, _ = card_inputs(src_path, raw_config, options)
    folder = Path(tempfile.mkdtemp(prefix="publish-", dir=workdir))
    try:
        build_folder(src_path, folder, repo_id, options)
        files = validate(folder, src_path, base, expect_results=bool(options.results))
        report = {"folder": str(folder), "files": files, "repo_id": repo_id, "revision": revision or "main"}
        if dry_run:
            return report
        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        message = commit_message or f"Upload {raw_config['model_type']} checkpoint ({src_path.name})"
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision, commit_message=message,
            delete_patterns=["*"],  # the repo holds what was built here and nothing older (.gitattributes is kept)
        )
        # The snippet pins the commit that holds these weights and this code.
        pinned = render_card_for(folder, src_path, repo_id, options, commit.oid)
        card_commit = api.upload_file(
            path_or_fileobj=pinned.encode(), path_in_repo="README.md", repo_id=repo_id, repo_type="model",
            revision=revision, commit_message=f"Card: pin the usage snippet to {commit.oid[:12]}",
            parent_commit=commit.oid,
        )
        report.update(url=str(url), commit=commit.oid, card_commit=getattr(card_commit, "oid", None))
        return report
    finally:
        if not dry_run:
            shutil.rmtree(folder, ignore_errors=True)


def render_card_for(folder: Path, src: Path, repo_id: str, options: PublishOptions, revision: str) -> str:
    """The card of an already built folder, pinned to `revision`."""
    _, raw_config = read_source(src)
    base, options = card_inputs(src, raw_config, options)
    config = model_class(raw_config["model_type"]).config_class.from_pretrained(folder)
    return str(card_for(config, base, options, repo_id, revision, src))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="CoMeT or RAM checkpoint folder (convert.to_comet, convert.to_ram, a trainer)")
    parser.add_argument("repo_id", help="Hub repo id, e.g. your-name/SmolLM2-135M-Instruct-CoMeT")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to upload to (created from main if missing)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--dry-run", action="store_true", help="build and validate, list the files, upload nothing")
    parser.add_argument("--results", nargs="*", default=[], metavar="JSON",
                        help="evaluation JSON of this checkpoint (passkey, forgetting curve, SCROLLS, RAM synthetic QA)")
    parser.add_argument("--dataset", dest="datasets", action="append", default=[], metavar="ID",
                        help="Hub id of a training dataset (repeatable)")
    parser.add_argument("--training-command", default=None, help="command that trained it, shown in the card")
    parser.add_argument("--training-note", default=None, help="how it was trained (default: from SRC's card)")
    parser.add_argument("--base-model-id", default=None, help="the base's Hub id (default: from SRC's card/config)")
    parser.add_argument("--license", default=None, help="the base's license (default: from the base)")
    parser.add_argument("--model-name", default=None, help="card title (default: the repo name)")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    options = PublishOptions(
        base_model_id=args.base_model_id, license=args.license, datasets=args.datasets, results=args.results,
        training_command=args.training_command, training_note=args.training_note, model_name=args.model_name,
    )
    report = publish(args.src, args.repo_id, options, private=args.private, revision=args.revision,
                     commit_message=args.commit_message, dry_run=args.dry_run, token=args.token)
    if args.dry_run:
        print(f"dry run: would upload to {args.repo_id}@{report['revision']} ({'private' if args.private else 'public'})")
        for name in report["files"]:
            print(f"  {name}  ({(Path(report['folder']) / name).stat().st_size:,} bytes)")
        print(f"built folder left at {report['folder']}")
    else:
        print(f"uploaded to {report['url']} (commit {report['commit']}; card pinned in {report['card_commit']})")
    return report


if __name__ == "__main__":
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    from evaluation.common import INPUT_ERRORS, run_cli

    run_cli(main, (*INPUT_ERRORS, KeyError, HfHubHTTPError, LocalTokenNotFoundError))
