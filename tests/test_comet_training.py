"""CoMeT training entry points on a tiny model: the loss falls and the memory is updated."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_comet import CometForCausalLM
from training.comet_config import CometTrainingConfig
from training.comet_trainer import CometTrainer, pack_samples


class CharTokenizer:
    """Bytes as tokens: enough for pack_samples."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        class Encoded:
            input_ids = [3 + (b % 120) for b in text.encode()]

        return Encoded()


def test_pack_samples_cuts_exact_lengths():
    data = pack_samples(["abcdefgh", "ij"], CharTokenizer(), 4)  # 8 + eos + 2 + eos = 12 tokens
    code = {c: 3 + ord(c) % 120 for c in "abcdefghij"}
    assert data["input_ids"] == [
        [code[c] for c in "abcd"],
        [code[c] for c in "efgh"],
        [1, code["i"], code["j"], 1],
    ]
    assert data["labels"] == data["input_ids"]


def test_trainer_lowers_loss_and_trains_memory_at_its_own_rate(tmp_path):
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    )
    model = CometForCausalLM.from_base(base, chunk_size=16, global_mem_size=4, temp_beacon_stride=4, temp_mem_budget=8)
    pattern = torch.arange(3, 3 + 48) % 40 + 3  # a repeating sequence the model can learn
    rows = [torch.roll(pattern, i).tolist() for i in range(8)]
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = CometTrainingConfig(
        output_dir=str(tmp_path), max_steps=25, learning_rate=3e-3, per_device_train_batch_size=4,
        report_to="none", save_strategy="no", logging_steps=5, memory_lr_multiplier=5.0, use_cpu=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "comet_memory." in n}
    trainer = CometTrainer(model=model, args=args, train_dataset=data)
    optimizer = trainer.create_optimizer()
    assert [g["lr"] for g in optimizer.param_groups] == [3e-3, 3e-3 * 5.0]
    with torch.no_grad():
        start = model(torch.tensor(rows), labels=torch.tensor(rows)).loss.item()
    trainer.train()
    with torch.no_grad():
        end = model(torch.tensor(rows), labels=torch.tensor(rows)).loss.item()
    assert end < start - 0.5
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("gate" in n for n in changed) and any("readout_embedding" in n for n in changed)


def test_time_budget_stops_the_run_with_a_checkpoint(tmp_path):
    from pathlib import Path

    import pytest

    from training.comet_trainer import TimeBudget

    with pytest.raises(ValueError, match="max_train_minutes"):
        CometTrainingConfig(output_dir=str(tmp_path), max_train_minutes=0, use_cpu=True, report_to="none")
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    )
    model = CometForCausalLM.from_base(base, chunk_size=8, global_mem_size=2, temp_beacon_stride=4, temp_mem_budget=4)
    rows = [[(3 + i + j) % 60 + 3 for j in range(16)] for i in range(4)]
    from datasets import Dataset

    args = CometTrainingConfig(
        output_dir=str(tmp_path), max_steps=500, per_device_train_batch_size=2, report_to="none",
        save_strategy="steps", save_steps=1000, use_cpu=True, max_train_minutes=1e-6,
    )
    trainer = CometTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}),
        callbacks=[TimeBudget(args.max_train_minutes)],
    )
    trainer.train()
    assert trainer.state.global_step == 1  # the budget was spent after the first step
    assert (Path(tmp_path) / "checkpoint-1" / "trainer_state.json").is_file()  # and a checkpoint was written
