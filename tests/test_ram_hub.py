"""RAM as a Hub model: base -> RAM conversion, AutoModel, activation checkpointing, device-map metadata, and the
transformers floor the model files check."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from convert.publish import blocked_import_preamble
from convert.to_ram import build_ram, check_parity, convert, map_base_key, map_state_dict
from modeling_comet.modeling_ram import RamForCausalLM, RamModel
from modeling_comet.requirements import MIN_TRANSFORMERS_VERSION, check_transformers_version
from tests.test_publish import tiny_tokenizer

VOCAB = 96


def tiny_base(tie=True):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie, pad_token_id=0,
                         bos_token_id=2, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def base_folder(tmp_path):
    folder = tmp_path / "base"
    tiny_base().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_key_table_maps_decoder_and_encoder_copies_and_refuses_strays():
    assert map_base_key("model.embed_tokens.weight", 2) == ["decoder.model.embed_tokens.weight"]
    assert map_base_key("lm_head.weight", 2) == ["decoder.lm_head.weight"]
    assert map_base_key("model.layers.0.self_attn.q_proj.weight", 1) == [
        "decoder.model.layers.0.self_attn.q_proj.weight", "encoder_layers.0.self_attn.q_proj.weight"]
    with pytest.raises(KeyError, match="no entry in the RAM key table"):
        map_base_key("transformer.h.0.attn.c_attn.weight", 1)
    base = tiny_base(tie=False)
    model = RamForCausalLM.from_base(base, encoder_layers=2, segment_size=4)
    state = model.state_dict()
    mapped = map_state_dict(base.state_dict(), state, 2, tied=False)
    assert set(state) - set(mapped) == {"alignment.weight", "alignment.bias"}
    partial = {k: v for k, v in base.state_dict().items() if k != "model.norm.weight"}
    with pytest.raises(KeyError, match="no base weight.*decoder.model.norm.weight"):
        map_state_dict(partial, state, 2, tied=False)


@pytest.mark.parametrize("tie", [True, False])
def test_build_ram_equals_from_base_and_passes_parity(tie):
    base = tiny_base(tie)
    built = build_ram(base, encoder_layers=2, segment_size=4, keep_ratio=0.5)
    reference = RamForCausalLM.from_base(base, encoder_layers=2, segment_size=4, keep_ratio=0.5)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(built.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert check_parity(base, built, VOCAB) < 1e-4
    assert built.config.keep_ratio == 0.5  # restored after the keep-all check
    with torch.no_grad():
        built.decoder.model.norm.weight.mul_(2)
    with pytest.raises(RuntimeError, match="differ from the base"):
        check_parity(base, built, VOCAB)


def test_convert_writes_a_loadable_ram_checkpoint_with_pipeline_and_card(base_folder, tmp_path):
    out = convert(base_folder, tmp_path / "ram", encoder_layers=2, segment_size=4, keep_ratio=0.5)
    names = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_ram.py", "pipeline_ram.py", "requirements.py",
            "tokenizer.json", "chat_template.jinja", "README.md"} <= names
    assert not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ram" and config["encoder_layers"] == 2
    assert "ram-question-answering" in config["custom_pipelines"]
    assert "| keep_ratio | 0.5 |" in (out / "README.md").read_text()
    convert(base_folder, out, encoder_layers=2, segment_size=4, keep_ratio=0.25)  # replaces its own checkpoint
    assert json.loads((out / "config.json").read_text())["keep_ratio"] == 0.25
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    base = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    context, question = torch.randint(3, VOCAB, (1, 16)), torch.randint(3, VOCAB, (1, 3))
    model.config.keep_ratio = 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(context_ids=context, question_ids=question).logits,
                                   base(torch.cat([context, question], 1)).logits, atol=1e-5, rtol=0)


def test_convert_refuses_a_missing_base_and_bad_fields_without_writing(tmp_path, base_folder):
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "absent", tmp_path / "out")
    with pytest.raises(ValueError, match="keep_ratio"):
        convert(base_folder, tmp_path / "out", keep_ratio=0)
    assert not (tmp_path / "out").exists()
    user_folder = tmp_path / "notes"
    user_folder.mkdir()
    (user_folder / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a checkpoint this tool wrote"):
        convert(base_folder, user_folder, encoder_layers=1, segment_size=4)
    with pytest.raises(FileExistsError, match="contains the source"):
        convert(base_folder, tmp_path, encoder_layers=1, segment_size=4, overwrite=True)
    assert (user_folder / "todo.txt").read_text() == "keep me"


def test_auto_model_loads_the_causal_lm_checkpoint_as_backbone(tmp_path):
    ram = RamForCausalLM.from_base(tiny_base(tie=False), encoder_layers=1, segment_size=4).eval()
    ram.save_pretrained(tmp_path)
    backbone = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(backbone).__name__ == "RamModel"
    context, question = torch.randint(3, VOCAB, (2, 13)), torch.randint(3, VOCAB, (2, 3))
    with torch.no_grad():
        hidden = backbone(context_ids=context, question_ids=question, output_hidden_states=True)
        full = ram(context_ids=context, question_ids=question, output_hidden_states=True)
    torch.testing.assert_close(hidden.last_hidden_state, full.hidden_states[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.relevance_scores, full.relevance_scores)
    local = RamModel.from_pretrained(tmp_path)
    assert ram.base_model is ram.decoder and local.base_model is local.decoder


def test_no_split_modules_and_activation_checkpointing_give_the_same_gradients():
    ram = RamForCausalLM.from_base(tiny_base(), encoder_layers=2, segment_size=4, keep_ratio=0.5)
    assert set(ram._no_split_modules) == {"LlamaDecoderLayer"}
    assert ram.supports_gradient_checkpointing
    context, question = torch.randint(3, VOCAB, (2, 16)), torch.randint(3, VOCAB, (2, 3))
    answer, labels = torch.randint(3, VOCAB, (2, 2)), torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0]])

    def grads():
        ram.zero_grad()
        ram(context_ids=context, question_ids=question, answer_ids=answer, segment_labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in ram.named_parameters() if p.grad is not None}

    ram.train()
    plain = grads()
    ram.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in ram.encoder_layers)
    assert all(layer.gradient_checkpointing for layer in ram.decoder.model.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any(name.startswith("encoder_layers") for name in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_model_files_refuse_an_older_transformers_with_the_floor_in_the_message():
    check_transformers_version(MIN_TRANSFORMERS_VERSION)
    check_transformers_version("6.0.0.dev0")
    with pytest.raises(ImportError, match=rf"needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers 5\.1\.0"):
        check_transformers_version("5.1.0")


def test_floor_is_the_same_in_pyproject_and_model_files():
    import re
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    floor = re.search(r'"transformers>=([\d.]+)', pyproject).group(1)
    assert tuple(map(int, floor.split("."))) + (0,) * (3 - len(floor.split("."))) == tuple(
        map(int, MIN_TRANSFORMERS_VERSION.split(".")))


def test_checkpoint_code_stops_on_an_older_transformers_with_the_version_to_install(tmp_path):
    RamForCausalLM.from_base(tiny_base(), encoder_layers=1, segment_size=4).save_pretrained(tmp_path / "ram")
    script = blocked_import_preamble() + textwrap.dedent(
        f"""
        import transformers
        transformers.__version__ = "5.1.0"  # what an older installation reports
        from transformers import AutoConfig
        try:
            AutoConfig.from_pretrained({str(tmp_path / "ram")!r}, trust_remote_code=True)
        except ImportError as error:
            print("IMPORT-ERROR", error)
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"IMPORT-ERROR This model's code needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers 5.1.0" in (
        result.stdout)
