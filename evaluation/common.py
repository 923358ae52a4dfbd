"""Helpers shared by the evaluation entry points: model loading, token ids, forward passes, outputs."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Short names resolved to local folders; everything else is a path or a Hub repo id.
MODEL_ALIASES = ("smollm2", "smollm2-comet")


def resolve_model_path(name: str) -> tuple[str, bool]:
    """Return ``(path_or_repo_id, needs_remote_code)`` for a model name or alias."""
    if name == "smollm2":
        from convert.smollm2 import smollm2_path

        return str(smollm2_path()), False
    if name == "smollm2-comet":
        try:
            from convert.comet_default import comet_default_path
        except ImportError as error:
            raise ValueError(
                "The model name 'smollm2-comet' needs convert/comet_default.py (comet_default_path), "
                f"which is not available: {error}"
            ) from error
        return str(comet_default_path()), True
    return name, False


def weights_fingerprint(name: str) -> str | None:
    """A digest of the weights and config that a model name resolves to, or None where it names no local folder.

    Evaluations record it with their results, so that resuming a partial result never mixes answers from two
    sets of weights under one model name (``smollm2-comet`` after its recall weights changed, a folder that was
    re-exported). It covers every ``*.safetensors`` file of the folder by content and ``config.json`` by what it
    says (parsed, keys sorted: the same settings written with another layout count as the same), leaving out the
    ``custom_pipelines`` it names. A Hub repo id that is not a local folder gives None: the id is all that is known
    before it downloads.
    """
    folder = Path(resolve_model_path(name)[0]).expanduser()
    if not folder.is_dir():
        return None
    files = sorted(path for path in folder.iterdir() if path.suffix == ".safetensors" or path.name == "config.json")
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        if path.suffix == ".json":  # by what it says, not how it is laid out
            config = json.loads(path.read_text())
            config.pop("custom_pipelines", None)  # which pipeline classes it names does not change the outputs
            content = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
            part = hashlib.sha256(content).hexdigest()
        else:
            with path.open("rb") as handle:
                part = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"{path.name}\0{part}\n".encode())
    return "sha256:" + digest.hexdigest()


# ``--dtype`` values: ``auto`` resolves (see `resolve_dtype`) to one of the others before anything is loaded.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

# /proc/cpuinfo flags of a CPU that computes in bfloat16 natively (x86: AVX512-BF16 or AMX; Arm: FEAT_BF16).
_X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_ARM_BF16_FLAGS = frozenset({"bf16"})


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags (``flags`` on x86, ``Features`` on Arm); empty where unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively (then bf16 matmuls are ~2.5x faster than fp32 ones).

    Without AVX512-BF16/AMX (x86) or FEAT_BF16 (Arm) torch emulates bf16 by converting to fp32, which is
    slower than fp32 itself, so ``--dtype auto`` keeps fp32 there.
    """
    flags = cpu_flags() if flags is None else flags
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return bool(_ARM_BF16_FLAGS & flags)
    return bool(_X86_BF16_FLAGS & flags)


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU with bf16 (Ampere and later) or such a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False  # mps, xpu, ...: not probed, fp32 is the safe choice


def resolve_dtype(dtype: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> ``bfloat16`` where ``device`` supports it natively, else ``float32``; other names unchanged.

    Results record the resolved name, so that two runs on different machines are never silently mixed.
    """
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose from {', '.join(DTYPE_CHOICES)}.")
    return dtype


def load_model_and_tokenizer(
    name: str, trust_remote_code: bool = False, dtype: str = "float32", device: str = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer from an alias, a local folder or a Hub repo id.

    CoMeT and RAM checkpoints load with this package's own classes (registered with the Auto classes on
    import), so they need no remote code. ``dtype`` may be ``auto`` (see `resolve_dtype`).
    """
    dtype = resolve_dtype(dtype, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_comet  # noqa: F401  (registers CoMeT and RAM with the Auto classes)

    path, needs_remote_code = resolve_model_path(name)
    trust_remote_code = trust_remote_code or needs_remote_code
    if path.startswith((".", "/", "~")) and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"Model folder {path!r} does not exist.")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=getattr(torch, dtype))
    return model.to(device).eval(), tokenizer


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments every entry point takes to load a model."""
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code from the model folder"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="weights dtype (default auto: bfloat16 where the CPU or GPU computes it natively, else float32); "
        "the result records the resolved one",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="random seed (samples are identical across models)")


def special_token_id(tokenizer: Any, model: torch.nn.Module | None, name: str) -> int | None:
    """The model's own ``bos``/``eos`` id: the tokenizer's first, then the (text) config's."""
    token_id = getattr(tokenizer, f"{name}_token_id", None) if tokenizer is not None else None
    if token_id is None and model is not None:
        config = model.config
        token_id = getattr(config, f"{name}_token_id", None)
        if token_id is None and hasattr(config, "get_text_config"):
            token_id = getattr(config.get_text_config(), f"{name}_token_id", None)
    if isinstance(token_id, list | tuple):
        token_id = token_id[0] if token_id else None
    return token_id


def is_comet(model: torch.nn.Module) -> bool:
    """CoMeT reads input chunk by chunk, so its input length is not bounded by position embeddings."""
    return getattr(model.config, "model_type", None) == "comet"


def max_positions(model: torch.nn.Module) -> int | None:
    """Longest input the model was built for, or ``None`` when unbounded (CoMeT) or unknown."""
    if is_comet(model):
        return None
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def last_logits(model: torch.nn.Module, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits at the last ``keep`` positions of ``input_ids`` (B, T) -> (B, keep, V).

    Passes ``logits_to_keep`` when the model supports it, so long inputs never materialise (T, V) logits.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits
    return logits[:, -keep:]


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def atomic_write_json(path: str | Path, payload: dict) -> Path:
    """Write JSON to a temporary sibling then rename it, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``: what an entry point that resumes its result (see `prepare_output`) takes besides its folder."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh, replacing a complete result or a partial one of other settings in --output-dir",
    )


def refuse_to_replace(*paths: str | Path, overwrite: bool = False, option: str = "--output-dir") -> None:
    """Benchmarks: stop before any work when one of ``paths`` already holds an earlier result, unless ``overwrite``.

    A benchmark measures everything in one run, so there is nothing to resume: a rerun would only replace what an
    earlier run wrote. ``option`` names the flag that chooses another place.
    """
    existing = [Path(path) for path in paths if Path(path).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} holds an earlier result; pass --overwrite to replace it, or choose another {option}"
        )


def _json_value(value: Any) -> Any:
    return json.loads(json.dumps(value))


def prepare_output(
    output_dir: str | Path,
    file_name: str,
    settings: dict[str, Any],
    overwrite: bool = False,
    recorded_since: tuple[str, ...] = ("dtype", "weights"),
) -> dict[str, Any] | None:
    """Check an evaluation's output folder before any model loads; return the partial result to resume, if any.

    * ``output_dir`` must be a folder that can be written (it is created if missing);
    * a complete result (``"complete": true``) in ``output_dir / file_name`` is kept: `FileExistsError`
      unless ``overwrite``;
    * a partial result (``"complete": false``) whose ``settings`` keys hold the same values is returned, so
      that the caller skips what it already holds; one of other settings, or a file that is not a JSON result,
      is kept (`FileExistsError`) unless ``overwrite``;
    * ``recorded_since`` names settings that results written before they were recorded lack (``dtype``, the
      ``weights`` fingerprint of `weights_fingerprint`): such a partial result is resumed under the value given
      now, with a warning on stderr naming it; a partial result that records another value is of other
      settings, as above.

    With ``overwrite`` the old file stays until the new run's first save replaces it.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir} exists and is not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise PermissionError(f"--output-dir {output_dir} cannot be written: {error.strerror or error}") from None
    path = output_dir / file_name
    if overwrite or not path.exists():
        return None
    hint = "pass --overwrite to replace it, or choose another --output-dir"
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        stored = None
    if not isinstance(stored, dict) or not isinstance(stored.get("complete"), bool):
        raise FileExistsError(f"{path} exists and is not a result of this evaluation; {hint}")
    if stored["complete"]:
        raise FileExistsError(f"{path} holds a complete result; {hint}")
    wanted = _json_value(settings)
    unrecorded = [key for key in wanted if key in recorded_since and key not in stored]
    differing = [key for key in wanted if key not in unrecorded and stored.get(key) != wanted[key]]
    if differing:
        details = ", ".join(f"{key}: {stored.get(key)!r} there, {wanted[key]!r} now" for key in differing)
        raise FileExistsError(f"{path} holds a partial result of other settings ({details}); {hint}")
    if unrecorded:
        assumed = ", ".join(f"{key} {wanted[key]!r}" for key in unrecorded)
        print(
            f"warning: {path} was written before {', '.join(unrecorded)} was recorded; resuming it as {assumed} "
            f"(pass --overwrite to start afresh if it was measured otherwise)",
            file=sys.stderr,
        )
    return stored


def atomic_save_figure(figure: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG through a temporary sibling, then close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        pyplot().close(figure)
    return path


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def model_label(name: str) -> str:
    """A file-system friendly label for a model name or path."""
    return Path(name.rstrip("/")).name or name


# Exceptions an entry point reports as a one-line input error (exit status 2) rather than a traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def run_cli(main: Callable[[], Any], errors: tuple[type[BaseException], ...] = INPUT_ERRORS) -> None:
    """Run an entry point, turning input errors into one ``error: ...`` line and exit status 2."""
    try:
        main()
    except errors as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        raise SystemExit(2) from None
