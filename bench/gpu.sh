#!/usr/bin/env bash
# What a lent GPU machine runs (one H100 or H200, its own torch / triton / transformers, no network):
# install steer without dependencies, then the stages below, in at most 6 minutes of wall time.
#
#   OUT=/some/dir bash bench/gpu.sh [--budget SECONDS] [--stages smoke,tests,...] [--fresh]
#   bash bench/gpu.sh --quick       # CPU dry run of every stage on tiny sizes (Triton interpreter)
#
# Stage (GPU budget, s)  what
#   smoke       (20)  import steer, build each benchmark model on CUDA, one fused op vs its reference
#   tests       (70)  kernel tests with real Triton on CUDA tensors: the device tests of
#                     tests/test_gpu_script.py (histogram update, patched models of several families
#                     on CUDA vs their CPU reference, fused collection), tests/test_fused_kernel.py
#   collection  (55)  bare forward vs exact vs streaming vs today's way, random weights, real configs, bf16
#   steering    (95)  steering overhead in forward and greedy generation, eager on both models;
#                     compiled (dynamic=False, 3 graphs a case) on the 2-layer 8B-shaped MLP first
#   per_row     (60)  per-row steering (bench/per_row.py) on Gemma's config: 64 rows, K = 1, 8, 64
#                     expert sets vs one Intervention vs none, forward and generation; eager
#                     (compiled only if its estimated compiles fit: GPU_SH_LIMITS=per_row=...)
#   scoring     (45)  end to end (collect + score) and scoring alone, on the GPU
# (install ~15 s: 360 s in all.)
#
# Each stage runs as its own process under `timeout` (its budget) and is told its budget, which it
# keeps to by skipping what would not fit (said in its result). A stage that ends writes its
# results (gpu_<stage>.md/.csv, its log) and a marker (<stage>.done) to the run folder
# (bench/results/gpu_run/; --quick: bench/results/quick/gpu_run/); at once, gpu_summary.md,
# gpu_results.md (every stage's tables), gpu_run.tgz (the whole run folder) and gpu_live.log (the
# last stage's log) are copied to $OUT when it is set. A stage with a marker is not run again:
# unpack a returned gpu_run.tgz into bench/results/gpu_run/ and a second run does only the rest.
# --budget SECONDS (default 360; --quick 1000): a stage whose budget exceeds the time left is
# skipped, and the summary says so. --fresh forgets the markers of earlier runs.
# GPU_SH_LIMITS=stage=seconds,... overrides stage limits for one run (the summary shows both).
set -uo pipefail
export LC_ALL=C HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."

QUICK=0 BUDGET="" STAGES="smoke,tests,collection,steering,per_row,scoring" FRESH=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --budget) BUDGET="$2"; shift ;;
        --budget=*) BUDGET="${1#*=}" ;;
        --stages) STAGES="$2"; shift ;;
        --stages=*) STAGES="${1#*=}" ;;
        --fresh) FRESH=1 ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

declare -A GPU_BUDGET=([install]=15 [smoke]=20 [tests]=70 [collection]=55 [steering]=95 [per_row]=60 [scoring]=45
                       [total]=360)
# the dry run's limits on a 2-core CPU (Triton's interpreter, tiny models)
declare -A QUICK_LIMIT=([install]=60 [smoke]=60 [tests]=240 [collection]=120 [steering]=180 [per_row]=180
                        [scoring]=120)
if [ "$QUICK" = 1 ]; then
    RUN="${GPU_RUN_DIR:-bench/results/quick/gpu_run}"; BUDGET="${BUDGET:-1000}"; QFLAG="--quick"
else
    RUN="${GPU_RUN_DIR:-bench/results/gpu_run}"; BUDGET="${BUDGET:-360}"; QFLAG=""
fi
GPU_BENCH="${GPU_BENCH:-python3 bench/gpu_bench.py}"  # the stage runner (tests replace it)
GPU_SH_LIMITS="${GPU_SH_LIMITS:-}"
OUT="${OUT:-}"
mkdir -p "$RUN" || exit 1
[ "$FRESH" = 1 ] && rm -f "$RUN"/*.done "$RUN"/summary.tsv "$RUN"/gpu_*
[ -n "$OUT" ] && mkdir -p "$OUT"
LIVE="${OUT:-$RUN}/gpu_live.log"

now_us() { echo "${EPOCHREALTIME/./}"; }
T0=$(now_us)
elapsed_s() { echo $(( ($(now_us) - T0) / 1000000 )); }
secs() { awk -v us="$1" 'BEGIN { printf "%.1f", us / 1e6 }'; }
declare -A LIMIT=()
for s in "${!GPU_BUDGET[@]}"; do
    if [ "$QUICK" = 1 ]; then LIMIT[$s]="${QUICK_LIMIT[$s]:-}"; else LIMIT[$s]="${GPU_BUDGET[$s]}"; fi
done
for kv in ${GPU_SH_LIMITS//,/ }; do LIMIT[${kv%%=*}]="${kv#*=}"; done  # e.g. GPU_SH_LIMITS=tests=120,scoring=60
LIMIT[total]="$BUDGET"
limit_of() { echo "${LIMIT[$1]}"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    MACHINE="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
else
    MACHINE="no GPU; CPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
fi
RUN_ID="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "gpu.sh: $MACHINE; budget ${BUDGET} s; run folder $RUN${OUT:+; OUT $OUT}"
printf '#run\t%s\t%s\t%s\t%s\n' "$RUN_ID" "$MACHINE" "$BUDGET" "$([ "$QUICK" = 1 ] && echo quick || echo full)" >> "$RUN/summary.tsv"

row() {  # stage, wall seconds (or -), status
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "${GPU_BUDGET[$1]}" "$(limit_of "$1")" "$2" "$3" >> "$RUN/summary.tsv"
    echo "gpu.sh: [$1] $3 (${2} s; ${BUDGET} s budget, $(elapsed_s) s used)"
}

publish() {  # summary and results into the run folder, then (at once) into $OUT
    {
        echo "# GPU script: stages, budgets, wall times"
        echo
        echo "Each stage's result (gpu_<stage>.md) records the GPU, the torch / triton / transformers"
        echo "versions and the stage's own wall time; wall_s here includes the process start (imports)."
        awk -F'\t' '
            /^#run/ { printf "\n## Run of %s: %s, budget %s s (%s)\n\n", $2, $3, $4, $5
                      print "| stage | GPU budget s | limit here s | wall s | status |"; print "|---|---|---|---|---|"; next }
            { printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }' "$RUN/summary.tsv"
    } > "$RUN/gpu_summary.md.tmp" && mv "$RUN/gpu_summary.md.tmp" "$RUN/gpu_summary.md"
    { cat "$RUN/gpu_summary.md"; for s in smoke tests collection steering per_row scoring; do
        [ -f "$RUN/gpu_$s.md" ] && { echo; cat "$RUN/gpu_$s.md"; }; done; } > "$RUN/gpu_results.md"
    if [ -n "$OUT" ]; then
        cp "$RUN/gpu_summary.md" "$RUN/gpu_results.md" "$OUT"/
        tar czf "$OUT/gpu_run.tgz.tmp" -C "$RUN" . && mv "$OUT/gpu_run.tgz.tmp" "$OUT/gpu_run.tgz"
    fi
}

install() {
    local t=$(now_us) where status
    where="$(cd / && python3 -c 'import importlib.util as u; s = u.find_spec("steer"); print(s.origin if s else "")' 2>/dev/null)"
    if [ "${GPU_SH_INSTALL:-1}" = 0 ]; then
        status="not checked (GPU_SH_INSTALL=0)"
    elif [ "$where" = "$PWD/steer/__init__.py" ]; then
        status="ok: already installed from this tree"
    elif timeout 90 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$RUN/gpu_install.log" 2>&1; then
        status="ok: pip install --no-deps --no-build-isolation --no-index -e ."
    else  # no setuptools there: a folder that maps steer.kernels to kernels/, on PYTHONPATH
        local shim=/tmp/steer_shim
        rm -rf "$shim" && mkdir -p "$shim/steer" && ln -s "$PWD"/steer/* "$shim/steer/" && ln -s "$PWD/kernels" "$shim/steer/kernels"
        export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
        status="pip failed (gpu_install.log): using $shim on PYTHONPATH"
    fi
    row install "$(secs $(( $(now_us) - t )))" "$status"
}

run_stage() {
    local name="$1" limit left t rc wall status
    limit="$(limit_of "$name")"
    if [ -f "$RUN/$name.done" ]; then
        row "$name" - "done in an earlier run (marker $name.done): not run again"; return
    fi
    left=$(( BUDGET - $(elapsed_s) ))
    if [ "$limit" -gt "$left" ]; then
        row "$name" - "skipped: needs $limit s, $left s of the budget left"; return
    fi
    t=$(now_us)
    # shellcheck disable=SC2086
    timeout -k 5 "$limit" $GPU_BENCH "$name" --out "$RUN" --budget "$limit" $QFLAG > "$LIVE" 2>&1
    rc=$?
    wall="$(secs $(( $(now_us) - t )))"
    [ "$LIVE" != "$RUN/gpu_$name.log" ] && cp "$LIVE" "$RUN/gpu_$name.log"
    if [ -f "$RUN/$name.done" ]; then
        status="$(sed -n 's/^status=//p' "$RUN/$name.done")"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        status="TIMEOUT after $limit s (no marker; see gpu_$name.log)"
    else
        status="ERROR exit $rc (no marker; see gpu_$name.log)"
    fi
    [ "$rc" != 0 ] && [ -f "$RUN/$name.done" ] && status="$status; exit $rc"
    row "$name" "$wall" "$status"
    tail -n 8 "$RUN/gpu_$name.log" | sed "s/^/    [$name] /"
}

install
publish
IFS=',' read -ra LIST <<< "$STAGES"
for s in "${LIST[@]}"; do
    if [ -z "${QUICK_LIMIT[$s]+x}" ] || [ "$s" = install ]; then echo "gpu.sh: unknown stage $s" >&2; continue; fi
    run_stage "$s"
    publish
done
row total "$(secs $(( $(now_us) - T0 )))" "$(grep -c . <(ls "$RUN"/*.done 2>/dev/null)) stage markers in $RUN"
publish
if [ "$QUICK" = 1 ] && [ -z "${GPU_RUN_DIR:-}" ]; then  # the dry run's commit-ready record
    cp "$RUN/gpu_summary.md" bench/results/gpu_quick_summary.md
    cp "$RUN/gpu_results.md" bench/results/gpu_quick_results.md
fi
echo "gpu.sh: done in $(elapsed_s) s; summary: $RUN/gpu_summary.md"
