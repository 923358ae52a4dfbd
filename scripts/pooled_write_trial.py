"""Trial of a different *write* path for the global memory: attention pooling of the chunk's own token states.

    OMP_NUM_THREADS=1 python -m scripts.pooled_write_trial train --config training/recipes/smollm2_distill.yaml \\
        --output_dir ~/.cache/comet/runs/smollm2-pooled
    OMP_NUM_THREADS=1 python -m scripts.pooled_write_trial diagnose FOLDER CHECKPOINT [--samples 12]
    (either with --write window: one soft choice of G consecutive tokens instead of G independent poolings)

`scripts.memory_oracle` shows that SmolLM2 reads a key from its global memory slots without any training when the
slots hold the base model's own hidden states of the key's tokens (the input of each layer): the read path works,
and what the memory fails to learn is the write path. The model as designed writes the memory from the readout
tokens' *outputs* (DESIGN §1), which a pretrained model does not produce in the form its layers read. This trial
writes each layer's global-memory candidate instead as ``G`` attention-pooled mixtures of the layer's input states
of the chunk's text (one learned query per slot and layer over the RMS-normalised states), then the usual norm,
gate and adapter. It patches `CometModel` in this process only (whole-chunk path; the cached generation path is
not patched, so the diagnostic scores without a cache): it is an experiment, not a model option.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

WRITE = {"mode": "pool"}


def patch(mode: str = "pool") -> None:
    WRITE["mode"] = mode
    from modeling_comet import modeling_comet as mc

    if getattr(mc.CometModel, "_pooled_write", False):
        return
    original_init = mc.CometLayerMemory.__init__

    def init(self, config):
        original_init(self, config)
        d = config.base_config.hidden_size
        generator = torch.Generator().manual_seed(len(config.base_config.model_type) + d)
        self.pool_query = nn.Parameter(0.1 * torch.randn(config.global_mem_size, d, generator=generator))
        self.pool_norm = mc.CometRMSNorm(d, eps=config.base_config.rms_norm_eps)

    def chunk_layer_step(self, layer, hidden, chunk, state, fold, n_text):
        mask, position_embeddings, position_ids = chunk[:3]
        P = self.config.memory_slots
        hidden = torch.cat([state.slots(layer).to(hidden.dtype), hidden[:, P:]], dim=1)
        text_in = hidden[:, P : P + n_text]
        out = self._run_layer(layer, hidden, mask, position_embeddings, position_ids)
        new_memory = None
        if fold:
            mem = self.comet_memory.layers[layer]
            keys = mem.pool_norm(text_in).float()
            G = mem.pool_query.shape[0]
            if WRITE["mode"] == "window" and n_text >= G:
                # One soft choice of G consecutive tokens, scored by the window's last token: slot j holds
                # the j-th token of the chosen window, so the slots keep the text's order and positions.
                # Unscaled logits: the window choice has to become sharp, and dividing by sqrt(d) made the query's
                # norm grow ~24x slower than that needs (the first trial stayed at 5% on the right window).
                scores = keys[:, G - 1 :] @ mem.pool_query[0].float()  # (B, n-G+1)
                windows = text_in.float().unfold(1, G, 1)  # (B, n-G+1, d, G)
                pooled = torch.einsum("bw,bwdg->bgd", scores.softmax(-1), windows)
                if self.training:
                    self._trial_scores.append(scores)
            else:
                scores = torch.einsum("bnd,gd->bgn", keys, mem.pool_query.float()) / math.sqrt(keys.shape[-1])
                pooled = scores.softmax(-1) @ text_in.float()  # (B, G, d)
            start, nb = P + n_text, self.config.beacons_per_chunk
            beacon_out = out[:, start : start + nb] if nb else None
            new_memory = self._fold_into_memory(layer, state, beacon_out, pooled.to(out.dtype))
        return out, new_memory

    def no_cache(self, *args, **kwargs):
        raise NotImplementedError("the pooled-write trial patches the whole-chunk path only: pass use_cache=False")

    mc.CometLayerMemory.__init__ = init
    mc.CometModel._trial_scores = []
    mc.CometModel._chunk_layer_step = chunk_layer_step
    mc.CometModel._cache_step = no_cache
    mc.CometModel._pooled_write = True


def supervise_selection(weight: float) -> None:
    """Window mode: add ``weight`` × the cross-entropy of every layer's window choice, in the chunk that holds the
    sample's key, against the window that ends with the key's last digit (the oracle write of
    `scripts.memory_oracle`): the place of the needle, known when the sample is built, supervises where the memory
    looks, as RAM's contrastive term supervises which segments it keeps. One-sample batches without padding."""
    import torch.nn.functional as F

    from modeling_comet import modeling_comet as mc
    from scripts.memory_oracle import key_window
    from training import comet_trainer

    original = comet_trainer.CometTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spans = inputs.get("answer_spans")
        ids = inputs["input_ids"]
        mc.CometModel._trial_scores = scores = []
        result = original(self, model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        config = comet_trainer.comet_config_of(model)
        C, G, layers = config.chunk_size, config.global_mem_size, config.base_config.num_hidden_layers
        if model.training and spans and spans[0] and ids.shape[0] == 1 and scores:
            start, end = spans[0][0]
            row = ids[0].tolist()
            digits = [t for t in row[start:end] if t in set(row[:start])]
            try:
                last = key_window(row[:start], digits, 1)[-1] if digits else None
            except ValueError:
                last = None
            if last is not None and last // C < len(scores) // layers and last % C >= G - 1:
                chunk, target = last // C, last % C - (G - 1)
                picked = scores[chunk * layers : (chunk + 1) * layers]
                logits = torch.cat([s.float() for s in picked])  # (layers, windows)
                select = F.cross_entropy(logits, torch.full((layers,), target, device=logits.device))
                loss = loss + weight * select
                self._metrics["select_ce"].append(float(select.detach()))
                self._metrics["select_acc"].append(float((logits.argmax(-1) == target).float().mean()))
        mc.CometModel._trial_scores = []
        return (loss, result[1]) if return_outputs else loss

    comet_trainer.CometTrainer.compute_loss = compute_loss


def export(checkpoint: str, output: str, fields: dict) -> None:
    """A window-mode trial checkpoint as a `convert.trained_weights` file for a model built with
    ``global_write="window"`` (``pool_norm`` → ``select_norm``, ``pool_query[0]`` → ``select_query``)."""
    import json
    from pathlib import Path

    from peft import PeftConfig
    from safetensors.torch import load_file, save_file

    from convert.trained_weights import FORMAT, MEMORY

    adapter = load_file(str(Path(checkpoint) / "adapter_model.safetensors"))
    peft = PeftConfig.from_pretrained(checkpoint)
    tensors = {}
    for key, value in adapter.items():
        key = key.removeprefix("base_model.model.")
        if ".comet_memory." in key or key.startswith("model.comet_memory."):
            name = MEMORY + key.split("comet_memory.", 1)[1]
            if name.endswith(".pool_query"):
                name, value = name.replace(".pool_query", ".select_query"), value[0]
            tensors[name.replace(".pool_norm.", ".select_norm.")] = value.contiguous()
        elif ".lora_" in key:
            tensors[key.replace(".default.weight", ".weight")] = value.contiguous()
    metadata = {"format": FORMAT, "lora": json.dumps({"r": peft.r, "alpha": peft.lora_alpha}),
                "memory": json.dumps({**fields, "global_write": "window"})}
    tmp = Path(output).with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(output)


def diagnose(folder: str, checkpoint: str, samples: int, distances) -> dict:
    """Recall diagnostic (`scripts.recall_diagnostic.diagnose_model`) of a base-built CoMeT folder with a trial
    checkpoint's adapter (LoRA merged, memory and pooling queries loaded)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from convert.smollm2 import smollm2_path
    from modeling_comet import CometForCausalLM
    from scripts.recall_diagnostic import diagnose_model

    tokenizer = AutoTokenizer.from_pretrained(folder)
    fields = AutoConfig.from_pretrained(folder)  # the memory settings the trial trained with
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_path()), dtype=torch.float32)
    model = CometForCausalLM.from_base(base, chunk_size=fields.chunk_size, global_mem_size=fields.global_mem_size,
                                       temp_beacon_stride=fields.temp_beacon_stride,
                                       temp_mem_budget=fields.temp_mem_budget)
    model = PeftModel.from_pretrained(model, checkpoint).merge_and_unload().eval()
    return diagnose_model(model, tokenizer, distances, samples)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    mode = "pool"
    if "--write" in args:  # pool (G independent attention poolings) or window (one soft window of G tokens)
        at = args.index("--write")
        mode = args[at + 1]
        del args[at : at + 2]
    patch(mode)
    if "--select_weight" in args:  # window mode: supervise where each layer's window looks (see supervise_selection)
        at = args.index("--select_weight")
        supervise_selection(float(args[at + 1]))
        del args[at : at + 2]
    if args and args[0] == "train":
        from training.comet_trainer import main as train

        train(args[1:])
    elif args and args[0] == "export":  # export CHECKPOINT OUTPUT (memory fields of training/recipes/smollm2_distill.yaml)
        export(args[1], args[2], {"chunk_size": 64, "global_mem_size": 8, "temp_beacon_stride": 16,
                                  "temp_mem_budget": 16, "adapter_rank": 8, "position_layout": "default"})
    elif args and args[0] == "diagnose":
        import argparse
        import json

        parser = argparse.ArgumentParser()
        parser.add_argument("folder")
        parser.add_argument("checkpoint")
        parser.add_argument("--samples", type=int, default=12)
        parser.add_argument("--distances", type=int, nargs="+", default=[0, 1, 2])
        parser.add_argument("--output")
        ns = parser.parse_args(args[1:])
        results = diagnose(ns.folder, ns.checkpoint, ns.samples, ns.distances)
        if ns.output:
            from evaluation.common import atomic_write_json

            atomic_write_json(ns.output, {"samples": ns.samples, "checkpoint": ns.checkpoint, "results": results})
        print(json.dumps(results))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
