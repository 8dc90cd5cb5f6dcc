#!/usr/bin/env bash
# The GPU work in one command, sized for a short lease on one GPU:
#   1. a check of the CUDA paths (about a minute; stops the job at the first failure; fp16 with loss
#      scaling, gradient accumulation, the frozen blocks' cache and the 8-bit batches' normalisation on the
#      device are reported),
#   2. the ops one step dispatches (benchmarks/op_count.py: kernels per step, full against ALaST),
#   3. the planner's host time per step (benchmarks/planner_time.py), then where a batch-64 step's time
#      goes (benchmarks/gpu_profile.py, DeiT-S: the host's launch against the device's time),
#   4. the plan's peak memory against the device's on every step of a DeiT-S run at 0.5x
#      (benchmarks/memory_per_step.py, fp32 and bf16),
#   5. the speed grid (benchmarks/gpu_speed.py): eager ViT-B/16, DeiT-S and DINOv3-S (rotary position
#      embeddings, 256 patch tokens; last, so the deadline cuts it first) at batch 256 and 64, then
#   6. the data path end to end: how fast batches of photos come (benchmarks/data_speed.py, with and
#      without the decoded-image cache, with and without workers), then `alast train` from that image
#      folder, full fine-tuning and ALaST, with the cache and without, and ALaST with the frozen blocks'
#      cache on the GPU (each run's summary.json),
#   7. ViT-B/16 compiled at batch 256, each stopped at the job's deadline (rows are written as they come),
#   8. with PRETRAIN=1 only, first: pre-training of the 12-block backbone again
#      (examples/pretrain_vit12_backbone.py, MINUTES of training; the shipped weights came from it).
# Everything lands in OUT_DIR: the JSON of each step (and the backbone's weights and record with
# PRETRAIN=1), and nothing else.
#
#   bash benchmarks/gpu_job.sh OUT_DIR                 # on a CUDA machine
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_job.sh DIR  # the same steps, tiny, on the CPU (a dry run)
set -uo pipefail
OUT_DIR=${1:?usage: bash benchmarks/gpu_job.sh OUT_DIR}
DEVICE=${DEVICE:-cuda}
MINUTES=${MINUTES:-4.5}          # pre-training loop's wall clock
DEADLINE_S=${DEADLINE_S:-520}    # the whole job ends by then (the speed grids are cut there)
PY=${PYTHON:-python3}
START=$(date +%s)
mkdir -p "$OUT_DIR"
left() { echo $((DEADLINE_S - ($(date +%s) - START))); }
upto() { local s=$(($(left) - $1)); echo $((s > 1 ? s : 1)); }  # seconds left, less a reserve

PRECISION=bf16
[[ $DEVICE == cpu ]] && PRECISION=fp32
if [[ -n "${QUICK:-}" ]]; then
  PRE=(--steps 4 --batch-size 16 --classes 10 --eval-size 20 --log-every 2)
  OPS=(--models alast_demo_vit)
  PLANNER=(--models alast_demo_vit --targets 0.5 --steps 50 --rounds 1)
  PROFILE=(--model alast_demo_vit --batch 8 --warmup 1 --steps 2)
  MEMORY=(--data random:32 --steps 3 --batch-size 8 --target-flops 0.5)
  GRID=(--models alast_demo_vit --batches 8 --steps 2 --warmup 1 --precision fp32)
  COMPILED=(--models alast_demo_vit --batches 8 --steps 2 --warmup 2 --precision fp32)
  PHOTOS=(--model alast_demo_vit --images 64 --batch-size 16 --passes 2)
  E2E=(--model alast_demo_vit --steps 4 --batch-size 16)
else
  PRE=(--minutes "$MINUTES" --log-every 1000)
  OPS=(--models deit_small_patch16_224,vit_base_patch16_224)
  PLANNER=(--models deit_small_patch16_224,alast_vit12 --targets 0.5,0.4)
  PROFILE=(--model deit_small_patch16_224 --batch 64)
  MEMORY=(--model deit_small_patch16_224 --data random:512 --steps 8 --batch-size 64 --target-flops 0.5)
  GRID=(--models vit_base_patch16_224,deit_small_patch16_224,vit_small_patch16_dinov3 --batches 256,64 --steps 8 --warmup 4)
  COMPILED=(--models vit_base_patch16_224 --batches 256 --steps 8 --warmup 6)
  PHOTOS=(--model deit_small_patch16_224 --images 1024 --batch-size 128 --passes 3)
  E2E=(--model deit_small_patch16_224 --steps 60 --batch-size 128)
fi
WORKERS=$(( $(nproc) - 1 < 8 ? $(nproc) - 1 : 8 ))

echo "== check ($(date -u +%T))"
[[ $DEVICE == cuda ]] && { nvidia-smi -L || exit 1; }
$PY -c "import torch, timm, pydantic, fvcore, safetensors; print('torch', torch.__version__, 'timm', timm.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1
CHECK=$(mktemp -d)
$PY examples/pretrain_vit12_backbone.py --device "$DEVICE" --steps 3 --batch-size 16 --classes 10 --eval-size 20 \
  --log-every 2 --out "$CHECK/w.safetensors" || exit 1
$PY benchmarks/gpu_speed.py --device "$DEVICE" --models alast_demo_vit --batches 8 --steps 2 --warmup 1 \
  --compile off --targets 0.5 --precision fp32 --out "$CHECK/speed.json" || exit 1
if [[ $DEVICE == cuda ]]; then
  # fp16 with loss scaling (GPUs without bf16): a grid row (its host syncs should be 0), then the demo
  # at 0.5x (its summary: accuracy, skipped_updates); reported, not fatal
  timeout 120 $PY benchmarks/gpu_speed.py --device cuda --models alast_demo_vit --batches 64 --steps 4 --warmup 2 \
    --compile off --targets 0.5 --precision fp16 --out "$OUT_DIR/fp16_speed_check.json" \
    || echo "warning: the fp16 grid row failed"
  timeout 180 $PY -m alast_cli train --target-flops 0.5 --set backend.precision=fp16 --out "$CHECK/fp16_run" \
    && cp "$CHECK/fp16_run/summary.json" "$OUT_DIR/fp16_demo_summary.json" || echo "warning: the fp16 demo run failed"
fi
# gradient accumulation on the device: passes give the one-pass losses at a lower peak (reported, not fatal)
[[ $DEVICE == cuda ]] && { $PY -m pytest -q -n 0 -p no:cacheprovider -m gpu tests/runtimes/test_micro_batch.py \
  || echo "warning: tests/runtimes/test_micro_batch.py failed on the GPU"; }
# the frozen blocks' cache kept on the device: the steps that read it are the steps that compute them, and
# launching them makes no host sync (reported, not fatal)
[[ $DEVICE == cuda ]] && { $PY -m pytest -q -n 0 -p no:cacheprovider -m gpu tests/runtimes/test_frozen_cache.py \
  || echo "warning: tests/runtimes/test_frozen_cache.py failed on the GPU"; }
# 8-bit batches normalised on the device: the host's float images to the bit (reported, not fatal)
$PY -m pytest -q -n 0 -p no:cacheprovider -rs tests/runtimes/test_images.py \
  || echo "warning: tests/runtimes/test_images.py failed: 8-bit batches normalised on the device are not the host's"

if [[ -n "${PRETRAIN:-}" ]]; then
  echo "== pre-training ($(date -u +%T), $(left) s left)"
  $PY examples/pretrain_vit12_backbone.py --device "$DEVICE" "${PRE[@]}" --out "$OUT_DIR/alast_vit12_fdsl.safetensors" \
    || exit 1
fi

echo "== ops per step ($(date -u +%T), $(left) s left)"
timeout "$(upto 60)" $PY benchmarks/op_count.py --device "$DEVICE" --precision "$PRECISION" "${OPS[@]}" \
  --out "$OUT_DIR/op_count.json"
echo "== the planner's host time per step ($(date -u +%T), $(left) s left)"
timeout "$(upto 60)" $PY benchmarks/planner_time.py "${PLANNER[@]}" --out "$OUT_DIR/planner_time.json"
echo "== a batch-64 step's time ($(date -u +%T), $(left) s left)"
timeout "$(upto 60)" $PY benchmarks/gpu_profile.py --device "$DEVICE" --precision "$PRECISION" "${PROFILE[@]}" \
  --out "$OUT_DIR/gpu_profile.json"

echo "== the plan's memory against the device's, every step ($(date -u +%T), $(left) s left)"
PRECISIONS=(fp32)
[[ $PRECISION != fp32 ]] && PRECISIONS+=("$PRECISION")  # bf16 on CUDA: the plan prices fp32 activations
for prec in "${PRECISIONS[@]}"; do
  timeout "$(upto 60)" $PY benchmarks/memory_per_step.py --device "$DEVICE" --precision "$prec" "${MEMORY[@]}" \
    --out "$OUT_DIR/memory_per_step_$prec.json"
done

echo "== speed grid, eager ($(date -u +%T), $(left) s left)"
timeout "$(upto 60)" $PY benchmarks/gpu_speed.py --device "$DEVICE" "${GRID[@]}" --compile off \
  --out "$OUT_DIR/gpu_speed_eager.json"
echo "== the data path: photos, cached and not, to alast train ($(date -u +%T), $(left) s left)"
E2E_DIR=$(mktemp -d)
timeout "$(upto 150)" $PY benchmarks/data_speed.py "${PHOTOS[@]}" --workers "0,$WORKERS" \
  --write-folder "$E2E_DIR/photos" --out "$OUT_DIR/data_speed.json"
for policy in full alast; do
  for cache in auto false; do
    timeout "$(upto 60)" $PY -m alast_cli train --data "imagefolder:$E2E_DIR/photos" "${E2E[@]}" --policy "$policy" \
      --set "data.cache=$cache" --set "backend.device=$DEVICE" --out "$E2E_DIR/$policy-$cache" --json > /dev/null \
      && cp "$E2E_DIR/$policy-$cache/summary.json" "$OUT_DIR/train_photos_${policy}_cache_$cache.json"
  done
done
# the frozen blocks' cache kept on the GPU (auto leaves it off there): its step time and peak against
# the alast run above (the images repeat every 8 steps, so most steps read it)
timeout "$(upto 60)" $PY -m alast_cli train --data "imagefolder:$E2E_DIR/photos" "${E2E[@]}" --policy alast \
  --set backend.frozen_cache=on --set "backend.device=$DEVICE" --out "$E2E_DIR/alast-frozen-on" --json > /dev/null \
  && cp "$E2E_DIR/alast-frozen-on/summary.json" "$OUT_DIR/train_photos_alast_frozen_cache_on.json"
echo "== speed grid, compiled ($(date -u +%T), $(left) s left)"
timeout "$(upto 0)" $PY benchmarks/gpu_speed.py --device "$DEVICE" "${COMPILED[@]}" --compile on \
  --out "$OUT_DIR/gpu_speed_compiled.json"
echo "== done ($(date -u +%T), $(($(date +%s) - START)) s)"
