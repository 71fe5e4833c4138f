#!/usr/bin/env bash
# Wheels for the GPU check: downloads here (where PyPI is reachable) the pure-Python packages that posttrain and
# TRL need on the device machine and that its image lacks, into .whl/ (ignored by git via .git/info/exclude).
#
#   bash scripts/gpu_wheels.sh        # then: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=500)
#
# The machine (nvidia-h200, /work/.library/device/KINDS.md): Python 3.12, torch 2.11+cu130, transformers 5.17.0,
# huggingface_hub 1.33.0, accelerate, peft, pyarrow, pandas, fsspec, xxhash, requests, httpx, aiohttp, jinja2,
# tensorboard, matplotlib; no datasets, trl, math-verify, gguf or vllm, and no network.
# What is carried, and why these versions:
#   trl 1.13.0        released 2026-09-10, the day after transformers 5.17.0 (2026-09-09): the TRL built against
#                     the machine's transformers. Requires accelerate>=1.4, datasets>=4.7, jinja2, packaging, all
#                     there but datasets. It has no PPOTrainer (gone from TRL), so PPO runs posttrain only.
#   datasets 5.0.0    TRL's dataset layer. 5.1+ require pyarrow>=24, which the image may predate (its pyarrow
#                     version is unread); 5.0 requires pyarrow>=21, requests and httpx<1 (there), dill, multiprocess.
#   dill 0.4.1, multiprocess 0.70.19   datasets' pins (dill<0.4.2, multiprocess<0.70.20); multiprocess is per-Python
# Not carried: math-verify / latex2sympy2_extended / antlr4 (posttrain imports them only inside the `math_equal`
# reward, which the check does not use), gguf (only for .gguf model files), everything the image already has.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
PY=${PYTHON:-python3}
WHEELS=(trl==1.13.0 datasets==5.0.0 dill==0.4.1 multiprocess==0.70.19)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl  # one version of each package: two would stop the install on the device machine
mkdir -p .whl
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
"$PY" -m pip download -q "${args[@]}" "${WHEELS[@]}"

echo "wheels in .whl/ (for Python 3.12, installed there with --no-deps --target /tmp/site):"
ls -l .whl | awk 'NR > 1 {printf "  %-55s %8.1f KiB\n", $9, $5 / 1024}'
echo "total: $(du -sh .whl | cut -f1)"
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "what a run carries: working tree $((tree / 1024)) KiB + .whl $((wheels / 1024)) KiB = $(((tree + wheels) / 1048576)) MiB (limit 64 MiB)"
for w in .whl/*.whl; do  # each one's needs, to hold against the machine's package list
    needs=$(unzip -p "$w" '*.dist-info/METADATA' | { grep '^Requires-Dist' || true; } | { grep -v 'extra ==' || true; } \
            | cut -d' ' -f2- | tr '\n' ' ')
    echo "  $(basename "$w") needs: ${needs:-nothing}"
done
