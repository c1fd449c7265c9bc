#!/bin/bash
# One device call, two jobs: `bash experiments/gpu_pair.sh "CMD0" "CMD1"` runs CMD0 on GPU 0 and CMD1 on GPU 1
# (one after the other on a one-GPU machine), each with its log in $OUT/gpu<i>.log, then prints both logs' tails;
# every other file written under $OUT comes back in $OUT/results.tgz, except .npz checkpoints: each comes back as a
# file of its own (a call returns files of up to 16 MiB: a checkpoint and the rest would not fit in one archive).
# m1jax and pallas_kernels come from .h5snap when it was carried (a snapshot of the committed package:
# `rm -rf .h5snap && mkdir .h5snap && git archive HEAD m1jax pallas_kernels | tar -x -C .h5snap`), so edits in
# progress in a shared tree cannot break a run; the FLA wheel in .whl is installed when carried.
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-out}
PP=$PWD
[ -d .h5snap ] && PP=$PWD/.h5snap:$PP
if ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl; then PP=/tmp/site:$PP; fi
export PYTHONPATH=$PP
mkdir -p "$OUT"
nvidia-smi -L
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0 bash -c "$1" > "$OUT/gpu0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 bash -c "$2" > "$OUT/gpu1.log" 2>&1 &
  wait
else
  bash -c "$1" > "$OUT/gpu0.log" 2>&1
  bash -c "$2" > "$OUT/gpu1.log" 2>&1
fi
# a call returns at most 8 files: everything but the two logs travels as one archive
( cd "$OUT" && find . -type f ! -name 'gpu?.log' ! -name results.tgz ! -name '*.npz' | tar -czf results.tgz -T - && \
  find . -type f ! -name 'gpu?.log' ! -name results.tgz ! -name '*.npz' -delete )
tail -n 25 "$OUT/gpu0.log"; echo ----; tail -n 25 "$OUT/gpu1.log"
