#!/usr/bin/env bash
# The GPU case in one prepared command (at most 10 minutes): the edge's split-KD step
# alone at fp32, bf16 and bf16 + torch.compile, then the LM benchmark's gpu preset end to end
# (8 role devices, 3 rounds, splitkd, bf16 + compile; a teacher of one epoch, to fit the time).
# MFU is against PEAK_TFLOPS (default 989: an H200's dense BF16 by the datasheet) for every row.
#   experiments/bench_gpu.sh DATA_PATH LOG_DIR [key=value ...]   (overrides for every run)
set -u
data=${1:?usage: bench_gpu.sh DATA_PATH LOG_DIR [key=value ...]}
logs=${2:?usage: bench_gpu.sh DATA_PATH LOG_DIR [key=value ...]}
shift 2
py=${PYTHON:-python3}
bench=(experiments/bench_lm.py --data-path "$data" --device "${DEVICE:-cuda}" --preset gpu
       --peak-tflops "${PEAK_TFLOPS:-989}")
mkdir -p "$logs"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
for variant in fp32 bf16 bf16-compile; do
  steps=20; flags=(--precision "${variant%-compile}")
  [ "$variant" = fp32 ] && steps=8
  [ "$variant" = bf16 ] && flags+=(--profile)
  [ "$variant" = bf16-compile ] && flags+=(--compile)
  limit=90; [ "$variant" = bf16-compile ] && limit=150
  TORCH_LOGS=recompiles timeout "$limit" "$py" "${bench[@]}" --edge-steps "$steps" "${flags[@]}" "$@" \
    >"$logs/edge-$variant.log" 2>&1 || echo "edge step $variant: exit $?"
  grep "^edge step alone" "$logs/edge-$variant.log"
done
TORCH_LOGS=recompiles timeout 270 "$py" "${bench[@]}" --devices 8 --precision bf16 --compile teacher-epochs=1 "$@" --methods splitkd \
  >"$logs/lm.log" 2>&1 || echo "end to end: exit $?"
tail -3 "$logs/lm.log"
