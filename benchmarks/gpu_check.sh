#!/bin/bash
# The one prepared device check (benchmarks/README.md, "GPU check"): every GPU comparison in one
# call of at most ~9.5 minutes (BUDGET seconds, default 570), most important first, each part under its own `timeout` so a hang
# loses only that part. Run from the repo root on the GPU machine, with the wheels of the packages
# missing there in .whl/ (ml_collections grain array-record portpicker tensorboardX mlxtend gguf:
# the command in ../shared/reference/gpu.md; kd_jax imports gguf) and (only for part 3) the MiniLM bundle in .gpu_bundle/
# (experiments/minilm/make_gpu_bundle.py). Writes logs and JSON to $OUT (default /tmp/gpu_check).
set -u
T_START=$(date +%s)
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - T_START) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
  --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax, torch, transformers as t; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', t.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

# 1. The table at B=256, T=128: kd_jax variants (+ profile of the baseline and the best), then
#    PyTorch torch.compile / eager in bf16 autocast and eager float32 (TF32). The first variant's
#    start-up (process start to first step) is printed with it.
timeout -k 10 ${T1:-270} python3 benchmarks/minilm_gpu.py --torch_python python3 --iters 15 \
  --variants ${VARIANTS:-bf16,bf16_best,f32} --profile bf16,bf16_best \
  --torch_modes ${TORCH_MODES:-compile_bf16,eager_bf16,eager_f32} --torch_timeout 100 \
  --json "$OUT/minilm_t128.json" 2>&1 | tee "$OUT/minilm_t128.txt"
echo "== part 1 done, $(left) s left"

# 2. The long-sequence setting, B=64, T=512 (the same tokens per step): the best kd_jax variant
#    against torch.compile and eager bf16.
if [ "$(left)" -gt 90 ]; then
  timeout -k 10 $(( $(left) - 20 < ${T2:-200} ? $(left) - 20 : ${T2:-200} )) python3 \
    benchmarks/minilm_gpu.py --torch_python python3 --iters 10 --batch 64 --length 512 \
    --variants bf16_best --profile bf16_best --torch_modes compile_bf16,eager_bf16 \
    --torch_timeout 100 --json "$OUT/minilm_t512.json" 2>&1 | tee "$OUT/minilm_t512.txt"
  echo "== part 2 done, $(left) s left"
fi

# 3. The longer MiniLM ablation (needs .gpu_bundle; measured on 2026-11-30, so only when asked
#    for by carrying the bundle), arms in priority order; each finished arm is in the JSON even
#    if the timeout stops a later one.
if [ -d .gpu_bundle ] && [ "$(left)" -gt 60 ]; then
  timeout -k 15 $(( $(left) - 25 )) env PYTHONPATH=.gpu_bundle:$PYTHONPATH python3 -u \
    experiments/minilm/run_ablation.py --steps 1000 --seeds 3 \
    --runs ${ABLATION_RUNS:-at_vr mlm mlm_flops at v2 at_vr_192 ta} \
    --workdir /tmp/minilm_long --out "$OUT/ablation_long.json" > "$OUT/ablation_long.log" 2>&1
  grep -v "^I[0-9]" "$OUT/ablation_long.log" | tail -40
fi
echo "== all done in $(( $(date +%s) - T_START )) s"
