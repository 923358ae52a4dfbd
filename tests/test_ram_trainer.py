import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from modeling_comet.modeling_ram import RamForCausalLM, multi_positive_contrastive_loss
from training.ram_config import RamTrainingConfig
from training.ram_trainer import RamDataCollator, RamTrainer, apply_finetuning, main, prepare_ram_example

VOCAB = 64


def tiny_ram(vocab_size=VOCAB, **fields):
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=vocab_size, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
        )
    )
    fields = {"encoder_layers": 1, "segment_size": 4, "keep_ratio": 0.5, "contrastive_temperature": 0.1, **fields}
    return RamForCausalLM.from_base(base, **fields)


def toy_features(count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(count):
        features.append({
            "context_ids": torch.randint(3, VOCAB, (16,), generator=generator).tolist(),
            "question_ids": torch.randint(3, VOCAB, (3,), generator=generator).tolist(),
            "answer_ids": torch.randint(3, VOCAB, (2,), generator=generator).tolist() + [2],
            "segment_labels": [0, 0, 1, 0],
        })
    return features


def training_args(tmp_path, **overrides):
    values = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "learning_rate": 5e-3,
        "max_steps": 30, "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True,
        "finetuning": "full", "lr_scheduler_type": "constant", "seed": 0,
    }
    values.update(overrides)
    return RamTrainingConfig(**values)


def test_contrastive_loss_equals_hand_computation():
    scores = torch.tensor([[0.9, 0.1, -0.2, 0.5], [0.3, 0.2, 0.0, 0.0], [0.1, 0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    positives = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # row 3: no positive
    tau = 0.1
    row0 = -math.log((math.exp(0.9 / tau) + math.exp(0.5 / tau)) / sum(math.exp(s / tau) for s in (0.9, 0.1, -0.2, 0.5)))
    row1 = -math.log(math.exp(0.2 / tau) / (math.exp(0.3 / tau) + math.exp(0.2 / tau)))
    loss = multi_positive_contrastive_loss(scores, positives, mask, tau)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert multi_positive_contrastive_loss(scores, torch.zeros_like(mask), mask, tau) is None


def test_trainer_loss_is_answer_nll_plus_weighted_contrastive(tmp_path):
    model = tiny_ram(contrastive_weight=0.5)
    batch = RamDataCollator(pad_token_id=0)(toy_features(2))
    trainer = RamTrainer(model=model, args=training_args(tmp_path), data_collator=RamDataCollator(0))
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)

    # NLL by hand: the decoder predicts each answer token from the position before it
    logits, answer = outputs.logits, batch["answer_ids"]
    length = answer.shape[1]
    predicted = logits[:, -length - 1 : -1]  # batch is left-padded, answers fill the last columns
    nll = F.cross_entropy(predicted.reshape(-1, VOCAB), answer.reshape(-1))
    torch.testing.assert_close(outputs.nll_loss, nll)
    contrastive = multi_positive_contrastive_loss(
        outputs.relevance_scores, batch["segment_labels"] == 1, outputs.segment_mask, 0.1
    )
    torch.testing.assert_close(outputs.contrastive_loss, contrastive)
    torch.testing.assert_close(loss, nll + 0.5 * contrastive)


def test_short_full_run_lowers_loss_and_updates_parameters(tmp_path):
    model = tiny_ram()
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer = RamTrainer(
        model=model, args=training_args(tmp_path), train_dataset=toy_features(4), data_collator=RamDataCollator(0)
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert any("contrastive_loss" in entry for entry in trainer.state.log_history)
    for name in ("encoder_layers.0.self_attn.q_proj.weight", "alignment.weight", "decoder.model.layers.1.mlp.up_proj.weight"):
        assert not torch.equal(before[name], dict(model.named_parameters())[name]), name


def test_lora_trains_adapters_encoder_and_alignment_only(tmp_path):
    model = apply_finetuning(tiny_ram(), training_args(tmp_path, finetuning="lora"))
    named = dict(model.named_parameters())
    trainable = {name for name, parameter in named.items() if parameter.requires_grad}
    assert any("lora_A" in name and "decoder" in name for name in trainable)
    assert any("encoder_layers" in name for name in trainable) and any("alignment" in name for name in trainable)
    assert not any("lora" in name and "encoder_layers" in name for name in named)  # LoRA only on the decoder
    assert not any(name.endswith("decoder.model.layers.0.self_attn.q_proj.base_layer.weight") for name in trainable)
    before = {name: named[name].detach().clone() for name in trainable}
    frozen = "base_model.model.decoder.model.layers.0.mlp.up_proj.weight"
    frozen_before = named[frozen].detach().clone()
    trainer = RamTrainer(
        model=model, args=training_args(tmp_path, finetuning="lora", max_steps=5),
        train_dataset=toy_features(4), data_collator=RamDataCollator(0),
    )
    trainer.train()
    changed = {name for name in trainable if not torch.equal(before[name], dict(model.named_parameters())[name])}
    assert any("lora_B" in name for name in changed) and any("alignment" in name for name in changed)
    assert torch.equal(frozen_before, dict(model.named_parameters())[frozen])


def test_bad_training_config_raises(tmp_path):
    with pytest.raises(ValueError, match="finetuning"):
        training_args(tmp_path, finetuning="qlora")
    with pytest.raises(ValueError, match="question_template"):
        training_args(tmp_path, question_template="Q:")


def smollm2_tokenizer():
    from convert.smollm2 import smollm2_path

    folder = smollm2_path()  # converts the embedded GGUF on first use
    return folder, AutoTokenizer.from_pretrained(folder)


def test_nq_jsonl_end_to_end_with_main(tmp_path):
    folder, tokenizer = smollm2_tokenizer()
    examples = [
        {
            "question": "What colour is the door?",
            "answers": ["crimson"],
            "ctxs": [{"title": "House", "text": "The garden is wide and green. " * 4}, {"title": "Door", "text": "The door is crimson."}],
        },
        {"question": "Who built it?", "answers": ["Ada"], "ctxs": [{"text": "Ada built the mill by the river."}]},
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(example) for example in examples))
    config = training_args(tmp_path, segment_size=8)
    first = prepare_ram_example(examples[0], tokenizer, config, segment_size=8)
    segments = [first["context_ids"][start : start + 8] for start in range(0, len(first["context_ids"]), 8)]
    expected = ["crimson" in tokenizer.decode(segment) for segment in segments]
    assert first["segment_labels"] == [int(flag) for flag in expected] and sum(expected) >= 1
    assert first["answer_ids"][-1] == tokenizer.eos_token_id

    # a tiny base with the real tokenizer's vocabulary, trained for two steps through the CLI entry point
    base_folder = tmp_path / "tiny-base"
    tiny_ram(vocab_size=len(tokenizer)).decoder.save_pretrained(base_folder)
    tokenizer.save_pretrained(base_folder)
    out = tmp_path / "trained"
    main([
        "--model_name_or_path", str(base_folder), "--train_file", str(data), "--output_dir", str(out),
        "--encoder_layers", "1", "--segment_size", "8", "--keep_ratio", "0.5", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--finetuning", "encoder", "--report_to", "none", "--use_cpu",
        "--save_strategy", "no",
    ])
    reloaded = RamForCausalLM.from_pretrained(out)
    assert reloaded.config.segment_size == 8 and (out / "model.safetensors").is_file()


def test_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "training.ram_trainer", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--keep_ratio" in result.stdout and "--finetuning" in result.stdout


def test_contrastive_only_run_trains_relevance_and_skips_decoder(tmp_path):
    args = training_args(tmp_path, contrastive_only=True, max_steps=20, finetuning="encoder")
    model = apply_finetuning(tiny_ram(), args)  # decoder (and the embedding table it shares) frozen
    decoder_before = {name: p.detach().clone() for name, p in model.decoder.named_parameters()}
    encoder_before = model.encoder_layers[0].self_attn.q_proj.weight.detach().clone()
    trainer = RamTrainer(
        model=model, args=args,
        train_dataset=toy_features(4), data_collator=RamDataCollator(0),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all("nll_loss" not in entry for entry in logs)
    assert sum(e["loss"] for e in logs[-5:]) < sum(e["loss"] for e in logs[:5])
    assert all(torch.equal(decoder_before[name], p) for name, p in model.decoder.named_parameters())
    assert not torch.equal(encoder_before, model.encoder_layers[0].self_attn.q_proj.weight)
