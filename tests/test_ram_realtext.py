"""RAM trained-weights file (`benchmarks.ram_realtext.export` / `load_trained`): a LoRA run with `--encoder_lora`
reloads onto a fresh build with the same outputs, and the file holds only LoRA factors and the alignment."""

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.ram_realtext import export, load_trained
from modeling_comet.modeling_ram import RamForCausalLM
from training.ram_config import RamTrainingConfig
from training.ram_trainer import apply_finetuning


def tiny_base():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        tie_word_embeddings=True)).eval()


def test_exported_weights_reproduce_the_trained_model(tmp_path):
    base = tiny_base()
    fields = {"encoder_layers": 1, "segment_size": 4, "keep_ratio": 0.5, "position_layout": "epl"}
    config = RamTrainingConfig(output_dir=str(tmp_path / "run"), finetuning="lora", encoder_lora=True, lora_r=4,
                               lora_alpha=8, use_cpu=True, report_to=[])
    model = apply_finetuning(RamForCausalLM.from_base(base, **fields), config)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any("encoder_layers.0.mlp.up_proj.lora_A" in name for name in trainable)
    assert not any("encoder_layers" in name and "lora" not in name for name in trainable)  # the copy stays frozen
    with torch.no_grad():  # stand-in for training: move every trainable weight
        generator = torch.Generator().manual_seed(1)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.eval()
    run = tmp_path / "run"
    model.save_pretrained(run / "adapter")
    model.get_base_model().config.save_pretrained(run)

    path = export(run, tmp_path / "ram.safetensors")
    tensors = load_file(path)
    assert set(tensors) >= {"alignment.weight", "alignment.bias"}
    assert all(key.startswith("alignment.") or ".lora_" in key for key in tensors)
    loaded, meta = load_trained(path, base=base)
    assert meta["ram"] == fields and meta["lora"] == {"r": 4, "alpha": 8}

    generator = torch.Generator().manual_seed(2)
    context, question = torch.randint(3, 64, (1, 16), generator=generator), torch.randint(3, 64, (1, 3), generator=generator)
    with torch.no_grad():
        expected = model(context_ids=context, question_ids=question).logits
        untrained = RamForCausalLM.from_base(base, **fields).eval()(context_ids=context, question_ids=question).logits
        actual = loaded(context_ids=context, question_ids=question).logits
    assert not torch.allclose(expected, untrained, atol=1e-3)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
