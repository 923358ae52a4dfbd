"""Fault catalogue: one test per fault of issue 9 that is fixed, asserting the clear error or the preserved data.

Faults whose test needs a real run live next to the code they exercise:

| fault | test |
| --- | --- |
| a kill during conversion leaves neither old nor new folder | `test_convert.py::test_a_kill_at_any_moment_leaves_the_old_or_the_new_folder` |
| training never resumes; `--resume_from_checkpoint` ignored | `test_training_resume.py` (both trainers, SIGKILL) |
| evaluation reruns replace partial results; SCROLLS saves only at the end | `test_evaluation_resume.py` |
| invariants of the chunked model | `test_properties.py` |

Everything else is here, fast, in-process.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from convert import to_comet
from convert.atomic import MARKER, atomic_directory
from evaluation.common import run_cli

REPO = Path(__file__).resolve().parent.parent
MEMORY = dict(chunk_size=8, global_mem_size=2, temp_beacon_stride=4, temp_mem_budget=4)
VOCAB = 64


def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w3", pad_token="w0", eos_token="w2")


@pytest.fixture
def base(tmp_path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64)  # fmt: skip
    folder = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def cli(main, argv, capsys) -> tuple[int, str]:
    """Run an entry point the way `python -m` does; return (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv), (*__import__("evaluation.common").common.INPUT_ERRORS, KeyError))
    return exit_info.value.code, capsys.readouterr().err


def no_model_load(monkeypatch):
    monkeypatch.setattr(to_comet, "load_base", lambda *a, **k: pytest.fail("the base model was loaded"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- conversion
def test_conversion_into_a_folder_of_user_files_is_refused_and_the_files_kept(base, tmp_path, capsys, monkeypatch):
    user = tmp_path / "project"
    (user / "src").mkdir(parents=True)
    (user / "src" / "main.py").write_text("print('mine')")
    (user / "config.json").write_text('{"model_type": "comet", "but": "with user files beside it"}')
    before = snapshot(user)
    no_model_load(monkeypatch)
    status, err = cli(to_comet.main, [str(base), str(user)], capsys)
    assert status == 2 and err.count("\n") == 1 and "not a checkpoint this tool wrote" in err and "--overwrite" in err
    assert snapshot(user) == before


def test_conversion_into_the_working_directory_is_refused_even_with_overwrite(base, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    no_model_load(monkeypatch)
    for target in (".", str(work), str(tmp_path)):
        status, err = cli(to_comet.main, [str(base), target, "--overwrite"], capsys)
        assert status == 2 and ("current working directory" in err or "contains the source" in err), err
    assert (work / "notes.txt").read_text() == "keep"


def test_conversion_into_the_base_or_its_parent_is_refused_even_with_overwrite(base, capsys, monkeypatch):
    before = snapshot(base)
    no_model_load(monkeypatch)
    for target in (base, base.parent):
        status, err = cli(to_comet.main, [str(base), str(target), "--overwrite"], capsys)
        assert status == 2 and "contains the source" in err
    assert snapshot(base) == before


def test_stale_temporary_folders_of_a_killed_conversion_are_removed_on_the_next_run(base, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "comet.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 100_000)
    info = {"pid": int(dead.stdout), "host": socket.gethostname(), "target": "comet", "role": "new"}
    (stale / MARKER).write_text(json.dumps(info))
    foreign = tmp_path / "comet.tmp-not-ours"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"1")
    to_comet.convert(base, tmp_path / "comet", **MEMORY)
    assert not stale.exists() and (foreign / "data.bin").read_bytes() == b"1"
    assert (tmp_path / "comet" / "config.json").is_file()


def test_a_failed_write_leaves_the_old_checkpoint_and_no_temporary_folder(base, tmp_path):
    out = to_comet.convert(base, tmp_path / "comet", **MEMORY)
    before = snapshot(out)
    with pytest.raises(OSError, match="disk full"):
        with atomic_directory(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise OSError("disk full")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "comet"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{tmp}/missing", "{tmp}/out"], "base model folder not found"),
        (["{tmp}/badjson", "{tmp}/out"], "is not valid JSON"),
        (["{tmp}/noconfig", "{tmp}/out"], "has no config.json"),
        (["{base}", "{tmp}/out", "--chunk-size", "0"], "chunk_size must be at least 1, got 0"),
        (["{base}", "{tmp}/out", "--chunk-size", "10", "--temp-beacon-stride", "4"], "must divide chunk_size"),
        (["{base}", "{tmp}/out", "--temp-mem-budget", "0", "--global-mem-size", "-1"], "global_mem_size must be"),
        (["{base}", "{tmp}/out", "--chunk-size", "16", "--fold-delay", "16"], "fold_delay (16) must be smaller than"),
        (["{base}", "{tmp}/out", "--fold-delay", "-2"], "fold_delay must be at least 0, got -2"),
        (["{base}", "{tmp}/out", "--memory-weights", "{tmp}/none.safetensors"], "memory weights not found"),
    ],
)
def test_conversion_input_errors_are_one_line_and_exit_status_2(base, tmp_path, capsys, monkeypatch, argv, message):
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    (tmp_path / "noconfig").mkdir()
    no_model_load(monkeypatch)
    status, err = cli(to_comet.main, [a.format(tmp=tmp_path, base=base) for a in argv], capsys)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_conversion_cli_exit_status_in_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "convert.to_comet", str(tmp_path / "missing"), str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: base model folder not found: {tmp_path / 'missing'}"
    ]


def test_smollm2_export_refuses_a_user_folder_before_loading_the_gguf(tmp_path, monkeypatch):
    from convert import smollm2

    user = tmp_path / "mine"
    user.mkdir()
    (user / "config.json").write_text('{"model_type": "bert"}')  # has a config.json, but is not our export
    (user / "weights.bin").write_bytes(b"1")
    monkeypatch.setattr(smollm2, "gguf_folder", lambda: pytest.fail("loaded the GGUF before checking the target"))
    with pytest.raises(FileExistsError, match="not a checkpoint this tool wrote"):
        smollm2.smollm2_path(user)
    assert (user / "weights.bin").read_bytes() == b"1"


# ----------------------------------------------------------------------------------------------- remote code
@pytest.fixture
def remote_code_model(tmp_path) -> tuple[Path, Path]:
    """A model folder whose config names its own code; importing that code would create `sentinel`."""
    folder, sentinel = tmp_path / "remote", tmp_path / "remote-code-ran"
    folder.mkdir()
    code = f"""
from pathlib import Path
Path({str(sentinel)!r}).write_text("ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evil_remote"
"""
    (folder / "evil.py").write_text(code)
    config = {"model_type": "evil_remote", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                        "AutoModelForCausalLM": "evil.EvilModel"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer().save_pretrained(folder)
    return folder, sentinel


def test_converter_does_not_run_a_models_code_without_the_flag(remote_code_model, tmp_path):
    folder, sentinel = remote_code_model
    with pytest.raises((ValueError, OSError), match="trust_remote_code"):
        to_comet.convert(folder, tmp_path / "out", **MEMORY)
    assert not sentinel.exists()


def test_ram_trainer_does_not_run_a_models_code_without_the_flag(remote_code_model, tmp_path):
    from training.ram_config import RamTrainingConfig
    from training.ram_trainer import build_model

    folder, sentinel = remote_code_model
    config = RamTrainingConfig(output_dir=str(tmp_path / "o"), model_name_or_path=str(folder), report_to=[])
    assert config.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(config)
    assert not sentinel.exists()


def test_comet_trainer_does_not_run_a_models_code_without_the_flag(remote_code_model, tmp_path):
    from training.comet_config import CometTrainingConfig
    from training.comet_trainer import build_model

    folder, sentinel = remote_code_model
    config = CometTrainingConfig(output_dir=str(tmp_path / "o"), model_name_or_path=str(folder), report_to=[])
    assert config.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(config)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "module", ["convert.to_comet", "benchmarks.comet_lm_loss", "scripts.long_context_demo", "training.ram_trainer",
               "training.comet_trainer", "evaluation.passkey"],
)  # fmt: skip
def test_every_model_loading_cli_offers_an_opt_in_flag_that_is_off_by_default(module, capsys):
    import importlib

    entry = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["--help"])
    assert exit_info.value.code == 0
    assert "--trust-remote-code" in capsys.readouterr().out.replace("_", "-")


# ----------------------------------------------------------------------------------------------- training
def test_a_fresh_ram_run_into_a_folder_with_checkpoints_is_refused_before_loading(tmp_path, monkeypatch):
    from training import ram_trainer

    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "q", "answers": ["a"], "ctxs": [{"text": "a"}]}))
    monkeypatch.setattr(ram_trainer, "build_model", lambda config: pytest.fail("the model was loaded"))
    with pytest.raises(FileExistsError, match="checkpoint-4.*--resume_from_checkpoint latest"):
        ram_trainer.main(["--train_file", str(data), "--output_dir", str(out), "--report_to", "none"])
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ram_trainer.main(["--train_file", str(data), "--output_dir", str(out), "--report_to", "none",
                          "--resume_from_checkpoint", str(out / "checkpoint-9")])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]


def test_ram_trainer_reports_a_missing_train_file_in_one_line(tmp_path, capsys):
    from training import ram_trainer

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: ram_trainer.main(["--train_file", str(tmp_path / "none.jsonl"), "--output_dir",
                                          str(tmp_path / "o"), "--report_to", "none"]))  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "no such file" in err


def test_two_fresh_comet_runs_with_the_same_seed_start_from_the_same_weights(base, tmp_path, monkeypatch):
    from training import comet_trainer

    captured = []

    class Built(Exception):
        pass

    def capture(self, *args, model=None, **kwargs):
        captured.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        raise Built

    monkeypatch.setattr(comet_trainer.CometTrainer, "__init__", capture)
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i % 60 + 3}" for i in range(400)))
    for index, noise in enumerate((1, 2)):
        torch.manual_seed(noise)  # whatever ran before in the process
        argv = ["--model_name_or_path", str(base), "--train_files", str(text), "--output_dir", str(tmp_path / f"o{index}"),
                "--chunk_size", "8", "--temp_beacon_stride", "4", "--temp_mem_budget", "4", "--sample_tokens", "16",
                "--seed", "5", "--report_to", "none"]  # fmt: skip
        with pytest.raises(Built):
            comet_trainer.main(argv)
    assert captured[0].keys() == captured[1].keys()
    for name in captured[0]:
        assert torch.equal(captured[0][name], captured[1][name]), name


def test_latest_skips_a_checkpoint_whose_writing_was_killed(tmp_path):
    from training.comet_config import CometTrainingConfig
    from training.comet_trainer import resolve_resume

    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"half a file")  # killed before the trainer state
    config = CometTrainingConfig(output_dir=str(out), resume_from_checkpoint="latest", report_to=[])
    assert Path(resolve_resume(config)).name == "checkpoint-4"


# ----------------------------------------------------------------------------------------------- evaluation
def test_an_evaluation_rerun_keeps_a_complete_result(tmp_path, capsys, monkeypatch):
    from evaluation import passkey

    out = tmp_path / "out"
    out.mkdir()
    complete = {"complete": True, "lengths": [300], "models": {"m": {"accuracy": [[1.0]]}}}
    (out / "passkey.json").write_text(json.dumps(complete))
    monkeypatch.setattr(passkey, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: passkey.main(["--model", "m", "--output-dir", str(out), "--lengths", "300", "--no-progress"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "holds a complete result" in err and "--overwrite" in err
    assert json.loads((out / "passkey.json").read_text()) == complete


def test_an_unwritable_evaluation_output_is_refused_before_loading(tmp_path, monkeypatch):
    from evaluation import common, forgetting_curve

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(common.tempfile, "mkstemp", read_only)  # as on a read-only mount (root ignores chmod)
    monkeypatch.setattr(forgetting_curve, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(PermissionError, match="cannot be written: Permission denied"):
        forgetting_curve.main(["--model", "m", "--output-dir", str(tmp_path / "out"), "--max-length", "16"])


def test_right_padded_batch_generation_is_refused_before_any_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_comet import CometForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64))
    model = CometForCausalLM.from_base(base, chunk_size=8, global_mem_size=2, temp_beacon_stride=4, temp_mem_budget=4)
    ids = torch.randint(3, 64, (2, 6))
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="padded on the left"):
        model.generate(ids, attention_mask=right, max_new_tokens=2, pad_token_id=0)
    left = right.flip(1)
    assert model.generate(ids, attention_mask=left, max_new_tokens=2, pad_token_id=0).shape == (2, 8)


def test_a_checkpoint_missing_memory_or_base_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_comet import CometForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64))
    model = CometForCausalLM.from_base(base, chunk_size=8, global_mem_size=2, temp_beacon_stride=4, temp_mem_budget=4)
    model.save_pretrained(tmp_path / "ok")
    assert isinstance(CometForCausalLM.from_pretrained(tmp_path / "ok"), CometForCausalLM)
    for dropped in ("model.comet_memory.", "model.layers.0.mlp.up_proj"):
        folder = tmp_path / dropped.strip(".")
        model.save_pretrained(folder)
        weights = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in weights.items() if not k.startswith(dropped)}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        with pytest.raises(ValueError, match="lacks .* weight.*from_base"):
            CometForCausalLM.from_pretrained(folder)
