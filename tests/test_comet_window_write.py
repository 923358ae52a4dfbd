"""`global_write="window"`: each layer writes its global-memory candidate as a soft choice of `global_mem_size`
consecutive token states of the chunk (the layer's own input states), instead of the readouts' outputs."""

import pytest
import torch

from modeling_comet import CometCache, CometConfig, CometForCausalLM
from tests.test_comet_model import random_ids, tiny_base, tiny_comet


def test_a_sharp_choice_copies_the_window_ending_at_the_chosen_token_and_skips_padding():
    model = tiny_comet(global_write="window")
    memory = model.model.comet_memory.layers[0]
    G = model.config.global_mem_size
    states = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 16, dtype=torch.bool)
    target = 9  # the window of tokens 6..9
    with torch.no_grad():
        memory.select_query.copy_(50 * memory.select_norm(states[0, target]) / memory.select_norm(states[0, target]).norm())
        window, scores = memory.select_window(states, valid, G)
    assert scores.shape == (2, 16 - G + 1) and int(scores[0].argmax()) == target - (G - 1)
    torch.testing.assert_close(window[0], states[0, target - G + 1 : target + 1], atol=1e-4, rtol=0)

    valid[0, 7] = False  # every window holding token 7 (ends 7..10) is excluded, however high its score
    with torch.no_grad():
        masked, _ = memory.select_window(states, valid, G)
    assert (masked[0] - states[0, target - G + 1 : target + 1]).abs().max() > 1e-2
    valid[1] = False  # no complete window at all: the last one, not NaN
    with torch.no_grad():
        fallback, _ = memory.select_window(states, valid, G)
    torch.testing.assert_close(fallback[1], states[1, -G:], atol=1e-6, rtol=0)


def test_the_memory_carries_the_chosen_window_and_the_choice_learns():
    """Beyond one chunk the logits depend on the chosen window (a different query changes them), and the window
    scores reach the loss: the query gets a gradient, and they are recorded when asked (to supervise the choice)."""
    model = tiny_comet(global_write="window", temp_beacon_stride=-1)
    ids = random_ids(1, 40)
    labels = ids.clone()
    out = model(ids, labels=labels)
    out.loss.backward()
    queries = [layer.select_query for layer in model.model.comet_memory.layers]
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in queries)
    with torch.no_grad():
        before = model(ids).logits
        for q in queries:
            q.mul_(-3.0)
        after = model(ids).logits
    torch.testing.assert_close(after[:, :16], before[:, :16])  # the first chunk reads no memory
    assert (after[:, 16:] - before[:, 16:]).abs().max() > 1e-3

    model.model.record_window_scores = True
    with torch.no_grad():
        model(ids, use_cache=False)
    scores = model.model.window_scores
    assert len(scores) == 2 * model.config.base_config.num_hidden_layers  # two folds (tokens 0-15, 16-31), each layer
    assert scores[0].shape == (1, 16 - model.config.global_mem_size + 1)


def test_a_saved_window_state_continues_exactly():
    model = tiny_comet(global_write="window")
    ids = random_ids(1, 50)
    cache = CometCache()
    with torch.no_grad():
        model(ids[:, :37], cache=cache)  # stops part-way through a window: its text states must travel too
        assert len(cache.text_states) == model.config.base_config.num_hidden_layers
        copy = cache.copy()
        whole = model(ids).logits[:, 37:]
        rest = model(ids[:, 37:], cache=copy).logits
    torch.testing.assert_close(rest, whole, atol=1e-5, rtol=0)


def test_bad_window_settings_are_refused():
    base = tiny_base()
    with pytest.raises(ValueError, match="global_write must be one of"):
        CometForCausalLM.from_base(base, chunk_size=16, global_write="pool")
    with pytest.raises(ValueError, match="chunk_size .* >= global_mem_size"):
        CometConfig(base_config=base.config, chunk_size=4, global_mem_size=8, temp_beacon_stride=4,
                    global_write="window")


def test_trainer_supervises_the_window_choice_at_the_planted_fact(tmp_path):
    """`--window_select_weight`: the trainer adds the cross-entropy of every layer's window choice against the window
    ending with the answer where it was planted; a few steps on it alone teach the choice."""
    from training.comet_config import CometTrainingConfig
    from training.comet_trainer import CometTrainer

    model = tiny_comet(global_write="window", temp_beacon_stride=-1)
    for name, param in model.named_parameters():
        param.requires_grad_("select_query" in name)
    ids = random_ids(1, 40, seed=3)
    ids[0, 9:13] = torch.tensor([5, 6, 7, 8])  # the fact, ending at token 12 of chunk 0: window 12 - 3 = 9
    ids[0, 36:40] = torch.tensor([5, 6, 7, 8])  # the answer
    labels = torch.full_like(ids, -100)
    labels[0, 36:] = ids[0, 36:]
    config = CometTrainingConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, task="passkey",
                                 window_select_weight=1.0)
    trainer = CometTrainer(model=model, args=config, window_select_weight=1.0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(15):
        batch = {"input_ids": ids, "labels": labels, "answer_spans": [[(36, 40)]], "answer_tail": 5}
        loss = trainer.compute_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ce, accuracy = trainer._metrics["window_select_ce"], trainer._metrics["window_select_accuracy"]
    assert len(ce) == 15 and ce[-1] < 0.5 * ce[0], ce
    assert accuracy[-1] == 1.0
    assert model.model.window_scores == [] and not model.model.record_window_scores


def test_tail_temporary_memory_holds_the_chunks_last_token_states():
    """`temp_write="tail"`: after a fold, the newest temporary entries of layer 0 are the encoded input states (the
    embeddings) of the chunk's last `beacons_per_chunk` tokens, in order, and they reach the next window's tokens."""
    model = tiny_comet(global_write="window", temp_write="tail")
    C, nb = model.config.chunk_size, model.config.beacons_per_chunk
    ids = random_ids(1, C)
    cache = CometCache()
    with torch.no_grad():
        model(ids, cache=cache)  # one full window: folded
        embeds = model.get_input_embeddings()(ids[:, C - nb :])
        expected = model.model.comet_memory.layers[0].encode_temp(embeds)
    torch.testing.assert_close(cache.memory.temp_memory[0][:, -nb:], expected, atol=1e-6, rtol=0)
    assert bool(cache.memory.temp_valid[:, -nb:].all())
    # The next window's first token depends on the previous chunk's last tokens through the tail (no global memory).
    plain = tiny_comet(global_write="window", temp_write="tail", global_mem_size=0)
    first = torch.cat([ids, ids[:, :1]], 1)
    changed = first.clone()
    changed[0, C - 1] = (changed[0, C - 1] + 1) % plain.config.vocab_size
    with torch.no_grad():
        a, b = plain(first).logits[:, -1], plain(changed).logits[:, -1]
    assert (a - b).abs().max() > 1e-4


def test_bad_temporary_write_settings_are_refused():
    base = tiny_base()
    with pytest.raises(ValueError, match="temp_write must be one of"):
        CometForCausalLM.from_base(base, chunk_size=16, temp_write="summary")
    with pytest.raises(ValueError, match="temp_write='tail' needs the temporary memory"):
        CometForCausalLM.from_base(base, chunk_size=16, temp_beacon_stride=-1, temp_write="tail")


def test_window_and_tail_writes_run_no_beacons_or_readouts_and_change_nothing(monkeypatch):
    """With both memories written from the chunk's own text states, a fold runs no beacon or readout tokens (no
    layer sees more than the slots and the text), and the logits, the generated tokens and the memory equal those
    of the same model made to run them (their outputs were never read, and no text token attends to them)."""
    from modeling_comet.modeling_comet import CometModel

    model = tiny_comet(global_write="window", temp_write="tail")
    P, C = model.config.memory_slots, model.config.chunk_size
    widths = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    ids = random_ids(2, 3 * C + 5)

    def run():
        widths.clear()
        cache = CometCache()
        with torch.no_grad():
            outputs = (
                model(ids, layer_major=False).logits,
                model(ids, layer_major=True).logits,
                model(ids, cache=cache).logits,
                model.generate(ids[:, : 2 * C + 3], max_new_tokens=C + 2, do_sample=False),
            )
        return outputs, cache.memory.global_memory[1], list(widths)

    lean, lean_memory, lean_widths = run()
    assert max(lean_widths) <= P + C
    monkeypatch.setattr(CometModel, "_fold_runs_specials", property(lambda self: True))
    full, full_memory, full_widths = run()
    hook.remove()
    assert max(full_widths) > P + C  # the reference really ran them
    for a, b in zip(lean, full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(lean_memory, full_memory, atol=1e-5, rtol=0)
