"""Multi-host training: two processes (one GPU each, JAX's coordinator) give the same losses as one process
driving both GPUs.

    PYTHONPATH=. python3 benchmarks/multihost.py [--cpu]    (--cpu: two CPU processes, for a check without GPUs)

Runs `m1jax train` three times on the same tiny mqar run with mesh data=2: one process with both devices, then two
processes launched with --coordinator/--num-processes/--process-id. Prints both loss curves and their largest
difference last.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "m1jax.cli", "train", "--preset", "tiny", "--task", "mqar", "--steps", "8",
         "--batch-size", "8", "--seq-len", "64", "--mesh", "data=2", "--lr", "3e-3", "--warmup", "2"]


def losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    base = dict(os.environ, PYTHONPATH=ROOT)
    if args.cpu:
        base["JAX_PLATFORMS"] = "cpu"
    work = tempfile.mkdtemp(prefix="m1jax-multihost-")
    one = os.path.join(work, "one_process")
    env = dict(base)
    if args.cpu:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    subprocess.run(TRAIN + ["--out", one], env=env, check=True, cwd=ROOT)

    two = os.path.join(work, "two_processes")
    procs = []
    for pid in range(2):
        env = dict(base)
        if args.cpu:
            env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
            env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
        else:
            env["CUDA_VISIBLE_DEVICES"] = str(pid)
        procs.append(subprocess.Popen(TRAIN + ["--out", two, "--coordinator", "localhost:12355", "--num-processes",
                                               "2", "--process-id", str(pid)], env=env, cwd=ROOT))
    codes = [p.wait(timeout=900) for p in procs]
    if any(codes):
        raise SystemExit(f"two-process run failed: exit codes {codes}")
    a, b = losses(one), losses(two)
    print("one process, 2 devices :", [round(x, 6) for x in a])
    print("two processes, 1 each  :", [round(x, 6) for x in b])
    print(f"max |difference| = {max(abs(x - y) for x, y in zip(a, b)):.3g} over {len(a)} steps")


if __name__ == "__main__":
    main()
