#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh installs on the GPU machine (run it HERE, where pip
# reaches the package index; the GPU machine has no network).
#
#   bash scripts/gpu_wheels.sh            # -> gpu-wheels/*.whl (~10 MB, ignored by git)
#
# The list is scripts/gpu_wheels.txt (pinned, pure Python or abi3 wheels for CPython 3.12 on
# x86-64 Linux). `pip download --no-deps` fetches exactly those files; afterwards
# `scripts/gpu_kit.py plan` checks that every requirement of every wheel is either in the folder or
# already on the GPU machine (its package list is in gpu_kit.py), and that no name is there twice.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${GPU_WHEELS:-gpu-wheels}"
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

mkdir -p "$DEST"
# Older files from a previous pin would make two versions of one package: start clean.
find "$DEST" -maxdepth 1 -name '*.whl' -delete
"$PY" -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" -r scripts/gpu_wheels.txt
"$PY" scripts/gpu_kit.py plan --wheels "$DEST"
du -sh "$DEST"
