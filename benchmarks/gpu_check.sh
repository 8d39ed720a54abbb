#!/usr/bin/env bash
# gpu_check.sh DIR: the one prepared command for a rented GPU machine (an H100 or H200).
#
#     bash benchmarks/gpu_check.sh out/gpu
#
# Runs from the repository root with PYTHONPATH=src (nothing to install; the native CPU extension may be missing)
# and writes everything into DIR:
#   1. machine     GPU, driver, python / torch / triton / transformers versions, gqsa's CUDA backends, git commit
#                  -> machine.txt
#   2. tests       the Triton kernel tests (tests/ops/test_ops_triton.py, and tests/ops/test_ops_triton_a8.py where
#                  it exists), the CUDA-graph decode step (tests/engine/test_engine_graph_step.py), compression
#                  on the device (tests/algorithms/test_driver.py) and tests/bench
#                  -> tests.txt, tests.xml
#   3. kernel-7b   gqsa bench kernel --device cuda on Llama-2-7B's linear shapes, batch 1, 4, 16, sparsity 30,
#                  50, 70% (random and uneven rows are both always measured) -> kernel_7b.json, .md (log .log)
#   4. kernel-13b  the same on Llama-2-13B's shapes -> kernel_13b.json, .md (log .log)
#   5. e2e         benchmarks/gpu_e2e.py: a 4-block Llama with 7B shapes, greedy decode of 128 tokens after 128,
#                  dense fp16 against gqsa W4S50 g16 with backend triton (and triton-a8 where offered)
#                  -> e2e.json, e2e.md (log e2e.log)
#   6. ncu         Nsight Compute (speed of light, occupancy, launch, memory) of the decode kernels on 11008x4096,
#                  batch 1 (benchmarks/gpu_ncu_driver.py), one run per backend -> ncu.txt
#   7. summary     one line per step (ok / failed / timed out / skipped, seconds), the kernel targets and the
#                  end-to-end table -> printed last and summary.md
#
# Time on these machines is scarce: the whole run stays within GQSA_GPU_CHECK_DEADLINE_S seconds (default 465,
# under 8 minutes). Every step runs under `timeout`: at least its minimum where the deadline allows, at most its
# maximum, and no more than leaves the steps after it their minimums. A step that fails or times out is recorded
# and the next one runs; a step left with less than MIN_STEP_S seconds is skipped.
#
# Environment:
#   GQSA_GPU_CHECK_DRY=1       print every step's time limit and commands, run nothing, create nothing, exit 0
#                              (the limits assume that every step uses all of its time: the worst case)
#   GQSA_GPU_CHECK_DEADLINE_S  the whole run's budget in seconds (default 465)
#   GQSA_PYTHON                the Python interpreter (default python3)
#
# Exit status: 0 when every step ran ok, 1 otherwise (the summary says which), 2 for a usage error.

set -u -o pipefail

usage() {
    echo "usage: bash benchmarks/gpu_check.sh DIR   (GQSA_GPU_CHECK_DRY=1: only print the commands)" >&2
    exit 2
}
[ $# -eq 1 ] && [ -n "$1" ] || usage
case $1 in
    /*) DIR=$1 ;;
    *) DIR=$PWD/$1 ;;  # the steps run from the repository root
esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
cd "$ROOT" || exit 2

DRY=${GQSA_GPU_CHECK_DRY:-0}
DEADLINE=${GQSA_GPU_CHECK_DEADLINE_S:-465}
PY=${GQSA_PYTHON:-python3}
KILL_GRACE=5     # seconds between timeout's TERM and its KILL
MIN_STEP_S=10    # a step left with less time than this is skipped
SKIPPED_RC=99    # a step function's exit status for "nothing to do here" (no ncu)
KERNEL_REPEATS=20  # timed rounds per candidate (the benchmark's CUDA default is 30): Triton compilation, once
                   # per kernel variant, shape and batch, takes most of the step; the rounds are milliseconds
# Kernels for ncu: "triton" runs decode_kernel; "triton-a8" runs quantize_x_kernel then sliced_gemv_kernel.
NCU_KERNELS='decode_kernel|quantize_x_kernel|sliced_gemv_kernel'
NCU_CALLS=3      # calls per backend in the driver: 3 launches of decode_kernel, or 6 of the two a8 kernels
case $DEADLINE in
    '' | *[!0-9]*) echo "GQSA_GPU_CHECK_DEADLINE_S must be whole seconds, got '$DEADLINE'" >&2; exit 2 ;;
esac
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1  # a step killed by its timeout still leaves its output in the log
export DRY DIR ROOT PY SKIPPED_RC KERNEL_REPEATS NCU_KERNELS NCU_CALLS

# x CMD...: print CMD (shell-quoted, so the log says exactly what ran), then run it unless this is a dry run.
x() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    [ "$DRY" = 1 ] || "$@"
}

# ---------------------------------------------------------------------------------------------------- the steps
# Each runs in its own bash under `timeout`, its stdout and stderr going to its log; its exit status is the step's.

# 1. The machine the numbers come from. Fails when torch sees no CUDA device (then nothing else can work).
step_machine() {
    x date -u +%Y-%m-%dT%H:%M:%SZ
    x nvidia-smi -L || echo "(nvidia-smi failed)"
    x nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv ||
        echo "(nvidia-smi failed)"
    x git rev-parse HEAD || echo "(not a git checkout: no commit to record)"
    x git status --short || true
    x nproc
    echo "+ $PY - <<EOF   (versions, the CUDA device, gqsa's backends)"
    [ "$DRY" = 1 ] || "$PY" - <<'EOF'
import importlib.metadata as md
import platform
import sys

import torch


def version(package):
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return "not installed"


print("python", platform.python_version(), "|", platform.machine(), "|", sys.executable)
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| triton", version("triton"),
      "| transformers", version("transformers"), "| pytest", version("pytest"))
cuda = torch.cuda.is_available()
print("cuda available", cuda, "| devices", torch.cuda.device_count())
if cuda:
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), "| sm", f"{p.major}.{p.minor}", "|", p.multi_processor_count,
          "SMs | memory", f"{p.total_memory / 2**30:.0f} GiB",
          "| L2", f"{getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
from gqsa.ops import available_backends

print("gqsa cuda backends:", " ".join(available_backends("cuda", approximate=True, named_only=True)))
try:  # the native CPU extension may be missing here (it is not part of the copied sources): only informative
    print("gqsa cpu backends:", " ".join(available_backends("cpu", approximate=True)))
except Exception as exc:
    print("gqsa cpu backends: unknown,", type(exc).__name__, exc)
sys.exit(0 if cuda else 1)
EOF
}

# 2. Correctness on the GPU: the Triton kernels' tests, the a8 kernel's where they exist, the benchmarks' tests.
step_tests() {
    # the newest code first: a timeout cuts the end of the list
    local files=()
    [ -f tests/ops/test_ops_triton_a8.py ] && files+=(tests/ops/test_ops_triton_a8.py)
    [ -f tests/engine/test_engine_graph_step.py ] && files+=(tests/engine/test_engine_graph_step.py)
    [ -f tests/algorithms/test_driver.py ] && files+=(tests/algorithms/test_driver.py)  # compression on the GPU
    files+=(tests/ops/test_ops_triton.py tests/bench)
    x "$PY" -m pytest -q -p no:cacheprovider --durations=15 --junitxml="$DIR/tests.xml" "${files[@]}"
}

# 3, 4. The kernel benchmark on one model's shapes ($1: 7b or 13b); --verbose logs each shape and batch as it
# starts, so a timed-out run shows how far it got.
step_kernel() {
    x "$PY" -m gqsa --verbose bench kernel --device cuda --shapes "$1" --batch 1,4,16 --sparsity 0.3,0.5,0.7 \
        --repeats "$KERNEL_REPEATS" --json "$DIR/kernel_$1.json" --markdown "$DIR/kernel_$1.md"
}

# 5. End to end: decode speed, time to first token and peak GPU memory, dense fp16 against gqsa.
step_e2e() {
    x "$PY" benchmarks/gpu_e2e.py --layers 4 --prompt-len 128 --new-tokens 128 --repeats 3 \
        --backends triton,triton-a8 --json "$DIR/e2e.json" --markdown "$DIR/e2e.md"
}

# 6. Nsight Compute on the decode kernels, one ncu run per backend so that their results stay apart; triton-a8
# only where the machine step found it offered (or where that step left no list to tell).
step_ncu() {
    local ncu
    ncu=$(command -v ncu || true)
    if [ -z "$ncu" ]; then
        echo "ncu (Nsight Compute) is not on PATH: no kernel profile"
        [ "$DRY" = 1 ] || return "$SKIPPED_RC"
        ncu=ncu
    fi
    local backends=(triton)
    if [ "$DRY" = 1 ] || ! grep -q '^gqsa cuda backends:' "$DIR/machine.txt" 2>/dev/null ||
        grep -q '^gqsa cuda backends:.* triton-a8' "$DIR/machine.txt"; then
        backends+=(triton-a8)
    fi
    local status=0 backend
    for backend in "${backends[@]}"; do
        echo "== ncu: backend $backend"
        x "$ncu" --clock-control none --kernel-name "regex:$NCU_KERNELS" --launch-count $((2 * NCU_CALLS)) \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
            "$PY" benchmarks/gpu_ncu_driver.py --backends "$backend" --calls "$NCU_CALLS" || status=1
    done
    return $status
}

export -f x step_machine step_tests step_kernel step_e2e step_ncu

# ---------------------------------------------------------------------------------------------------- the runner

# name, most seconds, least seconds (kept for it by the steps before it), log (in DIR), function and arguments.
# With the default deadline, a run whose every step used all of its time would give them 30, 150, 95, 50, 70 and
# 40 seconds (GQSA_GPU_CHECK_DRY=1 shows it); expected on an H100 or H200: about 10, 100, 80, 70, 50 and 50.
STEPS=(
    "machine     30  10  machine.txt     step_machine"
    "tests       150 60  tests.txt       step_tests"
    "kernel-7b   130 60  kernel_7b.log   step_kernel 7b"
    "kernel-13b  120 50  kernel_13b.log  step_kernel 13b"
    "e2e         120 70  e2e.log         step_e2e"
    "ncu         90  40  ncu.txt         step_ncu"
)
NAMES=() RESULTS=() SECONDS_USED=() LOGS=()
SIMULATED=0  # dry run: the seconds the steps so far would have used at worst

elapsed() {
    if [ "$DRY" = 1 ]; then echo "$SIMULATED"; else echo "$SECONDS"; fi
}

# run_step INDEX: run STEPS[INDEX] under its time limit and record its result.
run_step() {
    local name max min log func args
    read -r name max min log func args <<<"${STEPS[$1]}"
    local reserve=0 j later
    for ((j = $1 + 1; j < ${#STEPS[@]}; j++)); do
        read -r _ _ later _ <<<"${STEPS[$j]}"
        reserve=$((reserve + later + KILL_GRACE))
    done
    # Its own minimum first, then whatever the later steps' minimums leave, within the deadline and its maximum.
    local left=$((DEADLINE - $(elapsed) - KILL_GRACE))
    local limit=$((left - reserve))
    [ "$limit" -lt "$min" ] && limit=$min
    [ "$limit" -gt "$left" ] && limit=$left
    [ "$limit" -gt "$max" ] && limit=$max
    NAMES+=("$name") LOGS+=("$log")
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        echo "== $name: skipped, ${limit}s left for it (deadline ${DEADLINE}s)"
        RESULTS+=("skipped (no time left)") SECONDS_USED+=(0)
        return
    fi
    echo "== $name: timeout ${limit}s (at most ${max}s), log $DIR/$log"
    if [ "$DRY" = 1 ]; then
        # shellcheck disable=SC2086  # args are words by design
        "$func" $args
        RESULTS+=("dry run") SECONDS_USED+=("$limit")
        SIMULATED=$((SIMULATED + limit + KILL_GRACE))
        return
    fi
    local start=$SECONDS rc
    echo "# $name: $func $args (timeout ${limit}s, started $(date -u +%H:%M:%SZ))" >"$DIR/$log"
    # shellcheck disable=SC2086
    timeout -k "$KILL_GRACE" "$limit" bash -c '"$@"' "$name" "$func" $args >>"$DIR/$log" 2>&1
    rc=$?
    local used=$((SECONDS - start)) result
    case $rc in
        0) result=ok ;;
        124 | 137) result="timed out (${limit}s)" ;;
        "$SKIPPED_RC") result=skipped ;;
        *) result="failed (exit $rc)" ;;
    esac
    printf '\n# %s: %s after %ss\n' "$name" "$result" "$used" >>"$DIR/$log"
    echo "   $result after ${used}s"
    RESULTS+=("$result") SECONDS_USED+=("$used")
}

# last_line LOG: the last line a step's command wrote (not the runner's "#" lines), at most 160 characters.
last_line() {
    grep -v '^#' "$1" 2>/dev/null | grep -v '^ *$' | tail -n 1 | cut -c 1-160
}

# detail NAME LOG: one short fact from a finished step's output for the summary line.
detail() {
    local name=$1 log=$DIR/$2
    case $name in
        machine) grep -m1 '^device ' "$log" 2>/dev/null || grep -m1 '^cuda available' "$log" 2>/dev/null ;;
        tests)
            local counts
            counts=$(grep -E '^[0-9]+ (passed|failed|error|skipped)|[0-9]+ (passed|failed) ' "$log" 2>/dev/null |
                tail -n 1 | tr -d '=' | sed 's/^ *//')
            if [ -n "$counts" ]; then
                echo "$counts"
            else  # killed before pytest's last line: count the progress characters it printed
                local progress
                progress=$(grep -E '^[.FEsxX]+( +\[ *[0-9]+%\])?$' "$log" 2>/dev/null | sed 's/ *\[.*//' | tr -d '\n')
                echo "no pytest summary: ${#progress} results before the end, $(tr -cd 'FE' <<<"$progress" | wc -c) F/E"
            fi ;;
        kernel-* | e2e)
            local md=${log%.log}.md
            if [ ! -f "$md" ]; then
                echo "no $(basename "$md"); last log line: $(last_line "$log")"
            elif [ "$name" = e2e ]; then
                echo "table below ($(basename "$md"))"
            else
                grep -m1 'judged targets met' "$md" || echo "no targets in $(basename "$md")"
            fi ;;
        ncu)
            if grep -q 'not on PATH' "$log" 2>/dev/null; then echo "ncu not on PATH"
            elif grep -q 'ERR_NVGPUCTRPERM' "$log" 2>/dev/null; then echo "no permission for GPU performance counters"
            else echo "$(grep -c 'GPU Speed Of Light Throughput' "$log" 2>/dev/null) kernel launches profiled"
            fi ;;
    esac
}

# summary: the table of steps, then the kernel benchmarks' targets and the end-to-end table.
summary() {
    local i total=0
    echo "# gqsa GPU check: $DIR"
    echo
    if [ "$DRY" = 1 ]; then
        echo "dry run: nothing ran; the limits are those of a run whose every step uses all of its time"
    else
        echo "$(grep -m1 '^device ' "$DIR/machine.txt" 2>/dev/null || echo 'device unknown') |" \
            "$(grep -m1 '^torch ' "$DIR/machine.txt" 2>/dev/null)"
        echo "git $(grep -m1 -E '^[0-9a-f]{40}$' "$DIR/machine.txt" 2>/dev/null || echo 'unknown'), finished" \
            "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    fi
    echo
    echo "| step | result | seconds | log | detail |"
    echo "|---|---|---:|---|---|"
    for i in "${!NAMES[@]}"; do
        local fact=""
        [ "$DRY" = 1 ] || [ "${RESULTS[$i]}" = "skipped (no time left)" ] || fact=$(detail "${NAMES[$i]}" "${LOGS[$i]}")
        echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SECONDS_USED[$i]} | ${LOGS[$i]} | ${fact//|/\\|} |"
        total=$((total + SECONDS_USED[i]))
    done
    echo
    echo "total: ${total}s of steps, deadline ${DEADLINE}s"
    [ "$DRY" = 1 ] && return
    local shape md
    for shape in 7b 13b; do
        md=$DIR/kernel_$shape.md
        [ -f "$md" ] && grep -q '^## Targets' "$md" || continue
        echo
        echo "## kernel-$shape: $(grep -m1 '^## Targets' "$md" | sed 's/^## //')"
        echo
        sed -n '/^## Targets/,$p' "$md" | grep '^|'
        echo
        grep -m1 'judged targets met' "$md"
    done
    if [ -f "$DIR/e2e.md" ]; then
        echo
        echo "## e2e"
        echo
        grep '^|' "$DIR/e2e.md"
    fi
}

main() {
    if [ "$DRY" = 1 ]; then
        echo "dry run: commands for $DIR (deadline ${DEADLINE}s, python '$PY')"
    else
        mkdir -p "$DIR" || exit 2
    fi
    local i
    for i in "${!STEPS[@]}"; do
        run_step "$i"
    done
    echo
    if [ "$DRY" = 1 ]; then
        summary
        return 0
    fi
    summary | tee "$DIR/summary.md"
    for i in "${!RESULTS[@]}"; do
        [ "${RESULTS[$i]}" = ok ] || return 1
    done
    return 0
}

main
