"""torch.export of a CoMeT forward: the cache-free forward of a fixed shape exports and matches eager on other
inputs and padding of that shape; the cached (generation) forward is refused with a clear error."""

import pytest
import torch

from tests.test_comet_model import MEMORY, random_ids, tiny_comet


class Logits(torch.nn.Module):
    def __init__(self, model, use_cache):
        super().__init__()
        self.model, self.use_cache = model, use_cache

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=self.use_cache).logits


def test_cache_free_forward_exports_and_matches_eager_across_chunks_and_padding():
    model = tiny_comet().eval()
    length = 3 * MEMORY["chunk_size"] - 5  # three windows: the memory is read and written inside the graph
    ids, mask = random_ids(2, length), torch.ones(2, length, dtype=torch.long)
    exported = torch.export.export(Logits(model, use_cache=False), (ids, mask), strict=False)

    other = random_ids(2, length, seed=7)
    padded = mask.clone()
    padded[0, :9] = 0  # left padding, decided at run time
    with torch.no_grad():
        for input_ids, attention_mask in ((other, mask), (other, padded)):
            expected = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            got = exported.module()(input_ids, attention_mask)
            real = attention_mask.bool()
            torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_cached_forward_is_refused_under_export():
    model = tiny_comet().eval()
    ids = random_ids(1, 20)
    with pytest.raises(ValueError, match="torch.export of CoMeT covers the cache-free forward only"):
        torch.export.export(Logits(model, use_cache=None), (ids, torch.ones_like(ids)), strict=False)
