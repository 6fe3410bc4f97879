#!/usr/bin/env bash
# Full runs of the two classic fast-weight reproductions (SPEC §4 and §5) on one machine with
# many cores and a GPU, each within a wall-clock budget. Run from the repository root.
#
#   scripts/gpu_experiments.sh ar OUT [BUDGET_S]          # associative retrieval: 5 models x R=20/50/100 x 3 seeds
#   scripts/gpu_experiments.sh plasticity OUT [BUDGET_S]  # none/Hebbian/gradient x 3 tasks x 3 seeds
#   scripts/gpu_experiments.sh smoke OUT                  # both, tiny, on the CPU (< 1 minute)
#
# Every run stops at BUDGET_S seconds (default 480) after the start of the command and records the
# step it reached; the report marks such runs with †. Each command writes OUT/<experiment>/ (JSON,
# markdown, PNG) and OUT/<experiment>.log. To rebuild the docs from the JSON afterwards:
#   fastweights experiment associative-retrieval --report-from OUT/associative_retrieval/associative_retrieval.json --out-dir docs/results
#   fastweights experiment plasticity --report-from OUT/plasticity/plasticity.json --out-dir docs/results
#
# Associative retrieval runs on the CPU: its models are tiny (R <= 100, 11-token sequences), so one
# single-thread process per run (45 at once, sharing the cores) beats eager GPU kernels, which are
# launch-bound at this size. The plasticity runs (a Transformer fed step by step, 2000 steps each)
# go to the GPU when there is one, all 27 at once, with the matrix form of the fast weights.
set -euo pipefail

what=${1:?usage: $0 ar|plasticity|smoke OUT [BUDGET_S]}
out=${2:?usage: $0 ar|plasticity|smoke OUT [BUDGET_S]}
budget=${3:-480}
py=${PYTHON:-python}
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1

fw() { "$py" -m fastweights.cli experiment "$@"; }

# Settings chosen on short validation runs on a CPU (docs/results/associative_retrieval.md says which).
ar_args=(--steps 30000 --eval-every 1000 --lr 3e-3 --lr-for irnn=1e-3 --lr-schedule cosine --warmup-steps 500)

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
    device=$("$py" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    form=$([ "$device" = cuda ] && echo matrix || echo attention)
    # shellcheck disable=SC2046
    fw plasticity --tasks $(plasticity_tasks) --steps 2000 --jobs 27 --device "$device" --form "$form" \
        --time-budget-s "$budget" --out-dir "$out/plasticity" 2>&1 | tee "$out/plasticity.log"
    ;;
smoke)
    fw associative-retrieval --quick --models fw irnn --jobs 2 --time-budget-s 20 \
        --lr-for irnn=1e-3 --lr-schedule cosine --warmup-steps 5 \
        --out-dir "$out/associative_retrieval" 2>&1 | tee "$out/associative_retrieval.log"
    # shellcheck disable=SC2046
    fw plasticity --quick --tasks $(plasticity_tasks) --rules none hebbian gradient --jobs 2 --time-budget-s 20 \
        --out-dir "$out/plasticity" 2>&1 | tee "$out/plasticity.log"
    ;;
*)
    echo "unknown experiment set '$what': use ar, plasticity or smoke" >&2
    exit 2
    ;;
esac
