#!/bin/bash
# One device call, many small jobs sharing one GPU: `bash experiments/gpu_many.sh JOBS_FILE [MEM_FRACTION]` runs
# every non-empty, non-comment line of JOBS_FILE at once (bash -c), each with XLA_PYTHON_CLIENT_MEM_FRACTION set
# (default 0.1: nine jobs fit one GPU) and its log in $OUT/logs/job<i>.log; $R in a line is expanded from the
# environment (e.g. a shared command prefix). When all have ended it prints each log's last lines, and everything
# written under $OUT, logs included, comes back as one archive, $OUT/results.tgz (a call returns at most 8 files).
set -u
export PYTHONUNBUFFERED=1 OUT=${OUT:-out} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${2:-0.1}
[ -f "${1:-}" ] || { echo "usage: bash experiments/gpu_many.sh JOBS_FILE [MEM_FRACTION]: no file '${1:-}'"; exit 2; }
mkdir -p "$OUT/logs"
nvidia-smi -L 2>/dev/null
i=0
while IFS= read -r line; do
  [[ -z "${line// }" || "$line" == \#* ]] && continue
  echo "job$i: $line"
  bash -c "$line" > "$OUT/logs/job$i.log" 2>&1 &
  i=$((i + 1))
done < "$1"
wait
for log in "$OUT"/logs/job*.log; do echo "== $log"; tail -n 6 "$log" | cut -c1-300; done
( cd "$OUT" && find . -type f ! -name results.tgz | tar -czf results.tgz -T - && \
  find . -type f ! -name results.tgz -delete )
