"""Training resumes exactly after a SIGKILL, and a fresh run never overwrites an earlier run's checkpoints.

Both trainers run through their real entry points (`main(argv)`) in a child process on a tiny Llama saved in
`tmp_path` with a word-level tokenizer. The child of an interrupted run kills itself with SIGKILL right after
a chosen checkpoint is written (deterministic, unlike a timer); the rerun with `--resume_from_checkpoint
latest` must log the same loss at every step as an uninterrupted run with the same seed.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
VOCAB = 64

# Runs `<module>.main(argv)` and, if KILL_AFTER_STEP is set, SIGKILLs itself once the checkpoint of that step is
# fully written (the trainer's own `_save_checkpoint` has returned).
CHILD = """
import importlib, json, os, signal, sys
from transformers import Trainer

kill_after = int(os.environ.get("KILL_AFTER_STEP", "0"))
original = Trainer._save_checkpoint

def save_then_maybe_die(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    if kill_after and self.state.global_step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

Trainer._save_checkpoint = save_then_maybe_die
module = importlib.import_module(sys.argv[1])
module.main(json.loads(sys.argv[2]))
"""


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="w3", pad_token="w0", eos_token="w2", bos_token="w1"
    )


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def run_child(module: str, argv: list[str], kill_after: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "KILL_AFTER_STEP": str(kill_after)}
    env.pop("WANDB_MODE", None)
    return subprocess.run(
        [sys.executable, "-c", CHILD, module, json.dumps(argv)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def step_losses(output_dir: Path) -> dict[int, float]:
    """Loss logged at each step, from the newest checkpoint's trainer state."""
    newest = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def comet_argv(base: Path, text: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(base), "--train_files", str(text), "--output_dir", str(output_dir),
        "--chunk_size", "8", "--global_mem_size", "2", "--temp_beacon_stride", "4", "--temp_mem_budget", "4",
        "--sample_tokens", "24", "--eval_samples", "0", "--per_device_train_batch_size", "2",
        "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2",
        "--lr_scheduler_type", "linear", "--seed", "3", "--report_to", "none", "--use_cpu",
        "--dataloader_num_workers", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    generator = torch.Generator().manual_seed(1)
    words = " ".join(f"w{i}" for i in torch.randint(4, VOCAB, (2000,), generator=generator).tolist())
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text(words)
    return path


def test_comet_trainer_killed_and_resumed_reaches_the_same_losses(tiny_base, corpus, tmp_path):
    reference = run_child("training.comet_trainer", comet_argv(tiny_base, corpus, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "interrupted"
    killed = run_child("training.comet_trainer", comet_argv(tiny_base, corpus, out), kill_after=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    refused = run_child("training.comet_trainer", comet_argv(tiny_base, corpus, out))
    assert refused.returncode != 0 and "FileExistsError" in refused.stderr
    assert "--resume_from_checkpoint latest" in refused.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    resumed = run_child(
        "training.comet_trainer", comet_argv(tiny_base, corpus, out, "--resume_from_checkpoint", "latest")
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-4" in resumed.stdout

    expected, got = step_losses(tmp_path / "reference"), step_losses(out)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_resume_from_an_explicit_checkpoint_path_and_bad_paths(tiny_base, corpus, tmp_path):
    from training.comet_trainer import main

    out = tmp_path / "run"
    killed = run_child("training.comet_trainer", comet_argv(tiny_base, corpus, out), kill_after=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        main(comet_argv(tiny_base, corpus, out, "--resume_from_checkpoint", str(out / "checkpoint-99")))
    resumed = run_child(
        "training.comet_trainer", comet_argv(tiny_base, corpus, out, "--resume_from_checkpoint", str(out / "checkpoint-2"))
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step_losses(out).keys() == {1, 2, 3, 4, 5, 6}


def ram_data(path: Path) -> Path:
    generator = torch.Generator().manual_seed(2)
    rows = []
    for index in range(8):
        words = [f"w{i}" for i in torch.randint(4, VOCAB, (24,), generator=generator).tolist()]
        answer = words[5 + index]
        rows.append({"question": f"w{4 + index} w9", "answers": [answer], "ctxs": [{"text": " ".join(words)}]})
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def ram_argv(base: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(base), "--train_file", str(data), "--output_dir", str(output_dir),
        "--encoder_layers", "1", "--segment_size", "4", "--keep_ratio", "0.5", "--finetuning", "full",
        "--per_device_train_batch_size", "2", "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1",
        "--learning_rate", "1e-2", "--seed", "3", "--report_to", "none", "--use_cpu", *extra,
    ]  # fmt: skip


def test_ram_trainer_killed_and_resumed_reaches_the_same_losses(tiny_base, tmp_path):
    data = ram_data(tmp_path / "train.jsonl")
    reference = run_child("training.ram_trainer", ram_argv(tiny_base, data, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "interrupted"
    killed = run_child("training.ram_trainer", ram_argv(tiny_base, data, out), kill_after=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    refused = run_child("training.ram_trainer", ram_argv(tiny_base, data, out))
    assert refused.returncode != 0 and "already holds checkpoints" in refused.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    resumed = run_child("training.ram_trainer", ram_argv(tiny_base, data, out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = step_losses(tmp_path / "reference"), step_losses(out)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
