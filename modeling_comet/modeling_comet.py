"""CoMeT: Collaborative Memory Transformer over a pretrained Llama-family decoder.

The input is read in chunks of ``chunk_size`` text tokens. Every chunk is laid out in one fixed
index space (the *window*), shared by training and generation::

    [G global slots][B temp slots][chunk_size text][chunk_size/stride beacons][G readouts]

Memory slots are placeholders: before decoder layer l runs, their hidden states are overwritten
with layer l's memory built from the previous chunk. Text attends to valid slots and earlier text
only, so an input shorter than one chunk gives exactly the base model's logits. Beacons and
readouts see the slots, the text before them and earlier beacons; their layer-l outputs become
layer l's temporary (FIFO) and global (gated) memory for the next chunk.

Structure, as in transformers: :class:`CometModel` is the backbone (the base model's embeddings,
decoder layers, norm and rotary embedding, the memory ``comet_memory`` and the window logic) and
returns text hidden states; :class:`CometForCausalLM` adds the LM head and computes the loss chunk
by chunk from the backbone's per-chunk outputs. The input is embedded one chunk at a time: only
token ids and index tensors span the whole input.

Without a cache, every chunk runs as one sequence (chunk-major or layer-major, same result, full
back-propagation through the memories): training and scoring. With a cache (generation, reading),
one window is kept in a fixed-size KV buffer (:class:`CometCache`): text is written as it arrives,
and a full window is folded into memory by running only the beacon and readout tokens against the
cached keys and values. The cache is also a document state that can be saved, copied and expanded.

This file is part of the remote code a checkpoint carries: flat, relative imports, torch and
transformers only.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from functools import partial

from .requirements import MIN_TRANSFORMERS_VERSION  # noqa: F401  (importing it checks the installed transformers)

# isort: split

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation import GenerationMode
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils.logging import tqdm

from .configuration_comet import CometConfig, check_supported_base
from .position_layout import epl_special_position_ids, grouped_special_position_ids


class CometRMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as in the Llama family."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class CometLowRankAdapter(nn.Module):
    """Residual rank-r adapter ``x + up(down(x))``; ``up`` starts at zero so the adapter starts as identity."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.down(x))


class CometLayerMemory(nn.Module):
    """The memory parameters of one decoder layer (≈36·d parameters at rank 8)."""

    def __init__(self, config: CometConfig):
        super().__init__()
        base = config.base_config
        d = base.hidden_size
        self.global_norm = CometRMSNorm(d, eps=base.rms_norm_eps)
        self.gate = nn.Linear(2 * d, 1)
        self.global_adapter = CometLowRankAdapter(d, config.adapter_rank)
        if config.use_temp_memory:
            self.temp_norm = CometRMSNorm(d, eps=base.rms_norm_eps)
            self.temp_adapter = CometLowRankAdapter(d, config.adapter_rank)
        if config.global_write == "window":
            self.select_norm = CometRMSNorm(d, eps=base.rms_norm_eps)
            self.select_query = nn.Parameter(torch.zeros(d))

    def select_window(self, states: torch.Tensor, valid: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``global_write="window"``: a soft choice of ``size`` consecutive token states of a chunk.

        states: (B, n, d), the layer's input states of the chunk's text; valid: (B, n) bool. Window w is tokens
        w .. w+size-1, scored by its last token against the learned query (windows with an invalid token are
        excluded). Returns the (B, size, d) mixture of windows, slot j holding token j of the windows, and the
        (B, n-size+1) window scores.
        """
        n = states.shape[1]
        scores = self.select_norm(states[:, size - 1 :]).float() @ self.select_query.float()  # (B, n-size+1)
        whole = valid.long().unfold(1, size, 1).sum(-1) == size  # (B, n-size+1): every token of the window is real
        none = ~whole.any(1, keepdim=True)  # no complete window (padding only): fall back to the last one
        whole = whole | (none & (torch.arange(n - size + 1, device=states.device) == n - size))
        weights = scores.masked_fill(~whole, float("-inf")).softmax(-1)
        windows = states.float().unfold(1, size, 1)  # (B, n-size+1, d, size)
        return torch.einsum("bw,bwdg->bgd", weights, windows).to(states.dtype), scores

    def update_global(
        self, readouts: torch.Tensor, previous_state: torch.Tensor, has_previous: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated update ``S = g·S_prev + (1−g)·c``; returns the new state and the memory to inject next.

        readouts, previous_state: (B, G, d); has_previous: (B,) bool, False on a sample's first fold.
        """
        candidate = self.global_norm(readouts)
        gate = torch.sigmoid(self.gate(torch.cat([candidate, previous_state], dim=-1)))  # (B, G, 1)
        gated = gate * previous_state + (1 - gate) * candidate
        state = torch.where(has_previous[:, None, None], gated, candidate)
        return state, self.global_adapter(state)

    def encode_temp(self, beacons: torch.Tensor) -> torch.Tensor:
        """Temporary-memory entries from beacon outputs: (B, n, d) -> (B, n, d)."""
        return self.temp_adapter(self.temp_norm(beacons))


class CometMemory(nn.Module):
    """All memory parameters: per-layer memory plus the beacon and readout embeddings.

    Beacons and readouts are learned embeddings rather than new vocabulary entries, so the base
    tokenizer is untouched and generation can never emit them.
    """

    def __init__(self, config: CometConfig):
        super().__init__()
        d = config.base_config.hidden_size
        self.layers = nn.ModuleList(CometLayerMemory(config) for _ in range(config.base_config.num_hidden_layers))
        self.readout_embedding = nn.Parameter(torch.zeros(config.global_mem_size, d))
        self.beacon_embedding = nn.Parameter(torch.zeros(1, d)) if config.use_temp_memory else None


@dataclass
class CometMemoryState:
    """Memory carried from one chunk to the next, fixed in size from the first chunk on.

    Per layer: ``global_state`` S (B, G, d), ``global_memory`` = adapter(S) (B, G, d) and
    ``temp_memory`` (B, budget, d), newest entries last. ``global_valid`` (B,) and ``temp_valid``
    (B, budget) say which slots hold memory; invalid slots are hidden from every token.
    """

    global_state: list[torch.Tensor]
    global_memory: list[torch.Tensor]
    temp_memory: list[torch.Tensor]
    global_valid: torch.Tensor
    temp_valid: torch.Tensor

    @classmethod
    def empty(cls, config: CometConfig, batch_size: int, dtype: torch.dtype, device) -> CometMemoryState:
        d, layers = config.base_config.hidden_size, config.base_config.num_hidden_layers
        G, T = config.global_mem_size, config.temp_slots

        def zeros(n):
            return [torch.zeros(batch_size, n, d, dtype=dtype, device=device) for _ in range(layers)]

        return cls(
            global_state=zeros(G),
            global_memory=zeros(G),
            temp_memory=zeros(T),
            global_valid=torch.zeros(batch_size, dtype=torch.bool, device=device),
            temp_valid=torch.zeros(batch_size, T, dtype=torch.bool, device=device),
        )

    def slot_valid(self, global_mem_size: int) -> torch.Tensor:
        """(B, G + budget) bool: which memory slots hold memory."""
        glob = self.global_valid[:, None].expand(-1, global_mem_size)
        return torch.cat([glob, self.temp_valid], dim=1)

    def slots(self, layer: int) -> torch.Tensor:
        """(B, G + budget, d): what layer ``layer`` injects into the memory slots."""
        return torch.cat([self.global_memory[layer], self.temp_memory[layer]], dim=1)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.global_state, *self.global_memory, *self.temp_memory, self.global_valid, self.temp_valid]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map(self, fn) -> CometMemoryState:
        """A new state with ``fn`` applied to every tensor (for beam reordering and batch selection)."""
        return CometMemoryState(
            global_state=[fn(t) for t in self.global_state],
            global_memory=[fn(t) for t in self.global_memory],
            temp_memory=[fn(t) for t in self.temp_memory],
            global_valid=fn(self.global_valid),
            temp_valid=fn(self.temp_valid),
        )


class CometWindowLayout:
    """Index space of one chunk (the window) and the attention rules between its parts.

    Indices: ``[0, P)`` memory slots (P = G + budget), ``[P, P+W)`` text (W = C + ``fold_delay``: the chunk, then
    the next chunk's first tokens read beside it before it folds), then beacons, readouts and one spare *scratch*
    index that padding queries write to and nothing ever reads. Beacons and readouts see only the chunk's own C.
    """

    def __init__(self, config: CometConfig, device):
        self.config = config
        C, G, W = config.chunk_size, config.global_mem_size, config.window_text
        self.num_slots = P = config.memory_slots
        self.num_beacons = nb = config.beacons_per_chunk
        self.text_start = P
        self.beacon_start = P + W
        self.readout_start = P + W + nb
        self.scratch = P + W + nb + G
        self.size = self.scratch + 1

        idx = torch.arange(self.size, device=device)
        is_slot = idx < P
        is_text = (idx >= P) & (idx < P + W)
        is_beacon = (idx >= P + W) & (idx < P + W + nb)
        is_readout = (idx >= P + W + nb) & (idx < self.scratch)
        # Number of text tokens each index may see (text: itself and before; beacon k: (k+1)·stride).
        horizon = torch.zeros(self.size, dtype=torch.long, device=device)
        horizon[is_text] = torch.arange(1, W + 1, device=device)
        if nb:
            horizon[is_beacon] = torch.arange(1, nb + 1, device=device) * config.temp_beacon_stride
        horizon[is_readout] = C
        text_rank = idx - P  # position of a text key inside the chunk

        q, k = idx[:, None], idx[None, :]
        sees_slots = (is_text | is_beacon | is_readout)[:, None] & is_slot[None, :]
        slot_causal = is_slot[:, None] & is_slot[None, :] & (k <= q)
        sees_text = is_text[None, :] & (text_rank[None, :] < horizon[:, None])
        beacon_causal = (is_beacon | is_readout)[:, None] & is_beacon[None, :] & ((k <= q) | is_readout[:, None])
        readout_causal = is_readout[:, None] & is_readout[None, :] & (k <= q)
        self.visibility = sees_slots | slot_causal | sees_text | beacon_causal | readout_causal  # (size, size)

        # Position offsets of beacons and readouts, relative to the first text position of a full chunk.
        if config.position_layout == "epl":
            beacon_pos = grouped_special_position_ids("epl", 0, [config.temp_beacon_stride] * nb, device=device)
            readout_pos = epl_special_position_ids(0, C - 1, G, device=device)
        else:
            beacon_pos = torch.arange(C, C + nb, device=device)
            readout_pos = torch.arange(C + nb, C + nb + G, device=device)
        self.fold_positions = torch.cat([beacon_pos, readout_pos])  # (nb + G,)

    def mask(self, query_index: torch.Tensor, key_index: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """Boolean attention mask (B, 1, q, k) for queries at ``query_index`` (B, q) over keys at ``key_index`` (k,).

        ``key_valid`` (B, k) hides empty slots, unwritten text and padding. Every query also sees
        its own index, so no row is empty (an empty row would turn into NaN).
        """
        allowed = self.visibility[query_index][:, :, key_index] & key_valid[:, None, :]
        allowed = allowed | (query_index[:, :, None] == key_index[None, None, :])
        return allowed[:, None]


# A polynomial hash of the token ids a cache has read, mod a 31-bit prime so that every product fits in int64.
# Reading an input in one call or in pieces gives the same hash, so a prompt can be checked against a cache.
_HASH_MODULUS = 2**31 - 1
_HASH_BASE = 1_000_003


def _power_mod(exponent: torch.Tensor) -> torch.Tensor:
    """``_HASH_BASE ** exponent % _HASH_MODULUS`` elementwise, by binary exponentiation."""
    result = torch.ones_like(exponent)
    base = torch.full_like(exponent, _HASH_BASE)
    exponent = exponent.clone()
    while bool((exponent > 0).any()):
        result = torch.where((exponent & 1).bool(), result * base % _HASH_MODULUS, result)
        base = base * base % _HASH_MODULUS
        exponent = exponent >> 1
    return result


def _extend_token_hash(previous: torch.Tensor, input_ids: torch.Tensor, piece: int = 8192) -> torch.Tensor:
    """Hash (B,) of the ids read so far extended by ``input_ids`` (B, n); -1 (unknown) stays -1.

    Works through the ids ``piece`` columns at a time, so its temporaries do not grow with the input.
    """
    extended = previous
    for start in range(0, input_ids.shape[1], piece):
        ids = input_ids[:, start : start + piece]
        n = ids.shape[1]
        powers = _power_mod(torch.arange(n - 1, -1, -1, device=ids.device))
        total = (ids.long() % _HASH_MODULUS * powers % _HASH_MODULUS).sum(1) % _HASH_MODULUS
        shift = _power_mod(torch.tensor([n], device=ids.device))
        extended = (extended * shift % _HASH_MODULUS + total) % _HASH_MODULUS
    return torch.where(previous < 0, previous, extended)


class CometCache(Cache):
    """Generation state of a CoMeT model: the memory plus a fixed-size KV buffer for the live window.

    Its size does not depend on how many tokens were read: the buffer holds one window
    (memory slots, ``chunk_size`` text tokens, beacons and readouts) per layer, and the memory is a
    fixed number of vectors per layer. ``generate()``, ``pipeline()`` and beam search carry it like
    any other cache.

    It is also a document state to keep: read a long document once (``model.read``), `save` it, `load` it later,
    `copy` it for each question and `expand` it to a batch of questions. It records which model built it (a hash of
    the configuration) and how many tokens it has read (with a hash of their ids), and refuses a different model or a
    prompt that does not start with what it has read.
    """

    _FORMAT = "comet-cache/1"

    def __init__(self):
        super().__init__(layers=[])
        self.memory: CometMemoryState | None = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_valid: torch.Tensor | None = None  # (B, window size)
        self.window_fill: torch.Tensor | None = None  # (B,) text tokens in the live window
        self.token_hash: torch.Tensor | None = None  # (B,) hash of the input columns read; -1 if read as embeddings
        self.slots_pending: torch.Tensor | None = None  # (B,) window opened, memory slots' keys/values not written yet
        # global_write="window" or temp_write="tail": per layer, the layer's input states of the live window's text
        # (B, chunk_size + 1, d)
        self.text_states: list[torch.Tensor] = []
        # fold_delay > 0: input states of the next chunk's first tokens, read beside the full chunk and read again
        # once it folds (B, fold_delay + 1, d)
        self.delayed_inputs: torch.Tensor | None = None
        # (B,) windows folded at the end of the last call whose delayed tokens are read again with the next input
        self.reread_pending: torch.Tensor | None = None
        self.seen_tokens = 0  # input columns consumed, padding included (what generate slices by)
        self.model_fingerprint: str | None = None  # hash of the configuration of the model that built it
        self._write_index: torch.Tensor | None = None

    @property
    def is_initialized(self) -> bool:
        return self.memory is not None

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def batch_size(self) -> int:
        return 0 if self.memory is None else self.memory.global_valid.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write this step's keys/values into the window buffer and return the whole buffer."""
        if self._write_index is None:
            raise RuntimeError("CometCache.update called outside a CoMeT forward pass")
        B, H, q, D = key_states.shape
        index = self._write_index[:, None, :, None].expand(B, H, q, D)
        self.keys[layer_idx].scatter_(2, index, key_states.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].scatter_(2, index, value_states.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]

    def allocate(self, config: CometConfig, batch_size: int, window_size: int, dtype, device) -> None:
        base = config.base_config
        heads = base.num_key_value_heads
        head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
        shape = (batch_size, heads, window_size, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(base.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(base.num_hidden_layers)]
        self.memory = CometMemoryState.empty(config, batch_size, dtype, device)
        self.key_valid = torch.zeros(batch_size, window_size, dtype=torch.bool, device=device)
        self.window_fill = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.token_hash = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.slots_pending = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.text_states = []
        if config.keeps_text_states:
            text_shape = (batch_size, config.chunk_size + 1, base.hidden_size)  # the last row: a write sink
            self.text_states = [torch.zeros(text_shape, dtype=dtype, device=device) for _ in range(base.num_hidden_layers)]
        self.delayed_inputs = None
        self.reread_pending = torch.zeros(batch_size, dtype=torch.bool, device=device)
        if config.fold_delay:
            self.delayed_inputs = torch.zeros(batch_size, config.fold_delay + 1, base.hidden_size, dtype=dtype, device=device)
        self.seen_tokens = 0
        self.model_fingerprint = config_fingerprint(config)

    def record_tokens(self, input_ids: torch.Tensor | None, length: int) -> None:
        """Account for ``length`` input columns just read (``input_ids`` (B, length), or None for embeddings)."""
        self.seen_tokens += length
        if input_ids is None:
            self.token_hash = torch.full_like(self.token_hash, -1)
        else:
            self.token_hash = _extend_token_hash(self.token_hash, input_ids)

    def check_model(self, config: CometConfig) -> None:
        """Raise if this cache was built by a model with a different configuration."""
        if self.model_fingerprint is not None and self.model_fingerprint != config_fingerprint(config):
            raise ValueError(
                "This CometCache was built by a CoMeT model with a different configuration (memory fields or base "
                "architecture); read the input again with this model."
            )

    def check_prompt(self, input_ids: torch.Tensor) -> None:
        """Raise unless ``input_ids`` (B, L) starts with the tokens this cache has read and adds at least one."""
        if not self.is_initialized:
            return
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(
                f"This CometCache holds {self.batch_size} sequence(s) but the prompt has {input_ids.shape[0]}; "
                "use cache.expand(batch_size) to ask several questions about one document."
            )
        if input_ids.shape[1] <= self.seen_tokens:
            raise ValueError(
                f"This CometCache has read {self.seen_tokens} tokens; the prompt ({input_ids.shape[1]} tokens) must "
                "be those tokens followed by at least one new one."
            )
        known = self.token_hash >= 0
        prefix = _extend_token_hash(torch.zeros_like(self.token_hash), input_ids[:, : self.seen_tokens])
        if not torch.equal(prefix[known], self.token_hash[known]):
            raise ValueError(
                f"The prompt does not start with the {self.seen_tokens} tokens this CometCache has read: pass the "
                "read tokens followed by the new ones (generate feeds only the new ones), or use a fresh cache."
            )

    def nbytes(self) -> int:
        if self.memory is None:
            return 0
        buffers = [*self.keys, *self.values, self.key_valid, self.window_fill, self.token_hash, self.slots_pending]
        buffers += [] if self.delayed_inputs is None else [self.delayed_inputs, self.reread_pending]
        return self.memory.nbytes() + sum(t.numel() * t.element_size() for t in buffers)

    def _tensors(self) -> dict[str, torch.Tensor]:
        named = {"key_valid": self.key_valid, "window_fill": self.window_fill, "token_hash": self.token_hash}
        named["slots_pending"] = self.slots_pending
        named["global_valid"], named["temp_valid"] = self.memory.global_valid, self.memory.temp_valid
        for field in ("global_state", "global_memory", "temp_memory"):
            named.update({f"{field}.{i}": t for i, t in enumerate(getattr(self.memory, field))})
        named.update({f"keys.{i}": t for i, t in enumerate(self.keys)})
        named.update({f"values.{i}": t for i, t in enumerate(self.values)})
        named.update({f"text_states.{i}": t for i, t in enumerate(self.text_states)})
        if self.delayed_inputs is not None:
            named["delayed_inputs"] = self.delayed_inputs
            named["reread_pending"] = self.reread_pending
        return named

    @classmethod
    def _from_tensors(cls, named: dict[str, torch.Tensor], seen_tokens: int, model_fingerprint: str | None):
        cache = cls()
        layers = sum(1 for k in named if k.startswith("keys."))

        def stack(name):
            return [named[f"{name}.{i}"] for i in range(layers)]

        cache.memory = CometMemoryState(
            global_state=stack("global_state"),
            global_memory=stack("global_memory"),
            temp_memory=stack("temp_memory"),
            global_valid=named["global_valid"],
            temp_valid=named["temp_valid"],
        )
        cache.keys, cache.values = stack("keys"), stack("values")
        cache.text_states = stack("text_states") if "text_states.0" in named else []
        cache.key_valid, cache.window_fill, cache.token_hash = named["key_valid"], named["window_fill"], named["token_hash"]
        cache.slots_pending = named["slots_pending"]
        cache.delayed_inputs = named.get("delayed_inputs")
        cache.reread_pending = named.get("reread_pending", torch.zeros_like(cache.slots_pending))
        cache.seen_tokens, cache.model_fingerprint = seen_tokens, model_fingerprint
        return cache

    def _mapped(self, fn) -> CometCache:
        """A new cache with ``fn`` applied to every tensor."""
        if not self.is_initialized:
            return type(self)()
        named = {name: fn(t) for name, t in self._tensors().items()}
        return self._from_tensors(named, self.seen_tokens, self.model_fingerprint)

    def _apply(self, fn) -> None:
        if self.is_initialized:
            self.__dict__.update(self._mapped(fn).__dict__)

    def copy(self) -> CometCache:
        """An independent copy, e.g. to answer several questions from one read of a document."""
        return self._mapped(torch.clone)

    def expand(self, batch_size: int) -> CometCache:
        """A copy holding ``batch_size`` copies of this one-sequence state, for a batch of questions."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs a one-sequence cache, this one holds {self.batch_size}")
        return self._mapped(lambda t: t.repeat_interleave(batch_size, dim=0))

    def save(self, path) -> None:
        """Write the state to a safetensors file (restored exactly by `CometCache.load`)."""
        from safetensors.torch import save_file

        if not self.is_initialized:
            raise ValueError("Cannot save an empty CometCache: read some input first")
        metadata = {"format": self._FORMAT, "seen_tokens": str(self.seen_tokens)}
        if self.model_fingerprint is not None:
            metadata["model_fingerprint"] = self.model_fingerprint
        save_file({k: t.contiguous() for k, t in self._tensors().items()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> CometCache:
        """Read a state written by `CometCache.save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != cls._FORMAT:
                raise ValueError(f"{path} is not a saved CometCache (format {metadata.get('format')!r})")
            named = {k: f.get_tensor(k) for k in f.keys()}
        return cls._from_tensors(named, int(metadata["seen_tokens"]), metadata.get("model_fingerprint"))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def reset(self) -> None:
        self.__init__()

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("A CoMeT cache cannot be cropped: folded text lives only in the memory.")


def config_fingerprint(config: CometConfig) -> str:
    """A short hash of what a CometCache depends on: the memory fields and the base architecture."""
    base = config.base_config
    fields = {name: getattr(config, name) for name in CometConfig.MEMORY_FIELDS}
    if config.global_write != "readout":  # (left out for the default, so earlier saved states keep their hash)
        fields["global_write"] = config.global_write
    if config.temp_write != "beacon":
        fields["temp_write"] = config.temp_write
    if config.fold_delay:
        fields["fold_delay"] = config.fold_delay
    for name in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_parameters",
    ):
        fields[f"base.{name}"] = getattr(base, name, None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


# transformers 5.x is renaming `past_key_values` to `cache`; follow whichever this version uses.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_LAYER_CACHE_ARG = _OUTPUT_CACHE_FIELD

# Checkpoints saved before `CometModel` existed hold the memory at the top level.
_LEGACY_MEMORY_PREFIX = "comet_memory."
_MEMORY_PREFIX = "model.comet_memory."

# An input at least this long, read into a cache in one call (a long prompt given to generate() or a pipeline), shows
# a progress bar as `read(progress=True)` does. It follows transformers' switch for progress bars
# (`transformers.utils.logging.disable_progress_bar()`).
PROGRESS_MIN_TOKENS = 32768


def _valid_first_order(valid: torch.Tensor) -> torch.Tensor:
    """Per-row permutation putting valid columns first, keeping their order. valid: (B, L) bool."""
    return torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices


def _scatter_rows(buffer: torch.Tensor, slots: torch.Tensor, real: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` (B, n, ...) into ``buffer`` (B, K + 1, ...) at ``slots`` (B, n) where ``real``; the last row of
    ``buffer`` is a sink for the other rows."""
    sink = buffer.shape[1] - 1
    index = torch.where(real, slots, sink).reshape(*slots.shape, *([1] * (rows.dim() - 2)))
    buffer.scatter_(1, index.expand_as(rows), rows.to(buffer.dtype))


class _TokenSource:
    """The input in valid-first column order (each sequence's real tokens first), embedded piece by piece.

    Only token ids and (B, L) index tensors are held for the whole input; embeddings exist one chunk at a time
    (unless the caller passed ``inputs_embeds``).
    """

    def __init__(self, embed_tokens: nn.Module, input_ids, inputs_embeds, valid: torch.Tensor):
        self.embed_tokens = embed_tokens
        self.batch_size, self.length = valid.shape
        if not torch.compiler.is_compiling() and bool(valid.all()):  # the general path traces
            self.order = None
            self.valid = valid
        else:
            self.order = _valid_first_order(valid)
            self.valid = valid.gather(1, self.order)
        self.input_ids = input_ids
        self.ids = input_ids if input_ids is None or self.order is None else input_ids.gather(1, self.order)
        self.inputs_embeds = inputs_embeds
        self.dtype = embed_tokens.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
        self.device = valid.device

    def columns(self, index: torch.Tensor) -> torch.Tensor:
        """Original columns of valid-first indices ``index`` (B, n) (clamped into the input)."""
        index = index.clamp(max=self.length - 1)
        return index if self.order is None else self.order.gather(1, index)

    def embed(self, index: torch.Tensor) -> torch.Tensor:
        """(B, n, d) input embeddings at valid-first indices ``index`` (B, n)."""
        if self.ids is not None:
            return self.embed_tokens(self.ids.gather(1, index.clamp(max=self.length - 1)))
        columns = self.columns(index)
        return self.inputs_embeds.gather(1, columns[..., None].expand(-1, -1, self.inputs_embeds.shape[-1]))

    def span(self, start: int, end: int) -> torch.Tensor:
        """(B, end - start) valid-first indices of one chunk."""
        return torch.arange(start, end, device=self.device)[None].expand(self.batch_size, -1)


class _OutputRecorder:
    """Per-layer text hidden states and attention weights over the whole input, kept only when asked.

    ``hidden_states[0]`` is the embedding output, ``hidden_states[i]`` the output of layer i−1 and the last one the
    normalised final state (``last_hidden_state``), as in transformers. ``attentions[l]`` is (B, heads, L, window):
    how much each text token attends to each index of its chunk's window (memory slots, text, beacons, readouts).
    """

    def __init__(self, model: CometModel, batch_size: int, length: int, dtype, device, hidden: bool, attentions: bool):
        config = model.config.base_config
        self.attention_store = {} if attentions else None
        self.hidden_states = None
        self.attentions = None
        if hidden:
            shape = (batch_size, length + 1, config.hidden_size)
            self.hidden_states = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers + 1)]
        if attentions:
            window = model._layout(device).size
            shape = (batch_size, config.num_attention_heads, length + 1, window)
            self.attentions = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]

    def layer_output(self, layer: int, columns, real, hidden, query_rows: slice, key_index: torch.Tensor) -> None:
        """Record layer ``layer``'s output and attention weights for the text queries at rows ``query_rows``."""
        if layer + 1 < len(self.hidden_states or ()) - 1:
            self.hidden(layer + 1, columns, real, hidden[:, query_rows])
        self.attention(layer, columns, real, query_rows, key_index)

    def hidden(self, index: int, columns, real, text_hidden) -> None:
        if self.hidden_states is not None:
            _scatter_rows(self.hidden_states[index], columns, real, text_hidden)

    def attention(self, layer: int, columns, real, query_rows: slice, key_index: torch.Tensor) -> None:
        """Record layer ``layer``'s last attention weights: rows ``query_rows`` are the text queries; their
        keys sit at window indices ``key_index`` (k,)."""
        if self.attentions is None:
            return
        weights = self.attention_store.pop(layer)[:, :, query_rows]  # (B, H, n, k)
        B, H, n, _ = weights.shape
        window = self.attentions[layer].shape[-1]
        full = weights.new_zeros(B, H, n, window)
        full.scatter_(3, key_index[None, None, None, :].expand(B, H, n, -1), weights)
        _scatter_rows(self.attentions[layer].transpose(1, 2), columns, real, full.transpose(1, 2))

    def outputs(self) -> tuple[tuple | None, tuple | None]:
        hidden = None if self.hidden_states is None else tuple(h[:, :-1] for h in self.hidden_states)
        attentions = None if self.attentions is None else tuple(a[:, :, :-1] for a in self.attentions)
        return hidden, attentions


class CometPreTrainedModel(PreTrainedModel):
    config_class = CometConfig
    config: CometConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    _supports_attention_backend = False
    _no_split_modules = ["LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"]

    def __init__(self, config: CometConfig, *inputs, **kwargs):
        for attn in {config._attn_implementation, config.base_config._attn_implementation}:
            if attn not in (None, "eager", "sdpa", "flex_attention"):
                raise ValueError(
                    f"CoMeT supports attn_implementation 'sdpa', 'eager' or 'flex_attention', not {attn!r}: its window "
                    "needs an arbitrary attention mask (text hidden from beacons and readouts), which flash kernels do not take."
                )
        super().__init__(config, *inputs, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("rotary_emb.inv_freq"))
        if missing:
            raise ValueError(
                f"The checkpoint lacks {len(missing)} weight(s) of this CoMeT model (e.g. {missing[:3]}); they would be "
                "initialised at random. To start from fresh memory, build the model with CometForCausalLM.from_base."
            )
        loaded = (model, info) if wants_info else model
        devices = set((getattr(model, "hf_device_map", None) or {}).values())
        if len(devices) > 1:
            raise ValueError(
                f"CoMeT runs on one device: its window cache and memory state span every layer, so a device_map that "
                f"splits the model ({sorted(map(str, devices))}) is not supported. Pass device_map='cpu', 'cuda:0' or "
                "{'': device}."
            )
        return loaded

    def _init_weights(self, module):
        super()._init_weights(module)
        std = getattr(self.config.base_config, "initializer_range", 0.02)
        if isinstance(module, CometLowRankAdapter):
            init.normal_(module.down.weight, mean=0.0, std=std)
            init.zeros_(module.up.weight)
        elif isinstance(module, CometLayerMemory):
            init.normal_(module.gate.weight, mean=0.0, std=std)
            init.constant_(module.gate.bias, self.config.gate_bias_init)
            if getattr(module, "select_query", None) is not None:
                # Unscaled window logits: a norm-0.1·sqrt(d) query starts with window preferences of a few units.
                init.normal_(module.select_query, mean=0.0, std=0.1)
        elif isinstance(module, CometMemory):
            init.normal_(module.readout_embedding, mean=0.0, std=self.config.special_init_std)
            if module.beacon_embedding is not None:
                init.normal_(module.beacon_embedding, mean=0.0, std=self.config.special_init_std)


class CometModel(CometPreTrainedModel):
    """The CoMeT backbone: the base model's embeddings, decoder layers, norm and rotary embedding, the memory
    (``comet_memory``) and the chunked window logic. Returns the final (normalised) text hidden states.

    Parameter names follow the base model (``embed_tokens``, ``layers.N``, ``norm``), so base checkpoints and LoRA
    ``target_modules`` map onto it unchanged; every memory parameter lives under ``comet_memory.``.
    """

    def __init__(self, config: CometConfig):
        super().__init__(config)
        check_supported_base(config.base_config)
        config.check_memory_fields()
        base = AutoModel.from_config(config.base_config)
        self.embed_tokens = base.embed_tokens
        self.layers = base.layers
        self.norm = base.norm
        self.rotary_emb = base.rotary_emb
        self.comet_memory = CometMemory(config)
        self.gradient_checkpointing = False
        self._layouts: dict = {}
        self.record_window_scores = False  # global_write="window": keep each fold's window scores (training)
        self.window_scores: list[torch.Tensor] = []
        self.post_init()
        # The base's own decoder-layer class, not the class-level list of every supported one: FSDP's auto-wrap
        # and `device_map` look each name up in the model and refuse one it does not contain.
        self._no_split_modules = sorted({type(layer).__name__ for layer in self.layers})

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    # ------------------------------------------------------------------ shared pieces
    def _layout(self, device) -> CometWindowLayout:
        key = str(device)
        if key not in self._layouts:
            self._layouts[key] = CometWindowLayout(self.config, device)
        return self._layouts[key]

    def _attention_mask(self, allowed: torch.Tensor, dtype):
        """The boolean mask (B, 1, q, k) in the form the configured attention implementation expects."""
        implementation = self.config.base_config._attn_implementation
        if implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        if implementation == "flex_attention":
            from torch.nn.attention.flex_attention import create_block_mask

            def visible(batch, head, query, key):
                return allowed[batch, 0, query, key]

            B, _, q, k = allowed.shape
            return create_block_mask(visible, B, None, q, k, device=allowed.device)
        return allowed

    def _slot_positions(self, slot_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the memory slots (valid ones numbered from 0) and the first text position (B,)."""
        counts = slot_valid.long().cumsum(1)
        return (counts - 1).clamp(min=0), counts[:, -1]

    def _fold_into_memory(
        self, layer: int, state: CometMemoryState, beacon_out: torch.Tensor | None, readout_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Layer ``layer``'s new global state, global memory and temporary memory after a chunk."""
        mem = self.comet_memory.layers[layer]
        g_state, g_memory = mem.update_global(readout_out, state.global_state[layer], state.global_valid)
        temp = None
        if beacon_out is not None:
            entries = mem.encode_temp(beacon_out)
            temp = torch.cat([state.temp_memory[layer], entries], dim=1)[:, -self.config.temp_slots :]
        return g_state, g_memory, temp

    def _fold_validity(
        self, state: CometMemoryState, folded: torch.Tensor, temp_budget: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot validity after a fold of the samples where ``folded`` (B,) is True.

        ``temp_budget`` (0 .. ``temp_mem_budget``) keeps only that many newest temporary entries visible,
        so that training can sample a smaller temporary memory and make the global memory do the work.
        """
        global_valid = (state.global_valid | folded) if self.config.global_mem_size else state.global_valid
        temp_valid = state.temp_valid
        if self.config.use_temp_memory:
            new = folded[:, None].expand(-1, self.config.beacons_per_chunk)
            shifted = torch.cat([temp_valid, new], dim=1)[:, -self.config.temp_slots :]
            if temp_budget is not None and temp_budget < self.config.temp_slots:
                shifted[:, : self.config.temp_slots - temp_budget] = False
            temp_valid = torch.where(folded[:, None], shifted, temp_valid)
        return global_valid, temp_valid

    @property
    def _fold_runs_specials(self) -> bool:
        """Whether a fold runs the beacon and readout tokens. Not with ``temp_write="tail"`` and
        ``global_write="window"``: both memories are then written from the chunk's own text states, and no text
        token attends to a beacon or readout, so running them would only cost time (a quarter of a chunk's
        tokens at the default sizes) without changing any output."""
        return not (self.config.temp_write == "tail" and self.config.global_write == "window")

    def _special_embeddings(self, batch_size: int, dtype) -> torch.Tensor:
        """(B, nb + G, d): beacon then readout input embeddings of a fold."""
        mem = self.comet_memory
        parts = []
        if mem.beacon_embedding is not None:
            parts.append(mem.beacon_embedding.expand(self.config.beacons_per_chunk, -1))
        parts.append(mem.readout_embedding)
        return torch.cat(parts).to(dtype)[None].expand(batch_size, -1, -1)

    def _run_layer(self, layer: int, hidden, mask, position_embeddings, position_ids, cache=None):
        # Positional, in the decoder-layer order every supported base shares (hidden_states, attention_mask,
        # position_ids, cache, use_cache, position_embeddings): a gradient-checkpointing wrapper then receives this
        # call's tensors as its own arguments. Each layer runs once per chunk, on windows of different widths, so
        # nothing of one call may be kept for another's recomputation.
        return self.layers[layer](hidden, mask, position_ids, cache, cache is not None, position_embeddings)

    # ------------------------------------------------------------------ whole-chunk path (training, scoring)
    def _windows(self, length: int) -> list[tuple[int, int, int, int]]:
        """The windows a no-cache read of ``length`` columns runs, as ``(start, end, stop, emit)``.

        A window holds the text ``[start, stop)``: its chunk ``[start, end)``, which is what folds into memory, then
        (unless it is the last) the next chunk's first ``fold_delay`` tokens. Its outputs are those of ``[emit,
        stop)``: the tokens it starts with that the window before already read are not emitted again. A last chunk
        that the window before read whole is not run.
        """
        C, D = self.config.chunk_size, self.config.fold_delay
        windows, emit = [], 0
        for start in range(0, length, C):
            end = min(start + C, length)
            stop = min(end + D, length) if end < length else end
            if end < length or emit < stop:
                windows.append((start, end, stop, max(emit, start)))
            emit = stop
        return windows

    def _chunk_inputs(self, embeds, valid, state: CometMemoryState, fold: bool, layout: CometWindowLayout, n_fold: int):
        """Sequence, mask, position embeddings and ids, window index of each key, and which of the folding text is
        real, of one window. ``embeds`` and ``valid`` cover the window's text; its first ``n_fold`` tokens are the
        chunk that folds."""
        B, n, _ = embeds.shape
        device = embeds.device
        slot_valid = state.slot_valid(self.config.global_mem_size)
        slot_pos, text_start = self._slot_positions(slot_valid)
        text_pos = text_start[:, None] + torch.arange(n, device=device)
        index = [torch.arange(layout.num_slots, device=device), torch.arange(layout.text_start, layout.text_start + n, device=device)]
        key_valid = [slot_valid, valid]
        positions = [slot_pos, text_pos]
        parts = [embeds.new_zeros(B, layout.num_slots, embeds.shape[-1]), embeds]
        if fold and self._fold_runs_specials:
            n_fold_specials = layout.fold_positions.numel()
            index.append(torch.arange(layout.beacon_start, layout.beacon_start + n_fold_specials, device=device))
            key_valid.append(valid.new_ones(B, n_fold_specials))
            positions.append(text_start[:, None] + layout.fold_positions)
            parts.append(self._special_embeddings(B, embeds.dtype))
        index = torch.cat(index)
        allowed = layout.mask(index[None].expand(B, -1), index, torch.cat(key_valid, dim=1))
        position_ids = torch.cat(positions, dim=1)
        hidden = torch.cat(parts, dim=1)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        mask = self._attention_mask(allowed, embeds.dtype)
        return hidden, mask, position_embeddings, position_ids, index, valid[:, :n_fold]

    def _chunk_layer_step(self, layer, hidden, chunk, state, fold, n_text):
        """Run one decoder layer on one window of ``n_text`` text tokens: inject memory, run, read the next memory
        if folding (from the chunk's own text, the first ``chunk[4].shape[1]`` tokens)."""
        mask, position_embeddings, position_ids = chunk[:3]
        P = self.config.memory_slots
        hidden = torch.cat([state.slots(layer).to(hidden.dtype), hidden[:, P:]], dim=1)
        text_in = hidden[:, P : P + chunk[4].shape[1]]
        out = self._run_layer(layer, hidden, mask, position_embeddings, position_ids)
        new_memory = None
        if fold:
            specials = out[:, P + n_text :] if self._fold_runs_specials else None
            temp_in, candidate = self._fold_inputs(layer, specials, text_in, chunk[4])
            new_memory = self._fold_into_memory(layer, state, temp_in, candidate)
        return out, new_memory

    def _fold_inputs(self, layer: int, specials, text_states: torch.Tensor, valid: torch.Tensor):
        """What layer ``layer`` folds into memory: the temporary memory's input (None without one) and the
        global candidate. ``specials`` (B, nb + G, d) are the fold's beacon and readout outputs (None where they
        did not run, see `_fold_runs_specials`); ``text_states`` (B, n, d) the layer's input states of the folded
        chunk's text, ``valid`` (B, n) which of them are real."""
        nb = self.config.beacons_per_chunk
        if self.config.temp_write == "tail":  # a folded chunk is full: its last nb tokens
            temp_in = text_states[:, text_states.shape[1] - nb :]
        else:
            temp_in = specials[:, :nb] if nb else None
        if self.config.global_write == "window":
            candidate = self._select_window(layer, text_states, valid)
        else:
            candidate = specials[:, nb:]
        return temp_in, candidate

    def _select_window(self, layer: int, text_states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The global-memory candidate of ``global_write="window"`` (see `CometLayerMemory.select_window`); each
        layer's window scores are kept in ``self.window_scores`` while ``self.record_window_scores`` is True (to
        supervise the choice in training)."""
        window, scores = self.comet_memory.layers[layer].select_window(text_states, valid, self.config.global_mem_size)
        if self.record_window_scores:
            self.window_scores.append(scores)
        return window

    @staticmethod
    def _advance(state: CometMemoryState, new_memories, validity) -> CometMemoryState:
        return CometMemoryState(
            global_state=[m[0] for m in new_memories],
            global_memory=[m[1] for m in new_memories],
            temp_memory=[m[2] if m[2] is not None else t for m, t in zip(new_memories, state.temp_memory, strict=True)],
            global_valid=validity[0],
            temp_valid=validity[1],
        )

    def _forward_chunks(self, tokens: _TokenSource, on_text, layer_major: bool, temp_budget, recorder: _OutputRecorder):
        """Read the input chunk by chunk without a cache; ``on_text(columns, real, hidden)`` receives each window's
        normalised final text states with their original columns (B, n) and which of them are real tokens."""
        L = tokens.length
        layout = self._layout(tokens.device)
        state = CometMemoryState.empty(self.config, tokens.batch_size, tokens.dtype, tokens.device)
        windows = self._windows(L)
        folded = torch.ones(tokens.batch_size, dtype=torch.bool, device=tokens.device)
        num_layers = self.config.base_config.num_hidden_layers
        P = self.config.memory_slots
        columns = [tokens.columns(tokens.span(emit, stop)) for _, _, stop, emit in windows]
        real = [tokens.valid[:, emit:stop] for _, _, stop, emit in windows]
        emitted = [slice(P + emit - start, P + stop - start) for start, _, stop, emit in windows]

        def embed_window(i, start, stop):
            embeds = tokens.embed(tokens.span(start, stop))
            recorder.hidden(0, columns[i], real[i], embeds[:, emitted[i].start - P :])
            return embeds

        if not layer_major:
            for i, (start, end, stop, _) in enumerate(windows):
                fold = end < L
                embeds = embed_window(i, start, stop)
                hidden, *chunk = self._chunk_inputs(embeds, tokens.valid[:, start:stop], state, fold, layout, end - start)
                new_memories = []
                for layer in range(num_layers):
                    hidden, new_memory = self._chunk_layer_step(layer, hidden, chunk, state, fold, stop - start)
                    recorder.layer_output(layer, columns[i], real[i], hidden, emitted[i], chunk[3])
                    new_memories.append(new_memory)
                on_text(columns[i], real[i], self.norm(hidden[:, emitted[i]]))
                if fold:
                    state = self._advance(state, new_memories, self._fold_validity(state, folded, temp_budget))
            return

        # Layer-major: every chunk through layer l before layer l+1 (training; it keeps every chunk anyway).
        def record(layer, i, hidden, key_index):
            recorder.layer_output(layer, columns[i], real[i], hidden, emitted[i], key_index)

        hiddens, chunks, states = self._layer_major_chunks(embed_window, tokens.valid, windows, L, state, temp_budget)
        for layer in range(num_layers):
            self._layer_over_chunks(layer, hiddens, chunks, states, windows, L, on_output=record)
        for i in range(len(windows)):
            on_text(columns[i], real[i], self.norm(hiddens[i][:, emitted[i]]))

    def _layer_major_chunks(
        self, embed_window, valid, windows, total_length: int, first_state: CometMemoryState, temp_budget: int | None = None
    ):
        """Inputs of each window (see `_windows`) and the memory state each starts from, for layer-major execution.

        ``embed_window(i, start, stop)`` gives window i's (B, stop - start, d) input embeddings. Which slots are valid
        depends only on the chunk index, so every window's mask and positions can be built before any layer runs;
        the states' tensors are filled layer by layer by `_layer_over_chunks`.
        """
        layout = self._layout(valid.device)
        B = valid.shape[0]
        folded = torch.ones(B, dtype=torch.bool, device=valid.device)
        states, chunks, hiddens = [first_state], [], []
        for i, (start, end, stop, _) in enumerate(windows):
            fold = end < total_length
            embeds = embed_window(i, start, stop)
            hidden, *chunk = self._chunk_inputs(embeds, valid[:, start:stop], states[-1], fold, layout, end - start)
            hiddens.append(hidden)
            chunks.append(chunk)
            nxt = CometMemoryState.empty(self.config, B, embeds.dtype, embeds.device)
            if fold:
                nxt.global_valid, nxt.temp_valid = self._fold_validity(states[-1], folded, temp_budget)
            states.append(nxt)
        return hiddens, chunks, states

    def _layer_over_chunks(self, layer: int, hiddens, chunks, states, windows, total_length: int, on_output=None) -> None:
        """Run layer ``layer`` over consecutive windows, handing each chunk's new memory to the next (in place)."""
        for i, (start, end, stop, _) in enumerate(windows):
            fold = end < total_length
            hiddens[i], new_memory = self._chunk_layer_step(layer, hiddens[i], chunks[i], states[i], fold, stop - start)
            if on_output is not None:
                on_output(layer, i, hiddens[i], chunks[i][3])
            if fold:
                nxt = states[i + 1]
                nxt.global_state[layer], nxt.global_memory[layer] = new_memory[0], new_memory[1]
                if new_memory[2] is not None:
                    nxt.temp_memory[layer] = new_memory[2]

    # ------------------------------------------------------------------ cache path (generation, reading)
    def _cache_step(self, cache: CometCache, hidden, query_index, position_ids, slot_rows: int = 0, on_layer=None):
        """Run all layers on queries written at ``query_index`` (B, q) of the window buffer; return each layer's
        output (B, q, d).

        The first ``slot_rows`` queries are the memory slots of freshly opened windows: before each layer their
        hidden states are overwritten with that layer's memory, and only their keys and values are used.
        """
        layout = self._layout(hidden.device)
        keys = torch.arange(layout.size, device=hidden.device)
        allowed = layout.mask(query_index, keys, cache.key_valid)
        padding = query_index == layout.scratch
        allowed = torch.where(padding[:, None, :, None], (keys == layout.scratch)[None, None, None, :], allowed)
        mask = self._attention_mask(allowed, hidden.dtype)
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        cache._write_index = query_index
        outputs = []
        try:
            text_slot = query_index - layout.text_start  # where a text query sits in the window's text
            is_text = (text_slot >= 0) & (text_slot < self.config.chunk_size)
            for layer in range(self.config.base_config.num_hidden_layers):
                if slot_rows:
                    hidden = torch.cat([cache.memory.slots(layer).to(hidden.dtype), hidden[:, slot_rows:]], dim=1)
                if cache.text_states and bool(is_text.any()):  # the window write and the tail read these at a fold
                    _scatter_rows(cache.text_states[layer], text_slot.clamp(min=0), is_text, hidden)
                hidden = self._run_layer(layer, hidden, mask, position_embeddings, position_ids, cache=cache)
                if on_layer is not None:
                    on_layer(layer, hidden=hidden, key_index=keys)
                outputs.append(hidden)
        finally:
            cache._write_index = None
        return outputs

    def _start_windows(self, cache: CometCache, samples: torch.Tensor) -> None:
        """Open a fresh window for ``samples`` (B,) bool: clear it. Its memory slots' keys and values are written
        together with the window's first text (one pass instead of two)."""
        layout = self._layout(samples.device)
        slot_valid = cache.memory.slot_valid(self.config.global_mem_size)
        cache.key_valid = torch.where(samples[:, None], False, cache.key_valid)
        cache.key_valid[:, : layout.num_slots] = torch.where(
            samples[:, None], slot_valid, cache.key_valid[:, : layout.num_slots]
        )
        cache.window_fill = torch.where(samples, 0, cache.window_fill)
        cache.slots_pending = cache.slots_pending | (samples & slot_valid.any(1))

    def _fold_windows(self, cache: CometCache, samples: torch.Tensor) -> None:
        """Fold the full windows of ``samples`` into memory (beacons and readouts only) and reopen them."""
        layout = self._layout(samples.device)
        B = samples.shape[0]
        if self._fold_runs_specials:
            n_fold = layout.fold_positions.numel()
            fold_index = torch.arange(layout.beacon_start, layout.beacon_start + n_fold, device=samples.device)
            query_index = torch.where(samples[:, None], fold_index[None], layout.scratch)
            _, text_start = self._slot_positions(cache.memory.slot_valid(self.config.global_mem_size))
            position_ids = text_start[:, None] + layout.fold_positions
            cache.key_valid[:, layout.beacon_start : layout.scratch] = samples[:, None]
            dtype = cache.memory.global_memory[0].dtype
            outputs = self._cache_step(cache, self._special_embeddings(B, dtype), query_index, position_ids)
        else:  # both memories come from the window's text states (kept in the cache): no pass to run
            outputs = [None] * len(cache.text_states)
        state = cache.memory
        new_memories = []
        full = torch.ones(B, self.config.chunk_size, dtype=torch.bool, device=samples.device)  # a folded window is full
        for layer, out in enumerate(outputs):
            text = cache.text_states[layer][:, : self.config.chunk_size] if cache.text_states else None
            temp_in, candidate = self._fold_inputs(layer, out, text, full)
            g_state, g_memory, temp = self._fold_into_memory(layer, state, temp_in, candidate)
            keep = samples[:, None, None]
            new_memories.append(
                (
                    torch.where(keep, g_state, state.global_state[layer]),
                    torch.where(keep, g_memory, state.global_memory[layer]),
                    None if temp is None else torch.where(keep, temp, state.temp_memory[layer]),
                )
            )
        cache.memory = self._advance(state, new_memories, self._fold_validity(state, samples))
        self._start_windows(cache, samples)

    def _append_to_windows(self, cache: CometCache, hidden, real, on_layer=None) -> torch.Tensor:
        """Append input states ``hidden`` (B, q, d) to each sample's live window after its ``window_fill`` tokens
        (rows where ``real`` (B, q) is False are padding), run every layer on them and return the last layer's
        outputs for them (B, q, d). ``on_layer(layer, hidden, key_index, text_rows)`` sees each layer's output."""
        layout = self._layout(hidden.device)
        B, q = real.shape
        steps = torch.arange(q, device=hidden.device)[None]
        rank = cache.window_fill[:, None] + steps  # where each query sits in its window's text
        query_index = torch.where(real, layout.text_start + rank, layout.scratch)
        written = torch.zeros_like(cache.key_valid).scatter_(1, query_index, real)
        written[:, layout.scratch] = False
        cache.key_valid = cache.key_valid | written
        if cache.delayed_inputs is not None:  # the next chunk's first tokens: kept to read again after the fold
            C = self.config.chunk_size
            _scatter_rows(cache.delayed_inputs, (rank - C).clamp(min=0), real & (rank >= C), hidden)
        slot_positions, text_start = self._slot_positions(cache.memory.slot_valid(self.config.global_mem_size))
        position_ids = text_start[:, None] + rank
        slot_rows = layout.num_slots if bool(cache.slots_pending.any()) else 0
        if slot_rows:  # write the memory slots of windows opened since the last step
            slot_index = torch.arange(slot_rows, device=hidden.device)[None]
            query_index = torch.cat([torch.where(cache.slots_pending[:, None], slot_index, layout.scratch), query_index], 1)
            position_ids = torch.cat([slot_positions, position_ids], 1)
            hidden = torch.cat([hidden.new_zeros(B, slot_rows, hidden.shape[-1]), hidden], 1)
            cache.slots_pending = torch.zeros_like(cache.slots_pending)
        record = None if on_layer is None else partial(on_layer, text_rows=slice(slot_rows, None))
        outputs = self._cache_step(cache, hidden, query_index, position_ids, slot_rows, on_layer=record)
        cache.window_fill = cache.window_fill + real.long().sum(1)
        return outputs[-1][:, slot_rows:]

    def _forward_with_cache(self, tokens: _TokenSource, cache: CometCache, on_text, recorder: _OutputRecorder):
        """Append the input to each sample's window, one window's worth at a time, folding windows as they fill.

        A window folds its chunk once it also holds the next chunk's first ``fold_delay`` tokens; those are then
        read again in the new window (see `CometConfig.fold_delay`)."""
        B, L = tokens.batch_size, tokens.length
        W = self.config.window_text
        device = tokens.device
        layout = self._layout(device)
        if not cache.is_initialized:
            cache.allocate(self.config, B, layout.size, tokens.dtype, device)
            self._start_windows(cache, torch.ones(B, dtype=torch.bool, device=device))
        else:
            cache.check_model(self.config)
            if cache.batch_size != B:
                raise ValueError(f"Cache holds {cache.batch_size} sequences but the input has {B}")
        cache.record_tokens(tokens.input_ids, L)
        remaining = tokens.valid.long().sum(1)  # valid tokens come first
        consumed = torch.zeros_like(remaining)
        arange_W = torch.arange(W, device=device)
        D = self.config.fold_delay
        reread = cache.reread_pending  # windows reopened by a fold: their delayed tokens are still to be read again
        # (decoding calls this once per token: a bar is built only for a long input)
        show = L >= PROGRESS_MIN_TOKENS and not torch.compiler.is_compiling()
        bar = tqdm(total=int(remaining.max()), unit="tok", desc="CoMeT reading", leave=False) if show else None
        shown = 0
        while bool((consumed < remaining).any()):
            # One pass per window: a reopened window first reads its delayed tokens again (not emitted), then new ones.
            # A fold at the end of the input leaves that to the next call, so that reading window-sized pieces
            # (`read`) costs one pass of chunk_size + fold_delay tokens per chunk.
            n_again = reread.long() * D  # (B,)
            take = torch.minimum(W - cache.window_fill - n_again, remaining - consumed)  # (B,)
            steps = arange_W[: int((n_again + take).max())][None]  # (1, q)
            again = steps < n_again[:, None]
            real = ~again & (steps < (n_again + take)[:, None])  # (B, q) new tokens
            source = (consumed[:, None] + steps - n_again[:, None]).clamp(min=0)
            columns = tokens.columns(source)
            hidden = tokens.embed(source)
            recorder.hidden(0, columns, real, hidden)
            if D and bool(again.any()):  # the first D rows of a reopened window: its delayed tokens' inputs
                stored = cache.delayed_inputs[:, :D].to(hidden.dtype)
                hidden = torch.cat([torch.where(again[:, :D, None], stored, hidden[:, :D]), hidden[:, D:]], 1)

            def record(layer, hidden, key_index, text_rows, columns=columns, real=real):
                recorder.layer_output(layer, columns, real, hidden, text_rows, key_index)

            out = self._append_to_windows(cache, hidden, again | real, on_layer=record)
            on_text(columns, real, self.norm(out))
            consumed = consumed + take
            if bar is not None:
                read_so_far = int(consumed.max())
                bar.update(read_so_far - shown)
                shown = read_so_far
            folded = cache.window_fill >= W
            if bool(folded.any()):
                self._fold_windows(cache, folded)
            reread = folded & (D > 0)
        if bar is not None:
            bar.close()
        cache.reread_pending = reread

    # ------------------------------------------------------------------ entry points
    def _stream(
        self,
        on_text,
        input_ids=None,
        inputs_embeds=None,
        attention_mask=None,
        cache=None,
        use_cache: bool | None = None,
        layer_major: bool | None = None,
        temp_budget: int | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        """Read the input chunk by chunk and hand each piece of final text states to ``on_text``.

        ``on_text(columns, real, hidden)`` gets the normalised final states (B, n, d) of n input columns
        (``columns`` (B, n) original column indices, ``real`` (B, n) False for padding queries). Nothing of the input's
        length times the hidden size is allocated unless ``inputs_embeds`` or recorded outputs are asked for.

        Returns the cache (or None), the per-layer hidden states and the attentions (None unless asked).
        """
        if torch.compiler.is_exporting() and (use_cache or cache is not None):
            raise ValueError(
                "torch.export of CoMeT covers the cache-free forward only (whole input, fixed shape): pass "
                "use_cache=False (or call model.train()). With a CometCache, when a window folds into memory depends "
                "on the tokens already read, which an exported graph cannot decide."
            )
        B, L, dtype, device = self._input_shape(input_ids, inputs_embeds)
        if attention_mask is None:
            valid = torch.ones(B, L, dtype=torch.bool, device=device)
        else:
            if attention_mask.dim() != 2:
                raise ValueError("CoMeT takes a 2D (batch, length) attention_mask; it builds its own attention layout")
            valid = attention_mask[:, -L:].bool()
        if temp_budget is not None:
            if not self.config.use_temp_memory or not 0 <= temp_budget <= self.config.temp_slots:
                raise ValueError(
                    f"temp_budget must lie in [0, {self.config.temp_slots}] on a model with temporary memory, got {temp_budget}"
                )
            if cache is not None or use_cache:
                raise ValueError("temp_budget applies to the training (no-cache) forward only")
        if use_cache and cache is None:
            cache = CometCache()
        if cache is not None and not isinstance(cache, CometCache):
            raise TypeError(f"CoMeT needs a CometCache, got {type(cache).__name__}")
        if output_attentions and self.config.base_config._attn_implementation != "eager":
            raise ValueError(
                "output_attentions needs attn_implementation='eager' (sdpa does not return attention weights); "
                "load the model with attn_implementation='eager' or call model.set_attn_implementation('eager')"
            )

        tokens = _TokenSource(self.embed_tokens, input_ids, inputs_embeds, valid)
        recorder = _OutputRecorder(self, B, L, tokens.dtype, device, output_hidden_states, output_attentions)

        def on_final(columns, real, hidden):
            recorder.hidden(-1, columns, real, hidden)
            on_text(columns, real, hidden)

        hooks = []
        if recorder.attention_store is not None:
            for i, layer in enumerate(self.layers):
                hooks.append(
                    layer.self_attn.register_forward_hook(
                        lambda module, args, out, i=i: recorder.attention_store.__setitem__(i, out[1])
                    )
                )
        try:
            if cache is not None:
                self._forward_with_cache(tokens, cache, on_final, recorder)
            else:
                major = self.config.layer_major if layer_major is None else layer_major
                self._forward_chunks(tokens, on_final, major, temp_budget, recorder)
        finally:
            for hook in hooks:
                hook.remove()
        return (cache, *recorder.outputs())

    def _input_shape(self, input_ids, inputs_embeds) -> tuple[int, int, torch.dtype, torch.device]:
        """Check the input; return its batch size, length, embedding dtype and device."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
                raise ValueError(
                    f"inputs_embeds must be a non-empty (batch, length, hidden) tensor, got {tuple(inputs_embeds.shape)}"
                )
            return *inputs_embeds.shape[:2], inputs_embeds.dtype, inputs_embeds.device
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.numel() == 0:
            shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got {shape}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        vocab = self.config.base_config.vocab_size
        if torch.compiler.is_compiling():  # a value check cannot be traced: torch.export/compile skip it
            return *input_ids.shape, self.embed_tokens.weight.dtype, input_ids.device
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"input_ids contain id {low if low < 0 else high} outside the model's vocabulary [0, {vocab}): "
                "the tokenizer does not match the base model"
            )
        return *input_ids.shape, self.embed_tokens.weight.dtype, input_ids.device

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: CometCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        layer_major: bool | None = None,
        temp_budget: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): text tokens of any length.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding (left or right). Each sequence is chunked from its own first token.
            position_ids: not a parameter (ignored if passed): CoMeT assigns positions per chunk, restarting in every
                chunk. Leaving it out of the signature also keeps `generate` from building whole-length position ids.
            cache (`CometCache`, *optional*): generation state; when given (or `use_cache=True`), the input is
                appended to it and the live window folds into memory whenever it reaches `chunk_size` (plus `fold_delay`).
            output_attentions (`bool`, *optional*): return, per layer, a `(batch_size, num_heads, sequence_length,
                window_size)` tensor: each text token's attention weights over its chunk's window indices (memory
                slots, text, beacons, readouts; see `CometWindowLayout`), zero where it does not attend. Needs the
                eager attention implementation.
            output_hidden_states (`bool`, *optional*): return `num_hidden_layers + 1` tensors of shape
                `(batch_size, sequence_length, hidden_size)`: the embeddings, every layer's text output, and the
                normalised final state last (padding positions are zero).
            layer_major (`bool`, *optional*): execution order of the no-cache path (default `config.layer_major`).
            temp_budget (`int`, *optional*): see only the newest `temp_budget` temporary memory entries (no-cache path).
        """
        cache = kwargs.pop("past_key_values", cache)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if use_cache is None:
            no_cache_only = self.training or layer_major is not None or temp_budget is not None
            use_cache = cache is not None or (self.config.use_cache and not no_cache_only)
        B, L, dtype, device = self._input_shape(input_ids, inputs_embeds)
        last = torch.zeros(B, L + 1, self.config.base_config.hidden_size, dtype=dtype, device=device)
        cache, hidden_states, attentions = self._stream(
            lambda columns, real, hidden: _scatter_rows(last, columns, real, hidden),
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            layer_major=layer_major,
            temp_budget=temp_budget,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        output = BaseModelOutputWithPast(
            last_hidden_state=last[:, :L],
            hidden_states=hidden_states,
            attentions=attentions,
            **{_OUTPUT_CACHE_FIELD: cache},
        )
        return output if return_dict else output.to_tuple()


class CometForCausalLM(CometPreTrainedModel, GenerationMixin):
    """A pretrained decoder with the CoMeT memory: constant memory and linear time in the input length.

    `CometModel` (``model``) is the backbone; this class adds the LM head and computes the loss chunk by chunk
    from the backbone's per-chunk outputs, so no whole-length logits are needed for training. Base parameter names
    are kept (``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``), so LoRA ``target_modules``
    such as ``q_proj`` work unchanged; every memory parameter lives under the unique module name ``comet_memory``
    (``model.comet_memory.*``; use ``"comet_memory"`` in PEFT's ``modules_to_save``).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CometConfig):
        super().__init__(config)
        self.model = CometModel(config)
        self.lm_head = nn.Linear(config.base_config.hidden_size, config.base_config.vocab_size, bias=False)
        self._register_load_state_dict_pre_hook(_rename_legacy_memory_keys)
        self.post_init()
        self._no_split_modules = list(self.model._no_split_modules)

    @property
    def comet_memory(self) -> CometMemory:
        """The memory module (``self.model.comet_memory``)."""
        return self.model.comet_memory

    # ------------------------------------------------------------------ construction and loading
    @classmethod
    def from_base(cls, base_model_or_path, dtype=None, **memory_fields) -> CometForCausalLM:
        """Build a CoMeT model on a pretrained causal LM, copying its weights and initialising the memory.

        Args:
            base_model_or_path: a loaded `PreTrainedModel` (Llama, Mistral, Qwen2, Qwen3) or a path / repo id.
            dtype: dtype for the new model (defaults to the base model's).
            **memory_fields: any `CometConfig` field, e.g. ``chunk_size=256, global_mem_size=8``.
        """
        if isinstance(base_model_or_path, PreTrainedModel):
            base = base_model_or_path
        else:
            base = AutoModelForCausalLM.from_pretrained(base_model_or_path, dtype=dtype or torch.float32)
        check_supported_base(base.config)
        unknown = sorted(set(memory_fields) - set(CometConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"Unknown CometConfig field(s) {unknown}; memory fields are {list(CometConfig.MEMORY_FIELDS)}")
        if getattr(base, "hf_quantizer", None) is not None:
            base.hf_quantizer.remove_quantization_config(base)
        base_config = copy.deepcopy(base.config)
        attn = base.config._attn_implementation
        config = CometConfig(base_config=base_config, **memory_fields)
        config._attn_implementation = attn
        config.base_config._attn_implementation = attn
        dtype = dtype or base.dtype
        model = cls(config).to(dtype)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
        missing = [k for k in missing if not k.startswith(_MEMORY_PREFIX) and k != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"Base weights do not map onto CoMeT: missing {missing}, unexpected {unexpected}")
        if config.tie_word_embeddings:
            model.tie_weights()
        else:
            model.lm_head.load_state_dict(base.lm_head.state_dict())
        model._init_special_embeddings()
        if base.generation_config is not None:
            model.generation_config = copy.deepcopy(base.generation_config)
        return model

    @classmethod
    def from_pretrained(cls, *args, key_mapping: dict[str, str] | None = None, **kwargs):
        """`PreTrainedModel.from_pretrained`, also loading checkpoints saved with the memory at the top level
        (``comet_memory.*``, before `CometModel` existed); the model saves in the current layout."""
        legacy = {f"^{_LEGACY_MEMORY_PREFIX}": _MEMORY_PREFIX}
        loaded = super().from_pretrained(*args, key_mapping={**legacy, **(key_mapping or {})}, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [
                c for c in conversions if getattr(c, "_original_source_patterns", None) != list(legacy)
            ]
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Name the backbone in the checkpoint's auto_map too: AutoModel.from_pretrained(folder) then loads CometModel.
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", f"{type(self).__module__.rsplit('.', 1)[-1]}.CometModel")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_special_embeddings(self) -> None:
        """Start beacons and readouts near the mean token embedding, where the base model expects its inputs."""
        emb = self.model.embed_tokens.weight
        mean = emb.float().mean(0)
        std = self.config.special_init_std
        mem = self.model.comet_memory
        mem.readout_embedding.copy_(mean + std * torch.randn_like(mem.readout_embedding, dtype=torch.float32))
        if mem.beacon_embedding is not None:
            mem.beacon_embedding.copy_(mean + std * torch.randn_like(mem.beacon_embedding, dtype=torch.float32))

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: CometCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        layer_major: bool | None = None,
        label_weights: torch.Tensor | None = None,
        temp_budget: int | None = None,
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): text tokens of any length.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding (left or right). Each sequence is chunked from its own first token.
            position_ids: not a parameter (ignored if passed): CoMeT assigns positions per chunk, restarting in every
                chunk. Leaving it out of the signature also keeps `generate` from building whole-length position ids.
            cache (`CometCache`, *optional*): generation state; when given (or `use_cache=True`), the input is
                appended to it and the live window folds into memory whenever it reaches `chunk_size` (plus `fold_delay`).
            labels (`torch.LongTensor`, *optional*): next-token targets over the text (-100 ignored). The loss is
                computed chunk by chunk, so no full-length logits are needed for it.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0): keep logits for only the last
                `logits_to_keep` positions (0 keeps all), or for the given indices.
            output_attentions, output_hidden_states: see `CometModel.forward`.
            layer_major (`bool`, *optional*): execution order of the whole-chunk path (default `config.layer_major`).
            label_weights (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): a weight per label
                (aligned with `labels`); the loss is then the weighted mean `Σ w·CE / Σ w` over labelled tokens, e.g. to
                mix an answer loss with a down-weighted language-modelling loss on the text.
            temp_budget (`int`, *optional*): see only the newest `temp_budget` (0 .. `temp_mem_budget`) temporary
                memory entries in this forward (no-cache path); training samples it so the global memory must carry
                what lies beyond that window.
            shift_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): targets already
                aligned with the positions (`shift_labels[:, t]` is the target of token `t`), as sequence- and
                context-parallel trainers pass them; they replace `labels` for the loss (transformers' convention).
        """
        cache = kwargs.pop("past_key_values", cache)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if use_cache is None:
            no_cache_only = (
                self.training or labels is not None or shift_labels is not None or layer_major is not None
                or temp_budget is not None
            )  # fmt: skip
            use_cache = cache is not None or (self.config.use_cache and not no_cache_only)
        B, L, dtype, device = self.model._input_shape(input_ids, inputs_embeds)
        for name, value in (("labels", labels), ("shift_labels", shift_labels)):
            if value is not None and tuple(value.shape) != (B, L):
                raise ValueError(f"{name} must have the input's shape {(B, L)}, got {tuple(value.shape)}")
        if label_weights is not None and (labels is None or label_weights.shape != labels.shape):
            raise ValueError("label_weights needs labels of the same shape")
        if label_weights is not None and shift_labels is not None:
            raise ValueError("label_weights are aligned with labels; pass them with labels, not with shift_labels")
        aligned_labels, shift_labels = shift_labels, None

        # Which input columns need logits: (K,) column indices and, per column, its row in the kept block.
        if isinstance(logits_to_keep, int):
            keep_cols = torch.arange(L - logits_to_keep if logits_to_keep else 0, L, device=device)
        else:
            keep_cols = logits_to_keep.to(device).flatten() % L
        K = keep_cols.numel()
        keep_sorted, keep_order = torch.sort(keep_cols)
        kept = torch.zeros(B, K + 1, self.config.base_config.hidden_size, dtype=dtype, device=device)

        shift_labels = shift_weights = None
        loss_sum = torch.zeros((), device=device)
        if labels is not None or aligned_labels is not None:
            valid = torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None else attention_mask[:, -L:].bool()
            if aligned_labels is None:
                aligned_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
            shift_labels = aligned_labels.to(device).masked_fill(~valid, -100)  # target of column t
            if label_weights is not None:
                shift_weights = F.pad(label_weights[:, 1:].float(), (0, 1)).masked_fill(shift_labels == -100, 0.0)

        def on_text(columns, real, hidden):
            nonlocal loss_sum
            if K:
                found = torch.searchsorted(keep_sorted, columns).clamp(max=K - 1)  # (B, n) into the sorted columns
                _scatter_rows(kept, keep_order[found], real & (keep_sorted[found] == columns), hidden)
            if shift_labels is not None:
                targets = shift_labels.gather(1, columns).masked_fill(~real, -100)
                logits = self.lm_head(hidden).float()
                token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
                if shift_weights is not None:
                    token_loss = token_loss * shift_weights.gather(1, columns).masked_fill(~real, 0.0).flatten()
                loss_sum = loss_sum + token_loss.sum()

        cache, hidden_states, attentions = self.model._stream(
            on_text,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            layer_major=layer_major,
            temp_budget=temp_budget,
            output_hidden_states=bool(
                self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
            ),
            output_attentions=bool(self.config.output_attentions if output_attentions is None else output_attentions),
        )
        logits = self.lm_head(kept[:, :K])
        loss = None
        if shift_labels is not None:
            count = kwargs.get("num_items_in_batch")
            if shift_weights is not None:
                count = shift_weights.sum()
            elif count is None:
                count = (shift_labels != -100).sum()
            loss = loss_sum / torch.as_tensor(count, device=loss_sum.device).clamp(min=1)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions, **{_OUTPUT_CACHE_FIELD: cache}
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------ generation glue
    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        # Refuse up front what would otherwise fail part-way through generation.
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                "CoMeT does not support assisted or prompt-lookup decoding: rejecting draft tokens means cropping "
                "the cache, and text already folded into memory cannot be un-read. Use greedy, sampling or beam search."
            )
        if generation_config.cache_implementation is not None:
            raise ValueError(
                f"CoMeT carries its own fixed-size CometCache; cache_implementation="
                f"{generation_config.cache_implementation!r} is not supported (leave it unset)."
            )
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        # A cache passed in must come from this model and the prompt must extend what it has read.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2 and bool((mask[:, -1] == 0).any()):
            raise ValueError(
                "CoMeT generates after the last column of every row, so a batch must be padded on the left "
                "(tokenizer.padding_side = 'left'); this attention_mask ends in padding."
            )
        if isinstance(cache, CometCache) and cache.is_initialized:
            cache.check_model(self.config)
            if torch.is_tensor(input_ids) and input_ids.dim() == 2 and not input_ids.is_floating_point():
                cache.check_prompt(input_ids)
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        next_sequence_length=None,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        is_first_iteration=False,
        **kwargs,
    ):
        # transformers hands the model a contiguous clone of the ids it has not read yet: at the first step that is
        # the whole prompt, a second copy of a million-token input. CoMeT reads it one chunk at a time from a view,
        # so everything else is prepared as transformers does (from the last column) and the view is passed on.
        kwargs.update(cache=cache, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                      is_first_iteration=is_first_iteration)  # fmt: skip
        if inputs_embeds is not None or not torch.is_tensor(input_ids) or next_sequence_length == 0:
            return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length, **kwargs)
        unread = input_ids if next_sequence_length is None else input_ids[:, -next_sequence_length:]
        if unread.shape[-1] <= 1:
            return super().prepare_inputs_for_generation(unread, **kwargs)
        model_inputs = super().prepare_inputs_for_generation(unread[:, -1:], **kwargs)
        model_inputs["input_ids"] = unread
        return model_inputs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None:
            if generation_config.use_cache is not False:
                model_kwargs["cache"] = CometCache()
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def new_cache(self) -> CometCache:
        """An empty generation state, to pass as ``cache=`` when reading a long input in several calls."""
        return CometCache()

    @torch.no_grad()
    def read(
        self,
        input_ids: torch.LongTensor,
        cache: CometCache | None = None,
        attention_mask: torch.Tensor | None = None,
        progress: bool = False,
    ) -> CometCache:
        """Read ``input_ids`` into a cache (optionally with a progress bar) and return it.

        Each call of the model reads one window: ``chunk_size + fold_delay`` tokens first, then ``chunk_size``
        (with the delayed tokens read again, that is one window's pass each). Continue with
        ``generate(full_input_ids, cache=cache, ...)``: generate only feeds the tokens the cache has not seen. Reading
        everything but the last prompt token leaves it for generate to feed. Padding must be on the left (as
        generate expects), so that every chunk holds real tokens.
        """
        cache = cache if cache is not None else CometCache()
        C, length = self.config.chunk_size, input_ids.shape[1]
        starts = [0, *range(C + self.config.fold_delay, length, C)] if length else []
        with tqdm(total=length, unit="tok", desc="CoMeT reading", disable=not progress) as bar:
            for start, end in zip(starts, [*starts[1:], length], strict=True):
                mask = None if attention_mask is None else attention_mask[:, :end]
                self(input_ids[:, start:end], attention_mask=mask, cache=cache, logits_to_keep=1)
                bar.update(end - start)
        return cache


def _rename_legacy_memory_keys(state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook: map top-level ``comet_memory.*`` keys (the layout before `CometModel`) onto
    ``model.comet_memory.*``, so that old checkpoints and memory-weight files still load."""
    legacy = prefix + _LEGACY_MEMORY_PREFIX
    for key in [k for k in state_dict if k.startswith(legacy)]:
        state_dict[prefix + _MEMORY_PREFIX + key[len(legacy) :]] = state_dict.pop(key)


__all__ = [
    "CometCache",
    "CometForCausalLM",
    "CometLayerMemory",
    "CometMemory",
    "CometMemoryState",
    "CometModel",
    "CometPreTrainedModel",
    "CometWindowLayout",
]

# Saving writes these classes' files into the checkpoint and an auto_map to them, so that
# AutoModel / AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) work without this package.
CometConfig.register_for_auto_class()
CometModel.register_for_auto_class("AutoModel")
CometForCausalLM.register_for_auto_class("AutoModelForCausalLM")
