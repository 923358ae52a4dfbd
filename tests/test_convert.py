"""Conversion of a base checkpoint folder into a CoMeT folder."""

import json

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


@pytest.fixture
def base_folder(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    folder = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer(96).save_pretrained(folder)
    return folder


def test_convert_writes_a_loadable_checkpoint_with_card(base_folder, tmp_path):
    out = convert(base_folder, tmp_path / "comet", chunk_size=16, global_mem_size=4, temp_beacon_stride=4,
                  temp_mem_budget=8)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_comet.py", "README.md", "tokenizer.json"} <= names
    assert not list(tmp_path.glob("comet.tmp-*"))  # the temporary folder was renamed, not left behind
    config = json.loads((out / "config.json").read_text())
    assert config["chunk_size"] == 16 and config["auto_map"]["AutoModelForCausalLM"] == "modeling_comet.CometForCausalLM"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "base_model:" in card and "| chunk_size | 16 |" in card
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
