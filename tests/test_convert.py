"""Conversion of a base checkpoint folder into a CoMeT folder."""

import json
import socket

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from convert.to_comet import check_key_mapping, convert, map_base_key


def tiny_tokenizer(vocab_size):
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1", bos_token="w2")


def save_tiny_base(folder, vocab_size=96, hidden_size=64):
    """A tiny Llama (seed 0) and its word-level tokenizer saved in ``folder``: what `--model_name_or_path` loads."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer(vocab_size).save_pretrained(folder)
    return folder


@pytest.fixture
def base_folder(tmp_path):
    return save_tiny_base(tmp_path / "base")


def test_convert_writes_a_loadable_checkpoint_with_card(base_folder, tmp_path):
    out = convert(base_folder, tmp_path / "comet", chunk_size=16, global_mem_size=4, temp_beacon_stride=4,
                  temp_mem_budget=8)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_comet.py", "README.md", "tokenizer.json"} <= names
    assert not list(tmp_path.glob("comet.tmp-*"))  # the temporary folder was renamed, not left behind
    config = json.loads((out / "config.json").read_text())
    assert config["chunk_size"] == 16 and config["auto_map"]["AutoModelForCausalLM"] == "modeling_comet.CometForCausalLM"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "built on a local base model" in card and "| chunk_size | 16 |" in card
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    base = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def test_key_table_rejects_unmapped_and_uncovered_keys():
    assert map_base_key("model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn.q_proj.weight"
    with pytest.raises(KeyError, match="no entry in the CoMeT key table"):
        map_base_key("transformer.h.0.attn.c_attn.weight")
    w = torch.zeros(1)
    with pytest.raises(KeyError, match="no base weight"):
        check_key_mapping({"model.norm.weight": w}, {"model.norm.weight": w, "model.embed_tokens.weight": w}, tied=False)
    with pytest.raises(KeyError, match="missing from the CoMeT model"):
        check_key_mapping({"model.layers.0.extra.weight": w}, {"comet_memory.x": w}, tied=False)


def test_convert_refuses_missing_folder(tmp_path):
    with pytest.raises(OSError):
        convert(tmp_path / "does-not-exist", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_memory_weights_round_trip_and_mismatch(base_folder, tmp_path):
    from convert.to_comet import load_memory_weights, save_memory_weights
    from modeling_comet import CometForCausalLM

    fields = dict(chunk_size=16, global_mem_size=4, temp_beacon_stride=4, temp_mem_budget=8)
    trained = CometForCausalLM.from_base(str(base_folder), **fields)
    with torch.no_grad():
        trained.comet_memory.layers[0].gate.bias.fill_(3.0)
    path = save_memory_weights(trained, tmp_path / "memory.safetensors")
    out = convert(base_folder, tmp_path / "comet", memory_weights=path, **fields)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert reloaded.comet_memory.layers[0].gate.bias.item() == 3.0
    other = CometForCausalLM.from_base(str(base_folder), **{**fields, "temp_beacon_stride": -1})
    with pytest.raises(KeyError, match="do not fit this model"):
        load_memory_weights(other, path)
    with pytest.raises(FileNotFoundError):
        load_memory_weights(other, tmp_path / "absent.safetensors")


# ------------------------------------------------------------------ safe writing (convert.atomic)
MEMORY = dict(chunk_size=16, global_mem_size=4, temp_beacon_stride=4, temp_mem_budget=8)


def test_convert_replaces_its_own_checkpoint_and_leaves_no_siblings(base_folder, tmp_path):
    out = convert(base_folder, tmp_path / "comet", **MEMORY)
    (out / "stale-shard.safetensors").write_bytes(b"x")  # a file of the old checkpoint
    convert(base_folder, out, **{**MEMORY, "chunk_size": 8})
    assert json.loads((out / "config.json").read_text())["chunk_size"] == 8
    assert not (out / "stale-shard.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "comet"]
    assert not (out / ".comet-atomic-write.json").exists()
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's owner-only mode


def test_convert_refuses_a_user_folder_before_loading_and_keeps_it(base_folder, tmp_path, monkeypatch):
    import convert.to_comet as to_comet

    user = tmp_path / "notes"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    monkeypatch.setattr(to_comet, "load_base", lambda *a, **k: pytest.fail("loaded the base before checking"))
    with pytest.raises(FileExistsError, match="not a checkpoint this tool wrote.*--overwrite"):
        convert(base_folder, user, **MEMORY)
    assert (user / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "notes"]


def test_convert_overwrite_replaces_a_user_folder(base_folder, tmp_path):
    user = tmp_path / "notes"
    user.mkdir()
    (user / "old.txt").write_text("replace me")
    convert(base_folder, user, overwrite=True, **MEMORY)
    assert (user / "config.json").is_file() and not (user / "old.txt").exists()


def test_convert_never_replaces_the_source_or_the_working_directory(base_folder, tmp_path, monkeypatch):
    for target in (tmp_path, base_folder):  # the base's parent folder, the base itself
        with pytest.raises(FileExistsError, match="contains the source"):
            convert(base_folder, target, overwrite=True, **MEMORY)
    monkeypatch.chdir(tmp_path / "base")
    with pytest.raises(FileExistsError, match="current working directory"):
        convert(base_folder, ".", overwrite=True, **MEMORY)
    assert (base_folder / "config.json").is_file() and (base_folder / "model.safetensors").is_file()


def test_atomic_directory_removes_its_temporary_folder_on_error(tmp_path):
    from convert.atomic import atomic_directory

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_recover_removes_only_marked_stale_folders(tmp_path):
    from convert.atomic import MARKER, atomic_directory

    dead = subprocess_pid_that_exited()
    stale = tmp_path / "out.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    (stale / MARKER).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "target": "out", "role": "new"}))
    empty = tmp_path / "out.tmp-empty"
    empty.mkdir()
    user = tmp_path / "out.tmp-mine"  # same name pattern, but not ours: kept
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp-mine"]
    assert (user / "keep.txt").read_text() == "mine"


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


KILLER = """
import os, signal, sys
from pathlib import Path
import convert.atomic as atomic

target, kill_at = Path(sys.argv[1]), int(sys.argv[2])
calls = {"n": 0}
real_replace = os.replace

def replace_then_maybe_die(src, dst):
    calls["n"] += 1
    if calls["n"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
    if calls["n"] == -kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

atomic.os.replace = replace_then_maybe_die
real_rmtree = atomic.shutil.rmtree
def rmtree_then_die(path, *args, **kwargs):
    real_rmtree(path, *args, **kwargs)
    if kill_at == 99:
        os.kill(os.getpid(), signal.SIGKILL)
atomic.shutil.rmtree = rmtree_then_die

with atomic.atomic_directory(target, overwrite=True) as tmp:
    (tmp / "config.json").write_text('{"model_type": "comet", "version": "new"}')
    (tmp / "model.safetensors").write_bytes(b"n" * 4096)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "x").write_text("x")
print("finished")
"""


@pytest.mark.parametrize("kill_at", [1, -1, 2, -2, 99])
def test_a_kill_at_any_moment_leaves_the_old_or_the_new_folder(tmp_path, kill_at):
    """SIGKILL before/after each rename and in the middle of deleting the old folder: old or new survives."""
    import subprocess
    import sys
    from pathlib import Path

    from convert.atomic import recover

    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text('{"model_type": "comet", "version": "old"}')
    (target / "model.safetensors").write_bytes(b"o" * 4096)
    (target / "sub").mkdir()  # the old folder has a subfolder, so removing it takes several steps
    (target / "sub" / "x").write_text("x")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(script), str(target), str(kill_at)], cwd=repo, capture_output=True,
                          text=True, env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert done.returncode == -9, done.stderr  # it really was killed
    recover(target)  # what the next run does first
    version = json.loads((target / "config.json").read_text())["version"]
    assert version in ("old", "new")
    assert (target / "model.safetensors").read_bytes() == (version[0].encode() * 4096)
    assert (target / "sub" / "x").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killer.py", "out"]
    assert not (target / ".comet-atomic-write.json").exists()


def test_check_replaceable_edge_cases(tmp_path):
    from convert.atomic import check_replaceable, is_checkpoint_folder

    check_replaceable(tmp_path / "missing")  # nothing there: fine
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")  # an empty folder loses nothing
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        check_replaceable(tmp_path / "file.txt")
    check_replaceable(tmp_path / "file.txt", overwrite=True)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text('{"model_type": "comet"}')
    (ours / "model.safetensors").write_bytes(b"")
    assert is_checkpoint_folder(ours)
    (tmp_path / "link").symlink_to(ours, target_is_directory=True)
    with pytest.raises(FileExistsError):
        check_replaceable(tmp_path / "link")  # a link is never followed into a replace
    (ours / "runs").mkdir()  # a subfolder: not only checkpoint files any more
    assert not is_checkpoint_folder(ours)
    (ours / "runs").rmdir()
    (ours / "config.json").write_text('{"model_type": "llama"}')
    assert not is_checkpoint_folder(ours) and is_checkpoint_folder(ours, ("llama",))
    (ours / "config.json").write_text("{broken")
    assert not is_checkpoint_folder(ours)
