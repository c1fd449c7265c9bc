"""Length extrapolation: each arm of the hybrid ablation, trained at T, evaluated at 2x..32x T.

    python experiments/length_extrapolation/run.py --size cpu|gpu [--out DIR] [...]   # same flags as hybrid_ablation
    python experiments/length_extrapolation/run.py --report DIR/hybrid_gpu.jsonl

The probe needs the trained models, so it runs inside the hybrid ablation's run (one source of truth:
experiments/hybrid_ablation/run.py and recall.py): after training, every member is evaluated on MQAR rows whose
pairs (the smallest and largest P of training) are spread over rows of 2x..32x the training length, and on a
needle (one pair at a random depth, asked at the end). Lightning layers carry no position (only a per-head decay);
softmax layers carry RoPE, never seen past the training length. This entry point runs that same script; the
report writes experiments/results/length_extrapolation_<size>.json|png.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hybrid_ablation"))

import run as hybrid_ablation  # noqa: E402

if __name__ == "__main__":
    hybrid_ablation.main()
