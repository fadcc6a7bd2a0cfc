#!/usr/bin/env bash
# Install flashdistill into .venv and run the whole story on the built-in digits task:
# teacher (trained, or reused), Flash distillation, metrics against the teacher and DPM-Solver++.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/flashdistill demo --out "${1:-runs/demo}"
