"""`fold_delay`: a full chunk folds into memory only after the next chunk's first `fold_delay` tokens were read beside
it, so those tokens see the previous chunk as text; they are read again after the fold, so the memory and every
other token are as without the delay."""

import pytest
import torch

from modeling_comet import CometCache, CometConfig, CometForCausalLM
from tests.test_comet_model import MEMORY, random_ids, tiny_comet

C, D = MEMORY["chunk_size"], 4
KINDS = {
    "readout+beacon": {},
    "window+tail": dict(global_write="window", temp_write="tail"),
}


def with_fields(model: CometForCausalLM, **fields) -> CometForCausalLM:
    """The same weights under other reading settings."""
    config = CometConfig.from_dict({**model.config.to_dict(), **fields})
    other = CometForCausalLM(config).eval()
    other.load_state_dict(model.state_dict())
    return other


def delayed_columns(length: int) -> torch.Tensor:
    """Columns whose outputs the delay changes: the first D tokens of every chunk after the first."""
    column = torch.arange(length)
    return (column >= C) & (column % C < D)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_only_the_first_tokens_of_each_chunk_change_and_the_memory_does_not(kind):
    plain = tiny_comet(**KINDS[kind])
    delayed = with_fields(plain, fold_delay=D)
    ids = random_ids(2, 3 * C + 9)
    with torch.no_grad():
        before, after = plain(ids, use_cache=False).logits, delayed(ids, use_cache=False).logits
        plain_cache, delayed_cache = plain.read(ids), delayed.read(ids)
    changed = delayed_columns(ids.shape[1])
    torch.testing.assert_close(after[:, ~changed], before[:, ~changed], atol=1e-5, rtol=0)
    assert (after[:, changed] - before[:, changed]).abs().amax(-1).min() > 1e-4  # every delayed token sees more
    # The delayed cache has not folded the last full chunk yet (it waits for D tokens of the next); one more token
    # each way, and both memories are the same.
    extra = random_ids(2, C, seed=5)
    with torch.no_grad():
        plain(extra[:, :D], cache=plain_cache)
        delayed(extra[:, :D], cache=delayed_cache)
    for a, b in zip(plain_cache.memory.tensors(), delayed_cache.memory.tensors(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_delayed_token_sees_exactly_the_previous_chunk_as_text(kind):
    """Reference: the model without delay reads up to the previous chunk into a cache; a window of C + D tokens (the
    same weights with chunk_size C + D, so that nothing folds) then reads the previous chunk and the delayed tokens
    from that memory. Its outputs are the delayed model's for those columns, except the previous chunk's own first D
    (read beside the chunk before it)."""
    plain = tiny_comet(**KINDS[kind])
    delayed = with_fields(plain, fold_delay=D)
    wide = with_fields(plain, chunk_size=C + D)
    ids = random_ids(1, 3 * C + 2)
    k = 2  # the delayed tokens of chunk 2 are read beside chunk 1
    with torch.no_grad():
        expected = delayed(ids, use_cache=False).logits[:, (k - 1) * C : k * C + D]
        memory = plain.read(ids[:, : (k - 1) * C]).memory
        window = CometCache()
        window.allocate(wide.config, 1, wide.model._layout(ids.device).size, torch.float32, ids.device)
        window.memory = memory
        wide.model._start_windows(window, torch.ones(1, dtype=torch.bool))
        got = wide(ids[:, (k - 1) * C : k * C + D], cache=window).logits
    torch.testing.assert_close(got[:, D:], expected[:, D:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_path_agrees_with_a_delay(kind):
    """No cache (chunk-major and layer-major), one cached call, token-by-token reading: the same logits, hidden states
    and greedy continuation, with left padding in the batch."""
    model = with_fields(tiny_comet(**KINDS[kind]), fold_delay=D)
    ids = random_ids(2, 4 * C + 3)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        chunked = model(ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
        layer_major = model(ids, attention_mask=mask, layer_major=True, output_hidden_states=True)
        cached = model(ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
        cache, steps = CometCache(), []
        for t in range(ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
        alone = model(ids[1:, 7:], use_cache=False).logits
    real = mask.bool()
    for other in (layer_major, cached):
        torch.testing.assert_close(other.logits[real], chunked.logits[real], atol=1e-4, rtol=0)
        for a, b in zip(other.hidden_states, chunked.hidden_states, strict=True):
            torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1)[real], chunked.logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked.logits[1, 7:], alone[0], atol=1e-4, rtol=0)

    prompt = ids[:, : 2 * C]  # generation starts right at a chunk boundary: the first D new tokens are delayed
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=C, do_sample=False, pad_token_id=0)
        rescored = model(generated, use_cache=False).logits[:, prompt.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(rescored, generated[:, prompt.shape[1] :])


@pytest.mark.parametrize("length", [2 * C + 2, 2 * C + D])
def test_a_saved_state_inside_the_delay_continues_exactly(tmp_path, length):
    """Saved while chunk 1 waits for its delayed tokens (2C + 2), or right after it folded, its delayed tokens not yet
    read again (2C + D: that happens with the next input): loaded, it continues as the live state does, and as reading
    everything in one call does."""
    model = with_fields(tiny_comet(global_write="window", temp_write="tail"), fold_delay=D)
    ids = random_ids(1, length)
    more = random_ids(1, C, seed=7)
    full = torch.cat([ids, more], 1)
    with torch.no_grad():
        state = model.read(ids)
        assert (int(state.window_fill), bool(state.reread_pending)) == ((C + 2, False) if length % C == 2 else (0, True))
        state.save(tmp_path / "state.safetensors")
        loaded = CometCache.load(tmp_path / "state.safetensors")
        a = model.generate(full, cache=state, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = model.generate(full, cache=loaded, max_new_tokens=6, do_sample=False, pad_token_id=0)
        c = model.generate(full, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="different configuration"):
        with_fields(model, fold_delay=0).generate(full, cache=CometCache.load(tmp_path / "state.safetensors"))


@pytest.mark.parametrize("bad", [-1, C, C + 3, 1.5])
def test_a_delay_outside_the_chunk_is_refused(bad):
    with pytest.raises(ValueError, match="fold_delay"):
        tiny_comet(fold_delay=bad)


def test_read_runs_one_window_pass_per_chunk():
    """`read` hands the model window-sized pieces and the delayed tokens are read again in the next chunk's pass, so
    reading costs one pass of C + D rows per chunk (not a separate pass of D rows)."""
    model = with_fields(tiny_comet(global_write="window", temp_write="tail"), fold_delay=D)
    passes = []
    append = model.model._append_to_windows

    def counting(cache, hidden, real, on_layer=None):
        passes.append(hidden.shape[1])
        return append(cache, hidden, real, on_layer=on_layer)

    model.model._append_to_windows = counting
    with torch.no_grad():
        model.read(random_ids(1, 5 * C + D))
    assert passes == [C + D] * 5
