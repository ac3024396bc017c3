#!/usr/bin/env bash
# Everything one lent GPU session runs, in one call, results under $OUT:
#   install from the checkout, build the C++/CUDA extension, info, verify, the test suite (CPU and CUDA), the attention and
#   depthwise-conv benchmarks, the model benchmark. Each stage has its own time limit, so a slow one cannot
#   starve the rest; narrow them with the *_ARGS variables.
# Usage (device tool): COATNET_FAST_COMMIT=<sha> bash bench/gpu_checks.sh
# The defaults fit one 15-minute device session with room for the machine's start (about
# 12 minutes at most); each stage writes its results as it goes, so a cut-off stage still
# leaves the earlier ones under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/coatnet_fast_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export COATNET_FAST_COMMIT=${COATNET_FAST_COMMIT:-unknown}
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || echo "editable install failed (see install.txt); running from PYTHONPATH"
# The extension (CPU + CUDA parts) before anything uses it, so its build time and any compiler
# error land in their own log instead of inside a test's time limit.
export MAX_JOBS=${MAX_JOBS:-16} COATNET_FAST_EXT_DIR=${COATNET_FAST_EXT_DIR:-$OUT/../coatnet_fast_ext_cache} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
{ time timeout "${EXT_TIMEOUT:-300}" python3 -m coatnet_fast build-ext --verbose; } > "$OUT/build_ext.txt" 2>&1 || { status=1; tail -60 "$OUT/build_ext.txt"; }
grep -A12 "^built " "$OUT/build_ext.txt"
{ python3 -m coatnet_fast info && python3 -m coatnet_fast verify; } 2>&1 | tee "$OUT/verify.txt" || status=1
# CI runs the CPU tests; here, the CUDA cases and the tests that pick the GPU themselves.
if [ -n "${PYTEST_ARGS:-}" ]; then read -r -a pytest_args <<< "$PYTEST_ARGS"
else pytest_args=(tests -k "cuda or offsets_past or strided_views or squeeze"); fi
timeout "${PYTEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider "${pytest_args[@]}" 2>&1 | tee "$OUT/pytest.txt" | tail -40 || status=1
timeout "${ATTN_TIMEOUT:-200}" python3 bench/bench_rel_bias_attention.py ${ATTN_ARGS:---models coatnet_0 --dtypes bf16} --out "$OUT/rel_bias_attention_gpu.json" > "$OUT/bench_attention.txt" 2>&1 || status=1
grep -E "^\{" "$OUT/bench_attention.txt" | cut -c1-260
timeout "${DW_TIMEOUT:-150}" python3 bench/bench_dwconv_bn_gelu.py ${DW_ARGS:-} --out "$OUT/dwconv_bn_gelu_gpu.json" > "$OUT/bench_dwconv.txt" 2>&1 || status=1
grep -E "^\{" "$OUT/bench_dwconv.txt" | cut -c1-260
timeout "${BENCH_TIMEOUT:-200}" python3 bench/bench_model.py ${BENCH_ARGS:---models coatnet_0 --providers eager,fused --warmup 3 --steps 10} --out "$OUT/model_gpu.json" 2>&1 | tee "$OUT/bench_model.txt" || status=1
exit $status
