#!/usr/bin/env bash
# One device call that does not know in advance which GPU type it gets: installs the carried wheels,
# then runs the stage list for an H200 or for any other GPU, each stage capped so the whole call
# ends by T seconds (the records written so far still come back as $OUT/res.tgz).
# Usage: COMMIT=<sha> T=585 bash scripts/device_session.sh "<H200 stages>" "<other GPU stages>"
# A stage is NAME:LIMIT[:ARGS], ARGS with "," for spaces; NAME is a scripts/device_stage.sh stage,
# or spec=<experiment> to run experiments/<experiment>.yaml directly.
# e.g. "realtime:420 attn:110:--exclude,attention=fp8_cudnn" "vae:150 spec=interactive:250"
set -u; [ $# -eq 2 ] || { echo "usage: COMMIT=<sha> T=585 $0 \"<H200 stages>\" \"<other GPU stages>\"" >&2; exit 2; }
export COMMIT=${COMMIT:?}; T=${T:-585}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $gpu" | tee $OUT/gpu.txt
bash scripts/device_stage.sh none >/dev/null 2>&1
case $gpu in *H200*) stages=$1 ;; *) stages=$2 ;; esac
for s in $stages; do
  IFS=: read -r name lim extra <<< "$s"; extra=${extra//,/ }
  left=$((T - SECONDS)); [ $left -lt 30 ] && { echo "skip $s (left $left s)"; continue; }
  [ $lim -gt $((left - 5)) ] && lim=$((left - 5))
  t0=$SECONDS
  if [ "${name#spec=}" != "$name" ]; then PYTHONPATH=/tmp/site:$PWD timeout $lim python3 -m repro run experiments/${name#spec=}.yaml \
      --results /tmp/res --no-progress --commit $COMMIT $extra > $OUT/${name#spec=}.log 2>&1
  elif [ "$name" = profile ]; then timeout $lim bash scripts/device_stage.sh profile $extra > $OUT/$name.log 2>&1
  else LIMIT=$lim bash scripts/device_stage.sh $name $extra > $OUT/$name.log 2>&1; fi
  echo "$s rc=$? in $((SECONDS-t0))s"; tail -2 $OUT/${name#spec=}.log
done
tar czf $OUT/res.tgz -C /tmp/res . 2>/dev/null; ls $OUT
