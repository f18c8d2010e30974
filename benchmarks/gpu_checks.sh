#!/usr/bin/env bash
# The CUDA checks in one prepared run: `pytest -m gpu`, then the memory, speed and overhead benchmarks on the GPU.
#
#     OUT=gpu-out BUDGET=560 bash benchmarks/gpu_checks.sh [JOB ...]     # from the repository root, on a CUDA machine
#
# JOBs: pytest-gpu, memory, memory-full (phase A); overhead-full, speed-full-sd15-batch, speed-full-sd15, speed-mid,
# overhead, overhead-lora, speed-tiny (phase B). The default is all of them, in that order, which fits 15 minutes of
# device time with BUDGET=560 (*-full build SD1.5-sized random models; speed-tiny comes last and is skipped if time
# runs out).
# Phase A (correctness, memory) runs its jobs side by side: each reports its own process's allocator peak, which
# other processes do not touch, and nothing in it is timed. Phase B (timings) runs one job at a time, alone on the
# GPU, in the order given. Every job has its own log under $OUT and its own time limit; a job that would start with
# too little of the BUDGET (seconds) left is skipped and says so, so the logs of the jobs before it always come back.
# PACK=1 packs the logs into $OUT/logs.tgz at the end (a remote runner may bring back only a few files).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
deadline=$((SECONDS + ${BUDGET:-560}))
DEFAULT_JOBS="pytest-gpu memory memory-full overhead-full speed-full-sd15-batch speed-full-sd15 speed-mid overhead \
overhead-lora"
JOBS=" ${*:-$DEFAULT_JOBS speed-tiny} "

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

memory() {  # memory SETTING...: bench_memory.py once per setting, side by side, each into its own part file
    local i=0
    for args in "$@"; do
        # shellcheck disable=SC2086  # $args is a list of flags
        (echo "== $args"; python3 benchmarks/bench_memory.py $args 2>&1 | grep -v Warning) >"$PARTS/$i.part" &
        i=$((i + 1))
    done
    wait
}

wanted() { [[ $JOBS == *" $1 "* ]]; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, diffusers, peft, accelerate, transformers as t
print(sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__,
      'accelerate', accelerate.__version__, 'transformers', t.__version__, 'cuda', torch.cuda.is_available())"
} >"$OUT/summary.log" 2>&1

# Phase A: the gpu-marked tests and the memory settings of the README table, side by side.
wanted pytest-gpu && run pytest-gpu 60 300 python3 -m pytest -m gpu -v -rs -p no:cacheprovider tests/test_gpu.py &
if wanted memory; then
    PARTS=$(mktemp -d)
    (run memory 60 240 bash -c "$(declare -f memory); PARTS=$PARTS; memory \
        '--family sd15 --batch 1 --gradient-checkpointing' '--family sd15 --batch 1' \
        '--family sd15 --batch 4 --gradient-checkpointing' '--family sd15 --batch 4' \
        '--batch 1 --gradient-checkpointing' \
        '--batch 8 --gradient-checkpointing' '--batch 1' '--batch 8' \
        '--family sd15 --batch 1 --gradient-checkpointing --base-dtype bfloat16'"
     cat "$PARTS"/*.part >>"$OUT/memory.log") &
fi
if wanted memory-full; then
    FULL_PARTS=$(mktemp -d)
    (run memory-full 100 280 bash -c "$(declare -f memory); PARTS=$FULL_PARTS; memory \
        '--family sd15-full --batch 1 --gradient-checkpointing' '--family sd15-full --batch 1' \
        '--family sd15-full --batch 1 --gradient-checkpointing --base-dtype bfloat16' \
        '--family sd15-full --batch 4 --gradient-checkpointing --base-dtype bfloat16 --modes phased1_lora phased4_lora'"
     cat "$FULL_PARTS"/*.part >>"$OUT/memory-full.log") &
fi
wait

# Phase B: timings, one at a time, in the order asked for.
for job in $JOBS; do
    case $job in
    speed-full-sd15-batch) run speed-full-sd15-batch 100 220 python3 benchmarks/bench_family_speed.py --families sd15 \
        --sizes full --dtype float16 --outputs np latent --images 8 ;;
    speed-mid) run speed-mid 120 240 python3 benchmarks/bench_family_speed.py --sizes mid --outputs np latent ;;
    speed-full-sd15) run speed-full-sd15 100 220 python3 benchmarks/bench_family_speed.py --families sd15 \
        --sizes full --dtype float16 --outputs np latent ;;
    overhead) run overhead 45 120 python3 benchmarks/bench_overhead.py --iters 8 ;;
    overhead-lora) run overhead-lora 60 150 python3 benchmarks/bench_overhead.py --iters 8 --methods dmd2 \
        --roles lora --gan-weight 0.003 ;;
    overhead-full) run overhead-full 60 150 python3 benchmarks/bench_overhead.py --iters 8 --size full ;;
    speed-tiny) run speed-tiny 60 200 python3 benchmarks/bench_family_speed.py --sizes tiny --outputs np latent ;;
    esac
done
cat "$OUT/summary.log"
if [[ ${PACK:-0} == 1 ]]; then
    tar -czf "$OUT/logs.tgz" -C "$OUT" --exclude logs.tgz --exclude summary.log . && find "$OUT" -name '*.log' \
        ! -name summary.log -delete
fi
