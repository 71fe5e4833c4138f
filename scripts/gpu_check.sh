#!/usr/bin/env bash
# One GPU check, one command, at most 8 minutes on one H200: every test marked `gpu` (tests/gpu), then
# bench/gpu_check.py: SFT, DPO, GRPO (HF engine) and PPO steps on a tiny model and on random-init models of
# SmolLM2-135M's and Qwen2.5-0.5B's shapes, each parameter and optimizer state asserted on the GPU, tokens/s,
# completions/s, MFU against the measured bf16 matmul peak and GPU peak memory, side by side with TRL.
#
# Here (PyPI reachable), once:   bash scripts/gpu_wheels.sh          # trl, datasets, dill, multiprocess -> .whl/
# Then with the device tool:     run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=500)
#   the table comes back at the end of output_tail and as $OUT/gpu_check.md (+ .json, the log, the tests' junit xml)
# Without a GPU:                 bash scripts/gpu_check.sh --dry-run                # what it would run
#                                bash scripts/gpu_check.sh --cpu                    # the same on the CPU, --quick shapes
# Environment: GPU_CHECK_TOTAL_S (default 480: the whole run, tests included), PYTHON (default python3).
# Anything after the options goes to bench/gpu_check.py (e.g. --models tiny --workloads sft,grpo).
# Exit status: 0 when the tests and every workload passed; otherwise the first failing part's (124: out of time).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
TOTAL_S=${GPU_CHECK_TOTAL_S:-480}
if [[ -z "${GPU_CHECK_INNER:-}" && "${1:-}" != "--dry-run" ]]; then  # the whole run under one deadline
    GPU_CHECK_INNER=1 exec timeout -k 10 "$TOTAL_S" bash "$repo/scripts/gpu_check.sh" "$@"
fi
dry=0 device=cuda quick=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry=1; shift ;;
        --cpu) device=cpu; quick=(--quick); shift ;;
        *) break ;;
    esac
done
PY=${PYTHON:-python3}
say() { printf '\n== %s (%ds)\n' "$1" "$SECONDS"; }
run() { echo "+ $*"; if [[ $dry == 0 ]]; then "$@"; fi; }
left() { local s=$((TOTAL_S - SECONDS - ${1:-0})); echo $((s > 10 ? s : 10)); }  # seconds left, less $1 (>= 10)

if [[ -n "${OUT:-}" && $dry == 0 ]]; then  # the whole log comes back as a file too
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

say "wheels"
if compgen -G ".whl/*.whl" > /dev/null; then
    run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "the wheels did not install: the TRL contenders will fail, posttrain's run on"
else
    echo "no .whl/ here (bash scripts/gpu_wheels.sh makes it): the TRL side needs trl and datasets installed"
fi
export PYTHONPATH="$repo:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"  # posttrain from this checkout, not pip-installed
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1

say "machine"
if [[ $dry == 0 ]]; then
    if [[ $device == cuda ]]; then nvidia-smi || echo "nvidia-smi failed"; fi
    "$PY" - <<'EOF' || true
import importlib.metadata as md, platform, torch
names = ["torch", "transformers", "trl", "datasets", "accelerate", "peft", "huggingface_hub", "pyarrow", "fsspec",
         "tokenizers", "safetensors", "dill", "multiprocess"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
print("python", platform.python_version(), "|", ", ".join(f"{n} {version(n)}" for n in names))
print("cuda", torch.version.cuda, "| available", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF
fi

say "tests marked gpu"
tests_rc=0
junit=()
if [[ -n "${OUT:-}" ]]; then junit=(--junitxml "$OUT/gpu_tests.xml"); fi
set +e
run timeout -k 5 "$(left 330)" "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider "${junit[@]}"
tests_rc=$?
set -e

say "bench/gpu_check.py"
budget=$(left 15)  # seconds for the bench: what is left, less time to print the table
if [[ $dry == 1 ]]; then budget=$((TOTAL_S - 120)); fi
bench_rc=0
set +e
run "$PY" bench/gpu_check.py --device "$device" "${quick[@]}" --budget-s "$budget" "$@"
bench_rc=$?
set -e
if [[ $dry == 1 ]]; then
    "$PY" bench/gpu_check.py --dry-run --device "$device" "${quick[@]}" --budget-s "$budget" "$@"
fi

say "done: tests exit $tests_rc, bench exit $bench_rc"
if [[ $tests_rc != 0 ]]; then exit "$tests_rc"; fi
exit "$bench_rc"
