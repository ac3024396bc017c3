#!/usr/bin/env bash
# What a lent GPU session runs, results under $OUT, in stages:
#   setup   nvidia-smi, install from the checkout, build the C++/CUDA extension, info, verify
#   host    bench/bench_host_overhead.py: host time per call, real launches, tiny sizes (BASELINE: and
#           another checkout's, on the same machine)
#   test    the test suite's CUDA cases
#   ops     the attention, depthwise-conv and batch_norm_act benchmarks (backward paths; tiles that
#           ptxas compiles without spills, tests/compile_for_gpu.py --ptxas)
#   profile bench/profile_ops.py: host, wall and kernel time per step, kernel by kernel, for the three
#           ops and a CoAtNet-0 step on each backend (what to optimise next)
#   model   the whole-model benchmark (with :graphs providers: the step replayed from a CUDA graph,
#           no host work: how much of a step is host time)
#   train   a short `coatnet-fast train` on the GPU defaults (bf16, channels_last)
# Usage (device tool): COATNET_FAST_COMMIT=<sha> STAGES="setup test" bash bench/gpu_checks.sh
# STAGES defaults to all of them; OPS (attention dwconv batch_norm_act max_pool2d) narrows the ops stage. One device call may run 600 s at most and a session has 900 s
# of device time, start-up included, so a session runs two calls on the warm machine (it is
# given back after 30 s idle: have the second command ready), e.g. STAGES="setup ops" then
# STAGES="profile model", with the stage limits below (or the *_TIMEOUT variables) keeping each
# call under its timeout. On 2026-11-27 (H200): setup 148 s (the extension's build 40 s), the
# depthwise benchmark with three forced tiles 76 s, the model benchmark with four providers
# 219 s (torch.compile's first training step alone 126 s); the CUDA test cases run about 1.2 s
# each (about 560 of them: narrow PYTEST_ARGS to what changed). The extension's build cache
# sits in the checkout (.ext_cache/, git-ignored), which the device keeps between calls. Second
# session of 2026-11-27 (H200): a fresh machine started in ~40 s; the host stage with a BASELINE
# took ~45 s; the model benchmark with eager and backend:triton ~70 s (Triton's first training
# step 32 s); 25 CUDA test cases of the depthwise op ~100 s (each new tile a compile). Fifth
# session (H200): backend:triton:compile:graphs' first training step 75 s, compile:graphs' 57 s;
# the depthwise benchmark, training only, three variants, ~100 s; the profile stage with
# --ops dwconv_bn_gelu,model --providers triton --iters 5 ~120 s.
# Each stage has its own time limit and writes its results as it goes, so a cut-off stage
# still leaves the earlier ones under $OUT; narrow them with the *_ARGS variables.
set -uo pipefail
OUT=${OUT:-/tmp/coatnet_fast_out}
mkdir -p "$OUT"
STAGES=${STAGES:-setup host test ops profile model train}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COATNET_FAST_COMMIT=${COATNET_FAST_COMMIT:-unknown}
export MAX_JOBS=${MAX_JOBS:-16} COATNET_FAST_EXT_DIR=${COATNET_FAST_EXT_DIR:-$PWD/.ext_cache} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
status=0
stage() { [[ " $STAGES " == *" $1 "* ]]; }

if stage setup; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
  python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || echo "editable install failed (see install.txt); running from PYTHONPATH"
  # The extension (CPU + CUDA parts) before anything uses it, so its build time and any
  # compiler error land in their own log instead of inside a test's time limit.
  { time timeout "${EXT_TIMEOUT:-240}" python3 -m coatnet_fast build-ext --verbose; } > "$OUT/build_ext.txt" 2>&1 || { status=1; tail -60 "$OUT/build_ext.txt"; }
  grep -A12 "^built " "$OUT/build_ext.txt"
  { python3 -m coatnet_fast info && python3 -m coatnet_fast verify; } 2>&1 | tee "$OUT/verify.txt" || status=1
fi
if stage host; then
  # Host time per call with real launches at tiny sizes (bench_host_overhead.py); with BASELINE
  # (another checkout's root, e.g. the commit before a change), the same probe on its code too,
  # on this machine: host speed differs between machines more than the changes do.
  timeout "${HOST_TIMEOUT:-60}" python3 bench/bench_host_overhead.py ${HOST_ARGS:-} --out "$OUT/host_overhead_gpu.json" 2>&1 | tee "$OUT/host_overhead.txt" | grep -v "^    " || status=1
  if [ -n "${BASELINE:-}" ]; then
    (cd "$BASELINE" && PYTHONPATH="$PWD" timeout "${HOST_TIMEOUT:-60}" python3 bench/bench_host_overhead.py ${HOST_ARGS:-} --out "$OUT/host_overhead_baseline.json" 2>&1 | tee "$OUT/host_overhead_baseline.txt" | grep -v "^    ") || status=1
  fi
fi
if stage test; then
  # CI runs the CPU tests; here, the CUDA cases and the tests that pick the GPU themselves.
  if [ -n "${PYTEST_ARGS:-}" ]; then read -r -a pytest_args <<< "$PYTEST_ARGS"
  else pytest_args=(tests -k "cuda or offsets_past or strided_views or squeeze or projection_residual or image_folder_trains"); fi
  # PYTEST_K: a -k expression with spaces (PYTEST_ARGS is split on them).
  if [ -n "${PYTEST_K:-}" ]; then pytest_args+=(-k "$PYTEST_K"); fi
  timeout "${PYTEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider "${pytest_args[@]}" 2>&1 | tee "$OUT/pytest.txt" | tail -40 || status=1
fi
OPS=${OPS:-attention dwconv batch_norm_act max_pool2d}
op() { [[ " $OPS " == *" $1 "* ]]; }
if stage ops && op attention; then
  timeout "${ATTN_TIMEOUT:-200}" python3 bench/bench_rel_bias_attention.py ${ATTN_ARGS:---models coatnet_0 --dtypes bf16} --out "$OUT/rel_bias_attention_gpu.json" > "$OUT/bench_attention.txt" 2>&1 || status=1
  python3 bench/summarize.py "$OUT/rel_bias_attention_gpu.json"
fi
if stage ops && op dwconv; then
  timeout "${DW_TIMEOUT:-150}" python3 bench/bench_dwconv_bn_gelu.py ${DW_ARGS:---tiles 16x64x4 --variants scratch,bwd16x8,bwd4x2} --out "$OUT/dwconv_bn_gelu_gpu.json" > "$OUT/bench_dwconv.txt" 2>&1 || status=1
  python3 bench/summarize.py "$OUT/dwconv_bn_gelu_gpu.json"
fi
if stage ops && op batch_norm_act; then
  timeout "${BNA_TIMEOUT:-130}" python3 bench/bench_batch_norm_act.py ${BNA_ARGS:---tiles 64x64x4,64x64x8} --out "$OUT/batch_norm_act_gpu.json" > "$OUT/bench_batch_norm_act.txt" 2>&1 || status=1
  python3 bench/summarize.py "$OUT/batch_norm_act_gpu.json"
fi
if stage ops && op max_pool2d; then
  timeout "${POOL_TIMEOUT:-90}" python3 bench/bench_max_pool2d.py ${POOL_ARGS:-} --out "$OUT/max_pool2d_gpu.json" > "$OUT/bench_max_pool2d.txt" 2>&1 || status=1
  python3 bench/summarize.py "$OUT/max_pool2d_gpu.json"
fi
if stage profile; then
  timeout "${PROFILE_TIMEOUT:-180}" python3 bench/profile_ops.py ${PROFILE_ARGS:-} --out "$OUT/profile_ops_gpu.json" 2>&1 | grep -v USDT | tee "$OUT/profile_ops.txt" | tail -60 || status=1
fi
if stage model; then
  timeout "${BENCH_TIMEOUT:-300}" python3 bench/bench_model.py ${BENCH_ARGS:---models coatnet_0 --providers eager,eager:graphs,backend:triton,backend:triton:graphs,compile --warmup 3 --steps 10} --out "$OUT/model_gpu.json" 2>&1 | tee "$OUT/bench_model.txt" || status=1
fi
if stage train; then
  timeout "${TRAIN_TIMEOUT:-90}" python3 -m coatnet_fast train ${TRAIN_ARGS:---epochs 5 --backend auto --no-progress} --out "$OUT/train_digits" 2>&1 | tee "$OUT/train.txt" | tail -5 || status=1
fi
exit $status
