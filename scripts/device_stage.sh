#!/usr/bin/env bash
# Run one stage of the GPU measurements on a lent device machine (README: this script's row
# under "Commands", and "Where the committed records come from").
# Usage: COMMIT=<sha> bash scripts/device_stage.sh STAGE [extra repro-run args]
# Records go to /tmp/res on the device and come back as one archive, $OUT/res.tgz (the device
# tool returns a limited number of files); logs and profiles are written under $OUT.
set -uo pipefail
stage=$1; shift
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared hosts (the device tool's rule); torchrun children inherit it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Carried wheels (.whl: diffusers, fa3-fwd, ...); .whl-extra holds fallbacks (a newer
# huggingface_hub and its HTTP client) installed only if diffusers does not import without them.
export PYTHONPATH=$PWD
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  if [ -d .whl-extra ] && ! PYTHONPATH=/tmp/site:$PWD python3 -c "import impl.model.vae" 2>/dev/null; then
    echo "diffusers needs the carried extras: installing .whl-extra"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-extra/*.whl || exit 1
  fi
  touch /tmp/site/.installed
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# Each run is capped (LIMIT seconds) so the records written so far are still copied out.
run() { timeout "${LIMIT:-560}" python3 -m repro run "$@" --results /tmp/res --no-progress --commit "${COMMIT:-unknown}"; }
case $stage in
  tests)    python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/tests_gpu.log"
            python3 -m pytest -q -p no:cacheprovider tests/test_nvfp4.py tests/test_quant_layers.py tests/test_kv_nvfp4.py 2>&1 | tail -3 ;;
  fast-tests)  # the GPU tests of the fast paths (FA3 / FP8 attention, FP8 KV cache, CUDA graphs,
            # light decoders, uint8 frames), and whether FlashAttention-3 loads with this torch
            python3 -c "import torch, fa3_fwd_interface as f; print('fa3-fwd loads with torch', torch.__version__, f.__file__)" \
              2>&1 | tail -3 | tee "$OUT/fa3_import.log"
            python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_fast_paths.py tests/test_gpu.py \
              tests/test_vae_decode.py 2>&1 | tee "$OUT/tests_fast_paths.log" | tail -15 ;;
  attn)     run experiments/attention_kernels.yaml "$@" ;;
  realtime) run experiments/realtime.yaml "$@" ;;
  kernels)  run experiments/nvfp4_kernels.yaml "$@"; run experiments/quant_linear.yaml "$@" ;;
  profile)  name=$1; shift  # profile NAME [repro profile args]: writes $OUT/rec/profile_NAME.json
            mkdir -p /tmp/res/profiles
            timeout "${LIMIT:-560}" python3 -m repro profile --preset wan22_ti2v_5b --commit "${COMMIT:-unknown}" "$@" \
              --out "/tmp/res/profiles/profile_$name.json" ;;
  spec)     name=$1; shift; run "experiments/$name.yaml" "$@" ;;  # spec NAME [repro-run args]: any experiment
  install)  ;;  # the carried wheels only (done above)
  infer)    run experiments/inference_speed.yaml "$@" ;;
  train)    python3 -m pytest -q -p no:cacheprovider tests/test_train_gpu.py 2>&1 | tee "$OUT/tests_train_gpu.log" | tail -3
            run experiments/train_step.yaml "$@" ;;
  trainbench) run experiments/train_step.yaml "$@" ;;
  vae)      run experiments/vae_decode.yaml "$@" ;;
  sp)       # multi-GPU hosts: measured SP training (Balanced vs naive) and SP inference, each
            # variant a torchrun over sp_size GPUs; pass --only sp_size=2 etc. to fit a call
            run experiments/sp_training.yaml "$@"; run experiments/sp_inference.yaml "$@" ;;
  vae2)     # VAE decode on a second GPU vs synchronous and side-stream decode on the DiT GPU
            run experiments/vae_second_gpu.yaml "$@" ;;
  quality)  # Trained proxy pieces persist in .cache/quality (carry it into the next call); they
            # come back as <= 15 MiB tar parts: cat $OUT/quality_cache.tar.part-* | tar x -C .cache
            run experiments/quality.yaml "$@"
            [ -d .cache/quality ] && tar cf - -C .cache quality | split -b 15m - "$OUT/quality_cache.tar.part-" ;;
  quality-pipeline)  # quality-pipeline [--measure k=v ...]: train every proxy piece within LIMIT seconds,
            # independent pieces side by side (the small DiT leaves the GPU mostly idle): the VAE; then
            # the detector, the BF16 teacher followed by both LoRA students, and the NVFP4-trained
            # teacher (emulated NVFP4 training ran at about 1.3 steps/s on an H200, so 2000 steps take
            # about 26 min). A piece cut off by the deadline is redone by the next call. Logs come back as
            # one archive; the cache as tar parts, minus folders matching CACHE_EXCLUDE (the device
            # returns at most 64 MiB: exclude the pieces an earlier call already brought back).
            end=$((SECONDS + ${LIMIT:-560})); mkdir -p /tmp/logs
            piece() { timeout $((end - SECONDS)) python3 -m repro.quality.proxy --device cuda --no-progress \
                        --pieces "$1" "${@:2}" > "/tmp/logs/train_$1.log" 2>&1
                      local rc=$?; echo "$1: exit $rc at ${SECONDS}s"; return $rc; }
            piece vae "$@" &&
            { piece detector "$@" &
              { piece teacher "$@" && { piece lora4 "$@" & piece lora2 "$@" & wait; }; } &
              piece teacher_nvfp4_emulated "$@" &
              wait; }
            tail -n 3 /tmp/logs/*.log; tar czf "$OUT/train_logs.tgz" -C /tmp/logs .
            [ -d .cache/quality ] && tar cf - -C .cache --exclude="${CACHE_EXCLUDE:-/nothing}" quality \
              | split -b 15m - "$OUT/quality_cache.tar.part-" ;;
  quality-split)  # quality-split [repro-run args]: the quality spec as 7 concurrent `repro run --only`
            # groups on one GPU (each also runs the baseline), as the committed H200 records were made
            # to fit the session's device time. Quality metrics do not depend on it; the DiT speed
            # does, so it is recorded as dit_fps_shared_gpu. Rows a deadline cuts off are missing.
            end=$((SECONDS + ${LIMIT:-560})); mkdir -p /tmp/logs; extra=("$@")
            group() { log=$1; shift; timeout $((end - SECONDS)) python3 -m repro run experiments/quality.yaml \
                        --results /tmp/res --no-progress --commit "${COMMIT:-unknown}" "$@" > "/tmp/logs/$log.log" 2>&1; }
            for g in "lora4 model=lora steps=4" "lora2 model=lora steps=2" "real model=real" \
                     "kv model=teacher kv_cache=nvfp4" "sink model=teacher sink=false" \
                     "steps4 model=teacher steps=4" "steps2 model=teacher steps=2"; do
              set -- $g; name=$1; shift; args=(); for kv in "$@"; do args+=(--only "$kv"); done
              group "$name" --only train_precision=bf16 "${args[@]}" --measure shared_device=true "${extra[@]}" &
            done
            wait; tail -n 2 /tmp/logs/*.log; tar czf "$OUT/eval_logs.tgz" -C /tmp/logs . ;;
  quality-fast)  # quality-fast [--measure k=v ...]: the quality_fast_paths spec in one call: the VAE, then
            # the detector, the teacher and the three light decoders side by side, then the rows as
            # concurrent groups (the DiT speed of those rows is recorded as dit_fps_shared_gpu).
            end=$((SECONDS + ${LIMIT:-560})); mkdir -p /tmp/logs; spec=experiments/quality_fast_paths.yaml
            piece() { timeout $((end - SECONDS)) python3 -m repro.quality.proxy --spec $spec --device cuda \
                        --no-progress --pieces "$1" "${@:2}" > "/tmp/logs/train_$1.log" 2>&1
                      local rc=$?; echo "$1: exit $rc at ${SECONDS}s"; return $rc; }
            piece vae "$@" && { for p in detector teacher lightvae_p50 lightvae_p75 tae; do piece $p "$@" & done; wait; }
            for g in "decoder=wan attention=sdpa model=teacher" "model=real" "decoder=lightvae_p50" "decoder=lightvae_p75" \
                     "decoder=tae" "attention=fp8_emulated" "attention=fp8_triton"; do
              args=(); for kv in $g; do args+=(--only "$kv"); done
              timeout $((end - SECONDS)) python3 -m repro run $spec --results /tmp/res --no-progress \
                --commit "${COMMIT:-unknown}" "${args[@]}" --measure shared_device=true "$@" > "/tmp/logs/eval_${g// /_}.log" 2>&1 &
            done
            wait; tail -n 2 /tmp/logs/*.log; tar czf "$OUT/quality_fast_logs.tgz" -C /tmp/logs . ;;
  quality-train)  # quality-train [--pieces vae detector ...] [--measure k=v ...]: train proxy pieces
            # only (a call each when the whole schedule outlasts one device call); cache as above.
            timeout "${LIMIT:-560}" python3 -m repro.quality.proxy --device cuda --no-progress "$@" \
              2>&1 | tee "$OUT/quality_train.log"
            [ -d .cache/quality ] && tar cf - -C .cache quality | split -b 15m - "$OUT/quality_cache.tar.part-" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
status=$?
[ -d /tmp/res ] && tar czf "$OUT/res.tgz" -C /tmp/res .
exit $status
