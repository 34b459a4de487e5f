#!/usr/bin/env bash
# GPU check on one GPU (sized for an H200, < 8 minutes), after `EXTRAS=all bash scripts/setup.sh`:
#   1. bf16 ViT-B/16 training steps with the clip and the mgll loss: img/s each, their ratio, peak memory
#   2. `mgll train` under ZeRO-2 (configs/deepspeed/zero2.json) end to end on synthetic 224 px data
#   3. `mgll swap` of that encoder into a LLaVA-shaped model at Llama-7B widths (LM_LAYERS of its 32 decoder
#      layers, default 16; random weights) and one `mgll align` stage-2 (LoRA) run under ZeRO-3
#   4. large_batch: bf16 ViT-B/16, effective batch 4096 as 16 micro-batches of 256 (train.accum_steps) vs plain 256
# and writes benchmarks/results/gpu.md. `--cpu-smoke` runs the same phases at tiny sizes on CPU and writes
# the report into the scratch folder instead (a check of the script, not GPU figures).
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke     # anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-$(mktemp -d -t mgll-gpu-check.XXXXXX)}
# USE_HUB_KERNELS=0: transformers 5.2x fetches hub kernels in every from_pretrained on CUDA, which fails offline
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false USE_HUB_KERNELS=0
FLAGS=()
OUT=benchmarks/results/gpu.md
if [ "${1:-}" = "--cpu-smoke" ]; then
  FLAGS=(--cpu-smoke)
  OUT="$WORK/gpu.md"
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
fi
echo "gpu_check: scratch folder $WORK"
for phase in speed zero2 align large_batch; do
  echo "== $phase"
  "$PY" benchmarks/gpu_check.py "$phase" --work "$WORK" "${FLAGS[@]}"
done
if [ ${#FLAGS[@]} -eq 0 ]; then
  # the encoder-core benchmark on the GPU: mgll/clip step-time ratio and the gradient-checkpointing memory cut
  # as torch.cuda.max_memory_allocated (ViT-B-32, batch 32), next to the CPU figures in results/loss_overhead.md
  echo "== loss_overhead (cuda)"
  "$PY" benchmarks/loss_overhead.py --device cuda --configs vitb32 --mem-losses clip,mgll \
    --out benchmarks/results/gpu_loss_overhead || echo "loss_overhead on cuda failed"
fi
"$PY" benchmarks/gpu_check.py report --work "$WORK" --out "$OUT" "${FLAGS[@]}"
