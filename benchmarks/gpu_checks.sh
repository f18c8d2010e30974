#!/usr/bin/env bash
# The CUDA checks in one prepared run: `pytest -m gpu`, then the memory, speed and overhead benchmarks on the GPU.
#
#     OUT=gpu-out BUDGET=560 bash benchmarks/gpu_checks.sh      # from the repository root, on a CUDA machine
#
# Phase A (correctness, memory) runs its jobs side by side: each reports its own process's allocator peak, which
# other processes do not touch, and nothing in it is timed. Phase B (timings) runs one job at a time, alone on the
# GPU. Every job has its own log under $OUT and its own time limit; a job that would start with too little of the
# BUDGET (seconds) left is skipped and says so, so the logs of the jobs before it always come back.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
deadline=$((SECONDS + ${BUDGET:-560}))

run() {  # run NAME NEED LIMIT CMD...: CMD > $OUT/NAME.log, if NEED seconds are left; at most LIMIT seconds
    local name=$1 need=$2 limit=$3
    shift 3
    local left=$((deadline - SECONDS))
    if ((left < need)); then
        echo "skipped: $left s left, $need needed" >"$OUT/$name.log"
        return
    fi
    ((limit > left - 5)) && limit=$((left - 5))
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "[$name] exit $? after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/$name.log" >>"$OUT/summary.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, diffusers, peft, accelerate, transformers as t
print(sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__,
      'accelerate', accelerate.__version__, 'transformers', t.__version__, 'cuda', torch.cuda.is_available())"
} >"$OUT/summary.log" 2>&1

# Phase A: the gpu-marked tests and the memory settings of the README table, side by side.
run pytest-gpu 60 300 python3 -m pytest -m gpu -v -rs -p no:cacheprovider tests/test_gpu.py &
memory() {
    local i=0
    for args in "--family sd15 --batch 1 --gradient-checkpointing" "--family sd15 --batch 1" \
        "--family sd15 --batch 4 --gradient-checkpointing" "--batch 1 --gradient-checkpointing" \
        "--batch 8 --gradient-checkpointing" "--batch 1" "--batch 8"; do
        # shellcheck disable=SC2086  # $args is a list of flags
        (echo "== $args"; python3 benchmarks/bench_memory.py $args 2>&1 | grep -v Warning) >"$PARTS/$i.part" &
        i=$((i + 1))
    done
    wait
}
PARTS=$(mktemp -d)
(run memory 60 240 bash -c "$(declare -f memory); PARTS=$PARTS; memory"; cat "$PARTS"/*.part >>"$OUT/memory.log") &
wait

# Phase B: timings, one at a time.
run speed-mid 120 240 python3 benchmarks/bench_family_speed.py --sizes mid
run speed-full-sd15 100 200 python3 benchmarks/bench_family_speed.py --families sd15 --sizes full --dtype float16
run overhead 45 120 python3 benchmarks/bench_overhead.py --iters 8
run speed-tiny 60 200 python3 benchmarks/bench_family_speed.py --sizes tiny
cat "$OUT/summary.log"
