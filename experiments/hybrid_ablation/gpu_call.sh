#!/bin/bash
# One device call for issue 15 (run from the repository root, .whl carried): the recall arms and the scaling figure.
# Two GPUs: GPU 0 trains arms 0, 8, 2, 4; GPU 1 trains arms 1, L-D64, then times the scaling figure.
# One GPU: the same lists one after another. Raw JSON lines and logs land under $OUT (a/, b/, s/).
set -u
export PYTHONUNBUFFERED=1
if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
then export PYTHONPATH=/tmp/site:$PWD/.h5snap:$PWD; else export PYTHONPATH=$PWD/.h5snap:$PWD; fi
# .h5snap (carried, optional; make it with `mkdir .h5snap && git archive HEAD m1jax pallas_kernels | tar -x -C .h5snap`):
# m1jax and pallas_kernels as committed, so half-done edits in a shared tree cannot break the run
OUT=${OUT:-out}; mkdir -p "$OUT/a" "$OUT/b" "$OUT/s"
nvidia-smi -L
NGPU=$(nvidia-smi -L | wc -l)
H=experiments/hybrid_ablation/run.py
if [ "$NGPU" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 560 python3 $H --size gpu --out "$OUT/a" --arms 0,8,2,4 --deadline-s 420 \
    --train-budget-s 75 > "$OUT/a.log" 2>&1 &
  ( CUDA_VISIBLE_DEVICES=1 timeout 280 python3 $H --size gpu --out "$OUT/b" --arms 1,L-D64 --deadline-s 230 \
      --train-budget-s 90
    CUDA_VISIBLE_DEVICES=1 timeout 260 python3 experiments/scaling/run.py --size gpu --out "$OUT/s" \
      --deadline-s 230 ) > "$OUT/b.log" 2>&1 &
  wait
else
  timeout 420 python3 $H --size gpu --out "$OUT/a" --arms 0,1,8,2,4,L-D64 --deadline-s 330 --train-budget-s 50 \
    > "$OUT/a.log" 2>&1
  timeout 140 python3 experiments/scaling/run.py --size gpu --out "$OUT/s" --deadline-s 110 > "$OUT/b.log" 2>&1
fi
tail -n 30 "$OUT/a.log" "$OUT/b.log"
