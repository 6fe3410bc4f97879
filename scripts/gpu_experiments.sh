#!/usr/bin/env bash
# Full runs of the two classic fast-weight reproductions (SPEC §4 and §5) on one machine with
# many cores and a GPU, each within a wall-clock budget. Run from the repository root.
#
#   scripts/gpu_experiments.sh ar OUT [BUDGET_S]          # associative retrieval: 5 models x R=20/50/100 x 3 seeds
#   scripts/gpu_experiments.sh plasticity OUT [BUDGET_S]  # none/Hebbian/gradient x 3 tasks x 3 seeds
#   scripts/gpu_experiments.sh smoke OUT                  # both, tiny, on the CPU (< 1 minute idle)
#
# Every run stops at BUDGET_S seconds (default 480) after the start of the command and records the
# step it reached; the report marks such runs with †. Each command writes OUT/<experiment>/ (JSON,
# markdown, PNG) and OUT/<experiment>.log. To rebuild the docs from the JSON afterwards:
#   fastweights experiment associative-retrieval --report-from OUT/associative_retrieval/associative_retrieval.json --out-dir docs/results
#   fastweights experiment plasticity --report-from OUT/plasticity/plasticity.json --out-dir docs/results
#
# Associative retrieval runs on the CPU: its models are tiny (R <= 100, 11-token sequences; 1.7-12.6 ms
# per training step on one core), so one single-thread process per run (45 at once, sharing the
# cores) beats eager GPU kernels, which are launch-bound at this size. Plasticity (a Transformer fed
# step by step; the gradient rule differentiates twice) costs 40-880 ms per step on one core: the
# long copy (T=31) and regression (T=20) episodes go to the GPU when there is one (18 processes,
# matrix form of the fast weights), the short digits episodes (T=10) to the CPU (9 processes).
# PL_STEPS (default 500) sets the plasticity step count, AR_STEPS (default 30000) the retrieval one.
set -euo pipefail

what=${1:?usage: $0 ar|plasticity|smoke OUT [BUDGET_S]}
out=${2:?usage: $0 ar|plasticity|smoke OUT [BUDGET_S]}
budget=${3:-480}
py=${PYTHON:-python}
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1

fw() { "$py" -m fastweights.cli experiment "$@"; }

# Settings chosen on short validation runs on a CPU (docs/results/associative_retrieval.md says which).
ar_args=(--steps "${AR_STEPS:-30000}" --eval-every 1000 --lr 3e-3 --lr-for irnn=1e-3 --lr-schedule cosine --warmup-steps 500)

plasticity_tasks() {
    if "$py" -c "import sklearn" 2>/dev/null; then
        echo copy regression digits
    else
        echo "scikit-learn is missing: the digits task is skipped" >&2
        echo copy regression
    fi
}

case $what in
ar)
    fw associative-retrieval "${ar_args[@]}" --jobs 45 --time-budget-s "$budget" \
        --out-dir "$out/associative_retrieval" 2>&1 | tee "$out/associative_retrieval.log"
    ;;
plasticity)
    steps=${PL_STEPS:-500}
    tasks=$(plasticity_tasks)
    gpu_tasks="copy regression"
    if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "no GPU: every plasticity run goes to the CPU" >&2
        gpu_tasks=""
    fi
    cpu_tasks=$(for t in $tasks; do [[ " $gpu_tasks " == *" $t "* ]] || echo "$t"; done | xargs)
    common=(--steps "$steps" --time-budget-s "$budget")
    parts=()
    if [ -n "$gpu_tasks" ]; then
        # shellcheck disable=SC2086
        fw plasticity "${common[@]}" --tasks $gpu_tasks --jobs 18 --device cuda --form matrix \
            --out-dir "$out/plasticity_gpu" > "$out/plasticity_gpu.log" 2>&1 &
        parts+=("$out/plasticity_gpu/plasticity.json")
    fi
    if [ -n "$cpu_tasks" ]; then
        # shellcheck disable=SC2086
        fw plasticity "${common[@]}" --tasks $cpu_tasks --jobs 27 --device cpu \
            --out-dir "$out/plasticity_cpu" > "$out/plasticity_cpu.log" 2>&1 &
        parts+=("$out/plasticity_cpu/plasticity.json")
    fi
    wait
    tail -n 30 "$out"/plasticity_*.log
    fw plasticity --report-from "${parts[@]}" --out-dir "$out/plasticity" 2>&1 | tee "$out/plasticity.log"
    ;;
smoke)
    # The same code paths (worker processes, budget, per-model lr, schedule, report merge), tiny.
    fw associative-retrieval --quick --models fw irnn --jobs 2 --time-budget-s 120 \
        --lr-for irnn=1e-3 --lr-schedule cosine --warmup-steps 5 \
        --out-dir "$out/associative_retrieval" 2>&1 | tee "$out/associative_retrieval.log"
    # shellcheck disable=SC2046
    fw plasticity --quick --tasks $(plasticity_tasks) --jobs 2 --time-budget-s 120 \
        --out-dir "$out/plasticity_cpu" > "$out/plasticity_cpu.log" 2>&1
    fw plasticity --report-from "$out/plasticity_cpu/plasticity.json" --out-dir "$out/plasticity" \
        2>&1 | tee "$out/plasticity.log"
    ;;
*)
    echo "unknown experiment set '$what': use ar, plasticity or smoke" >&2
    exit 2
    ;;
esac
