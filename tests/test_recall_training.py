"""Recall training: the data generators, the curriculum, the loss options, and gradients through the memory."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_comet import CometForCausalLM
from training.recall_data import (
    REPEAT_SENTENCES,
    FillerStream,
    MixedFiller,
    RecallCollator,
    RecallCurriculum,
    RecallSampleBuilder,
    RepeatedFiller,
    answer_accuracy,
    recall_dataset,
)


class WordTokenizer:
    """Whitespace-and-punctuation tokenizer over a growing vocabulary; digits are single tokens, as in SmolLM2."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.inverse: dict[int, str] = {}

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = len(self.vocab) + 3
            self.inverse[self.vocab[piece]] = piece
        return self.vocab[piece]

    def __call__(self, text, add_special_tokens=False):
        pieces, word = [], ""
        for ch in text:
            if ch.isalpha():
                word += ch
                continue
            if word:
                pieces.append(word)
                word = ""
            if not ch.isspace():
                pieces.append(ch)
        if word:
            pieces.append(word)
        ids = ([self.bos_token_id] if add_special_tokens else []) + [self._id(p) for p in pieces]
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids):
        return " ".join(self.inverse.get(i, "<s>") for i in ids)


PROSE = " ".join(f"sentence number {w} says nothing at all ." for w in ["one", "two", "three", "four", "five"] * 60)


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer()


@pytest.fixture(scope="module")
def stream(tokenizer):
    return FillerStream.from_texts([PROSE], tokenizer)


def key_positions(ids, key_ids):
    n = len(key_ids)
    return [i for i in range(len(ids) - n + 1) if ids[i : i + n] == key_ids]


@pytest.mark.parametrize("task", ["passkey", "associative"])
def test_asked_facts_sit_at_the_requested_distance(tokenizer, stream, task):
    C = 64
    builder = RecallSampleBuilder(tokenizer, stream, chunk_size=C, task=task, num_chunks=(4, 6), num_keys=3,
                                  num_queries=2, boundary_fraction=0.5)
    for seed in range(20):
        distance = seed % 4
        row = builder.build(random.Random(seed), max_distance=distance, min_distance=distance)
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) == len(row["label_weights"])
        first_answer = row["answer_spans"][0][0]
        question_chunk = (first_answer - 1) // C
        for start, end in row["answer_spans"]:
            answer = ids[start:end]
            assert labels[start:end] == answer
            digits = [t for t in answer if tokenizer.inverse[t].isdigit()]
            assert len(digits) == 5
            # The answer's digits occur earlier in the input only in the planted fact (a passkey fact says it twice).
            where = key_positions(ids[: first_answer - 1], digits)
            assert 1 <= len(where) <= 2 and where[-1] - where[0] < 20
            assert question_chunk - where[0] // C == distance
        # Only the answers are labelled and their weights sum to one.
        assert sum(row["label_weights"]) == pytest.approx(1.0)
        assert all((lab == -100) == (w == 0) for lab, w in zip(labels, row["label_weights"], strict=True))


def test_boundary_fraction_makes_the_answer_cross_a_chunk_boundary(tokenizer, stream):
    C = 32
    always = RecallSampleBuilder(tokenizer, stream, chunk_size=C, num_chunks=(3, 3), boundary_fraction=1.0)
    never = RecallSampleBuilder(tokenizer, stream, chunk_size=C, num_chunks=(3, 3), boundary_fraction=0.0)
    folds_after = set()
    for seed in range(30):
        start, end = always.build(random.Random(seed), 1)["answer_spans"][0]
        assert start <= 3 * C < end  # the window folds inside the answer (or right before it)
        folds_after.add(3 * C - start)
        assert never.build(random.Random(seed), 1)["answer_spans"][0][0] % C != 0
    assert 0 in folds_after and len(folds_after) > 2  # both a fresh window for the whole answer and mid-answer folds


def test_lead_chunks_put_filler_before_the_farthest_fact(tokenizer, stream):
    C = 32
    builder = RecallSampleBuilder(tokenizer, stream, chunk_size=C, num_chunks=(2, 2), lead_chunks=(2, 3),
                                  boundary_fraction=0.0)
    leads = set()
    for seed in range(20):
        row = builder.build(random.Random(seed), max_distance=3, min_distance=3)
        ids, first_answer = row["input_ids"], row["answer_spans"][0][0]
        digits = [t for t in ids[first_answer:row["answer_spans"][0][1]] if tokenizer.inverse[t].isdigit()]
        fact_chunk = key_positions(ids[: first_answer - 1], digits)[0] // C
        assert (first_answer - 1) // C - fact_chunk == 3  # the distance is unchanged
        leads.add(fact_chunk)
    assert leads == {2, 3}  # 2 or 3 chunks of filler before the fact (without them it would sit in chunk 0)
    with pytest.raises(ValueError, match="lead_chunks"):
        RecallSampleBuilder(tokenizer, stream, chunk_size=C, lead_chunks=(2, 1))


def test_repeated_filler_tiles_a_few_sentences_and_mixes_with_prose(tokenizer, stream):
    repeated = RepeatedFiller.from_tokenizer(tokenizer, [" One two three.", " Four five.", " Six."], max_period=2)
    sentences = {tuple(s) for s in repeated.sentences}
    periods = {a + b for a in sentences for b in sentences if a != b} | sentences
    for seed in range(20):
        ids = repeated.take(random.Random(seed), 50)
        assert len(ids) == 50
        # one or two of the sentences (at most 4 + 3 tokens) repeated from a random offset into them
        period = next(p for p in range(1, 8) if ids[p:] == ids[:-p])
        assert any(tuple(ids[i : i + period]) in periods for i in range(period))
    # the default sentences are not the passkey evaluation's filler, which must stay unseen in training
    from evaluation.passkey import FILLER

    assert not any(s.strip() in FILLER for s in REPEAT_SENTENCES)
    mixed = MixedFiller(stream, repeated, repeat_fraction=0.5)
    repeat_tokens = {t for s in sentences for t in s}
    kinds = {set(mixed.take(random.Random(seed), 12)) <= repeat_tokens for seed in range(40)}
    assert kinds == {True, False}  # both sources are drawn
    builder = RecallSampleBuilder(tokenizer, MixedFiller(stream, repeated, repeat_fraction=1.0), chunk_size=32,
                                  num_chunks=(3, 3), boundary_fraction=0.0)
    row = builder.build(random.Random(0), 1)
    assert set(row["input_ids"]) - repeat_tokens  # the prefix, fact and question are still there
    # repetitive filler: no loss and no distillation on the text, only on the question and answer
    builder.lm_loss_weight = 0.5
    for seed in range(5):
        row = builder.build(random.Random(seed), 1)
        mask, answer_start = row["distill_mask"], row["answer_spans"][0][0]
        question_start = mask.index(1)  # zeros over the instruction and the filler, ones from the question on
        assert set(mask[question_start:]) == {1} and question_start > 32 and 0 < answer_start - question_start <= 15
        assert [i for i, lab in enumerate(row["labels"]) if lab != -100] == list(range(*row["answer_spans"][0]))
    prose_row = RecallSampleBuilder(tokenizer, stream, chunk_size=32, num_chunks=(3, 3)).build(random.Random(0), 1)
    assert set(prose_row["distill_mask"]) == {1}
    batch = RecallCollator(pad_token_id=0)([row, prose_row])
    assert batch["distill_mask"].shape == batch["input_ids"].shape
    assert batch["distill_mask"][1].sum() == len(prose_row["input_ids"])  # padding is 0, prose all 1
    assert "distill_mask" not in RecallCollator(pad_token_id=0)([prose_row])  # prose-only batches do not carry it
    with pytest.raises(ValueError, match="repeat_fraction"):
        MixedFiller(stream, repeated, repeat_fraction=1.5)
    with pytest.raises(ValueError, match="max_period"):
        RepeatedFiller.from_tokenizer(tokenizer, [" One."], max_period=2)


def test_lm_loss_weight_and_lm_samples(tokenizer, stream):
    builder = RecallSampleBuilder(tokenizer, stream, chunk_size=32, num_chunks=(3, 3), lm_loss_weight=0.25)
    row = builder.build(random.Random(0), 1)
    answer = {i for s, e in row["answer_spans"] for i in range(s, e)}
    text_weight = sum(w for i, w in enumerate(row["label_weights"]) if i not in answer)
    assert text_weight == pytest.approx(0.25)
    assert all(row["labels"][i] == row["input_ids"][i] for i in range(1, len(row["labels"])))
    lm_only = RecallSampleBuilder(tokenizer, stream, chunk_size=32, num_chunks=(2, 2), lm_fraction=1.0)
    row = lm_only.build(random.Random(0), 1)
    assert row["labels"] == row["input_ids"] and row["answer_spans"] == [] and len(row["input_ids"]) == 64


def test_builder_rejects_bad_settings(tokenizer, stream):
    with pytest.raises(ValueError, match="task"):
        RecallSampleBuilder(tokenizer, stream, chunk_size=32, task="copy")
    with pytest.raises(ValueError, match="num_chunks"):
        RecallSampleBuilder(tokenizer, stream, chunk_size=32, num_chunks=(4, 2))
    with pytest.raises(ValueError, match="num_queries"):
        RecallSampleBuilder(tokenizer, stream, chunk_size=32, task="associative", num_keys=2, num_queries=3)
    with pytest.raises(ValueError, match="at least 1024"):
        FillerStream.from_texts(["too short"], tokenizer)


def test_curriculum_by_schedule_and_by_accuracy_and_its_saved_state():
    schedule = RecallCurriculum([1, 2, 4], mode="schedule", stage_steps=10)
    for step, expected in [(0, 1), (9, 1), (10, 2), (25, 4), (1000, 4)]:
        schedule.on_step_begin(None, SimpleNamespace(global_step=step), None)
        assert schedule.max_distance == expected
    accuracy = RecallCurriculum([1, 2, 4], mode="accuracy", threshold=0.9, window=3)
    for value in [1.0, 1.0, 0.5, 1.0, 1.0]:  # no full window of three has a mean of 0.9 yet
        accuracy.record(value)
        assert accuracy.stage == 0
    accuracy.record(1.0)
    assert accuracy.stage == 1 and accuracy.max_distance == 2 and not accuracy.recent
    accuracy.record(0.25)
    restored = RecallCurriculum.from_state(accuracy.state())
    assert restored.stage == 1 and list(restored.recent) == list(accuracy.recent)
    with pytest.raises(ValueError, match="non-decreasing"):
        RecallCurriculum([4, 2])


def test_dataset_rows_depend_on_index_and_stage_only(tokenizer, stream):
    builder = RecallSampleBuilder(tokenizer, stream, chunk_size=32, num_chunks=(3, 4))
    curriculum = RecallCurriculum([0, 2], mode="schedule", stage_steps=5)
    data = recall_dataset(builder, curriculum, num_rows=8, seed=3)
    first = data[2]
    assert data[2] == first
    curriculum.stage = 1
    assert data[2] != first


def test_collator_left_pads_and_answer_accuracy():
    import doctest

    import training.recall_data as module

    assert doctest.testmod(module).failed == 0
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "label_weights": [0, 0, 0.5, 0.5], "answer_spans": [[2, 4]]},
        {"input_ids": [9, 8], "labels": [-100, 8], "label_weights": [0, 1.0], "answer_spans": [[1, 2]]},
    ]
    batch = RecallCollator(pad_token_id=0)(rows)
    tail = batch["answer_tail"]
    assert tail == 3
    logits = torch.zeros(2, tail, 10)
    # Row 0 predicts columns 2, 3 from columns 1, 2; row 1 (padded by 2) predicts column 3 from column 2.
    logits[0, 0, 7] = logits[0, 1, 8] = 1.0
    logits[1, 1, 3] = 1.0  # wrong
    token_acc, exact = answer_accuracy(logits, batch["input_ids"], batch["answer_spans"], tail)
    assert token_acc == pytest.approx(2 / 3) and exact == pytest.approx(0.5)


def tiny_llama(vocab=32, layers=2, hidden=32, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    ).eval()


def test_label_weights_give_the_weighted_mean_of_token_losses():
    model = CometForCausalLM.from_base(tiny_llama(), chunk_size=8, global_mem_size=2, temp_beacon_stride=4,
                                       temp_mem_budget=4).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32, (2, 20), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    weights = torch.rand(2, 20, generator=g)
    with torch.no_grad():
        out = model(ids, labels=labels, label_weights=weights)
        logits = model(ids).logits
    token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none", ignore_index=-100)
    w = weights[:, 1:].flatten() * (labels[:, 1:].flatten() != -100)
    torch.testing.assert_close(out.loss, (token_loss * w).sum() / w.sum(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="label_weights"):
        model(ids, label_weights=weights)


def test_temp_budget_zero_without_global_memory_reads_every_chunk_alone():
    """With the global memory ablated and no temporary entry visible, nothing crosses chunks: each chunk gives
    the base model's logits on that chunk alone; the full budget lets earlier chunks in."""
    base = tiny_llama()
    model = CometForCausalLM.from_base(base, chunk_size=8, global_mem_size=0, temp_beacon_stride=4, temp_mem_budget=4)
    model.eval()
    ids = torch.randint(3, 32, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = torch.cat([base(ids[:, s : s + 8]).logits for s in range(0, 24, 8)], dim=1)
        torch.testing.assert_close(model(ids, temp_budget=0).logits, alone, atol=1e-5, rtol=0)
        full = model(ids, temp_budget=4).logits
        torch.testing.assert_close(full, model(ids, use_cache=False).logits, atol=0, rtol=0)
        assert (full[:, 8:] - alone[:, 8:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="temp_budget"):
        model(ids, temp_budget=5)


def test_answer_loss_falls_only_through_the_global_memory():
    """Gradients flow through the gated global memory: the first chunk shows a symbol, two chunks of random
    filler follow (temporary memory off: the global memory is the only path), and the model must name the
    symbol at the end. Without the memory, no loss below ln(#symbols) is possible; training gets well below it,
    and swapping the first chunks across the batch sends the loss back up."""
    symbols, C = 4, 8
    torch.manual_seed(0)
    model = CometForCausalLM.from_base(tiny_llama(), chunk_size=C, global_mem_size=2, temp_beacon_stride=-1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n=32):
        key = torch.randint(3, 3 + symbols, (n,), generator=g)
        ids = torch.randint(3 + symbols, 32, (n, 4 * C), generator=g)
        ids[:, :C] = key[:, None]  # chunk 0: the symbol, repeated
        ids[:, -2] = 2  # the question marker, then the answer
        ids[:, -1] = key
        labels = torch.full_like(ids, -100)
        labels[:, -1] = key
        return ids, labels

    model.train()
    for _ in range(150):
        ids, labels = batch()
        loss = model(ids, labels=labels, logits_to_keep=2).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    ids, labels = batch(256)
    with torch.no_grad():
        trained = model(ids, labels=labels, logits_to_keep=2).loss.item()
        swapped = ids.clone()
        swapped[:, :C] = ids.roll(1, dims=0)[:, :C]
        mismatched = model(swapped, labels=labels, logits_to_keep=2).loss.item()
    assert trained < 0.5 * math.log(symbols), trained
    assert mismatched > math.log(symbols), mismatched


def test_distillation_scores_every_token_after_the_first_chunk_against_the_teacher():
    """The KL and hidden-state terms cover exactly each row's tokens after its own first chunk (left padding
    included), equal a direct computation from the two models' outputs, and teach the memory: their gradient
    reaches the memory parameters, and a few memory-only steps on them alone lower the KL."""
    from training.comet_trainer import distillation_losses

    C = 8
    base = tiny_llama()
    model = CometForCausalLM.from_base(tiny_llama(), chunk_size=C, global_mem_size=2, temp_beacon_stride=-1)
    ids = torch.randint(3, 32, (2, 3 * C), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded: its first chunk ends at column 3 + C
    inputs = {"input_ids": ids, "attention_mask": mask}
    out, kl, cosine = distillation_losses(model, base, inputs, C, hidden=True)

    with torch.no_grad():
        student = model(ids, attention_mask=mask, output_hidden_states=True)
        teacher = base(ids, attention_mask=mask, output_hidden_states=True)
    terms, cosines = [], []
    for row, start in ((0, C), (1, 3 + C)):
        p = teacher.logits[row, start:].log_softmax(-1)
        q = student.logits[row, start:].log_softmax(-1)
        terms.append((p.exp() * (p - q)).sum(-1))
        cosines.append(torch.stack([
            1 - F.cosine_similarity(s[row, start:], t[row, start:], dim=-1)
            for s, t in zip(student.hidden_states[1:], teacher.hidden_states[1:], strict=True)
        ]))
    torch.testing.assert_close(kl, torch.cat(terms).mean(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cosine, torch.cat(cosines, dim=1).mean(), atol=1e-5, rtol=1e-4)
    assert kl > 0 and cosine > 0
    # a token mask (repetitive filler) leaves its zeros out: here row 0's last chunk only, and row 1 whole
    token_mask = torch.zeros_like(ids)
    token_mask[0, 2 * C :] = 1
    token_mask[1] = 1
    _, masked_kl, _ = distillation_losses(model, base, inputs, C, hidden=False, token_mask=token_mask)
    torch.testing.assert_close(masked_kl, torch.cat([terms[0][C:], terms[1]]).mean(), atol=1e-5, rtol=1e-4)

    memory = [p for n, p in model.named_parameters() if "comet_memory" in n]
    (kl + cosine).backward()
    assert all(p.grad is not None for p in memory) and any(p.grad.abs().sum() > 0 for p in memory)

    for name, p in model.named_parameters():
        p.requires_grad_("comet_memory" in name)
    optimizer = torch.optim.Adam(memory, lr=1e-2)
    first = float(kl.detach())
    for _ in range(30):
        _, kl, _ = distillation_losses(model, base, inputs, C, hidden=False)
        optimizer.zero_grad()
        kl.backward()
        optimizer.step()
    assert float(kl.detach()) < 0.8 * first, (first, float(kl.detach()))
    with pytest.raises(ValueError, match="longer than one chunk"):
        distillation_losses(model, base, {"input_ids": ids[:, :C]}, C, hidden=False)


def test_trainer_cli_distils_from_the_base_and_needs_a_named_teacher_for_a_saved_comet(tmp_path):
    """`--distill_weight`/`--distill_hidden_weight` train against the base read whole (both terms logged every
    step); a saved CoMeT model has no implied full-attention teacher, so one must be named."""
    from tests.test_convert import save_tiny_base
    from training import comet_trainer

    base = save_tiny_base(tmp_path / "base")
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{(i * 7) % 50 + 3}" for i in range(3000)))
    common = ["--train_files", str(text), "--chunk_size", "8", "--temp_beacon_stride", "4", "--temp_mem_budget", "4",
              "--sample_tokens", "32", "--report_to", "none", "--use_cpu", "--logging_steps", "1", "--save_steps", "1000",
              "--learning_rate", "3e-3", "--memory_lr_multiplier", "3", "--finetuning", "memory", "--eval_samples", "1"]
    out = tmp_path / "run"
    comet_trainer.main(["--model_name_or_path", str(base), "--output_dir", str(out), "--max_steps", "25",
                        "--distill_weight", "1", "--distill_hidden_weight", "1", *common])
    state = json.loads((out / "trainer_state.json").read_text()) if (out / "trainer_state.json").exists() else None
    history = state["log_history"] if state else []
    if not history:  # the final trainer state is written inside the last checkpoint
        history = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())["log_history"]
    kls = [row["distill_kl"] for row in history if "distill_kl" in row]
    assert len(kls) == 25 and all("distill_hidden" in row for row in history if "distill_kl" in row)
    assert all(value > 0 for value in kls), kls

    with pytest.raises(ValueError, match="--distill_teacher"):
        comet_trainer.main(["--model_name_or_path", str(out), "--output_dir", str(tmp_path / "again"), "--max_steps", "1",
                            "--distill_weight", "1", *common])


def test_init_trained_weights_continues_lora_of_the_same_shape_and_merges_other_factors(tmp_path):
    """A run started from a trained-weights file behaves as the model that wrote it: with LoRA of the file's rank,
    alpha and modules the factors go into the new adapter (so its export holds the whole change), otherwise they
    are merged into the base under a fresh adapter."""
    from convert.trained_weights import save_trained_weights
    from tests.test_convert import save_tiny_base
    from training.comet_trainer import build_model, parse_config

    base = save_tiny_base(tmp_path / "base")
    common = ["--model_name_or_path", str(base), "--chunk_size", "8", "--temp_beacon_stride", "4", "--temp_mem_budget",
              "4", "--finetuning", "lora", "--lora_r", "4", "--lora_alpha", "8", "--output_dir", str(tmp_path / "o")]
    trained, _ = build_model(parse_config([*common, "--lora_target_modules", "q_proj,v_proj"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for param in trained.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=g))
    path = save_trained_weights(trained, tmp_path / "trained.safetensors")
    ids = torch.randint(3, 60, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained.eval()(input_ids=ids, use_cache=False).logits
    for targets, continued in (("q_proj,v_proj", True), ("q_proj,k_proj,v_proj", True), ("q_proj", False)):
        model, _ = build_model(parse_config([*common, "--lora_target_modules", targets, "--init_trained_weights",
                                             str(path)]))
        factor = dict(model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
        assert bool(factor.abs().sum() > 0) == continued, targets
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(input_ids=ids, use_cache=False).logits, expected,
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("finetuning", ["lora", "memory"])
def test_freeze_memory_modules_keeps_the_named_modules_fixed(tmp_path, finetuning):
    from tests.test_convert import save_tiny_base
    from training.comet_trainer import build_model, parse_config

    base = save_tiny_base(tmp_path / "base")
    common = ["--model_name_or_path", str(base), "--chunk_size", "8", "--temp_beacon_stride", "4", "--temp_mem_budget",
              "4", "--finetuning", finetuning, "--output_dir", str(tmp_path / "o")]  # fmt: skip
    model, _ = build_model(parse_config([*common, "--freeze_memory_modules", "temp_adapter,gate"]))
    # (PEFT keeps a frozen `original_module` copy beside the trained one)
    memory = {n: p.requires_grad for n, p in model.named_parameters()
              if "comet_memory" in n and "original_module" not in n}  # fmt: skip
    frozen = {n for n, trains in memory.items() if not trains}
    assert frozen and all(".temp_adapter." in n or ".gate." in n for n in frozen)
    assert any(".temp_adapter." in n for n in frozen) and any(".gate." in n for n in frozen)
    assert any(trains for trains in memory.values())  # the rest of the memory still trains
    with pytest.raises(ValueError, match="no memory module called \\['gates'\\]"):
        build_model(parse_config([*common, "--freeze_memory_modules", "gates"]))
