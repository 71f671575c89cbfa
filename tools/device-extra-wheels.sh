#!/usr/bin/env bash
# After ../shared/device/make-wheels.sh: the wheels jsonargparse[signatures] needs for `vlt fit`
# (LightningCLI) on the GPU machine, which the shared script does not pack, and liger-kernel (vlt[cuda]: the
# fused LM-head losses), which the GPU image lacks. Run from the repo root.
set -euo pipefail
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl docstring-parser==0.18.0 typeshed-client==2.14.0 \
  liger-kernel==0.8.5
ls .whl
