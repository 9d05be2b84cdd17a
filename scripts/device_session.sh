#!/usr/bin/env bash
# One device call that does not know in advance which GPU type it gets: installs the carried wheels,
# then runs the stage list for an H200 or for any other GPU, each stage capped so the whole call
# ends by T seconds (the records written so far still come back as $OUT/res.tgz).
# Usage: COMMIT=<sha> T=585 bash scripts/device_session.sh "<H200 stages>" "<other GPU stages>"
# A stage is NAME:LIMIT[:ARGS]: a scripts/device_stage.sh stage, its LIMIT in seconds and its
# arguments with "," for spaces; its log is $OUT/NAME[_FIRSTARG].log.
# e.g. "realtime:420 attn:110:--exclude,attention=fp8_cudnn" "vae:150 spec:250:interactive"
set -u; [ $# -eq 2 ] || { echo "usage: COMMIT=<sha> T=585 $0 \"<H200 stages>\" \"<other GPU stages>\"" >&2; exit 2; }
export COMMIT=${COMMIT:?}; T=${T:-585}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu" | tee $OUT/gpu.txt
bash scripts/device_stage.sh install || exit 1
case $gpu in *H200*) stages=$1 ;; *) stages=$2 ;; esac
for s in $stages; do
  IFS=: read -r name lim extra <<< "$s"; extra=${extra//,/ }
  left=$((T - SECONDS)); [ $left -lt 30 ] && { echo "skip $s (left $left s)"; continue; }
  [ $lim -gt $((left - 5)) ] && lim=$((left - 5))
  t0=$SECONDS; log="$OUT/$name${extra:+_${extra%% *}}.log"  # spec_interactive.log, profile_fa3kv.log
  LIMIT=$lim bash scripts/device_stage.sh $name $extra > "$log" 2>&1
  echo "$s rc=$? in $((SECONDS-t0))s"; tail -2 "$log"
done  # each stage leaves every record so far in $OUT/res.tgz
ls "$OUT"
