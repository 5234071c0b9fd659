#!/usr/bin/env bash
# GPU check, run on the device machine from the repository root:
#   bash scripts/gpu_check.sh            # tests, memcheck, kernel benchmark (table printed last)
#   STEPS="tests bench" bash scripts/gpu_check.sh
#   STEPS="tests memcheck gen-tests gen-cli" STEP_LIMIT_S=140 bash scripts/gpu_check.sh   # one call, a table last
#   STEPS="gen-tests gen-cli decode decode70b" bash scripts/gpu_check.sh   # generation tests, CLI, decode benchmarks
#   STEPS=quant-best bash scripts/gpu_check.sh   # the quantizer's best preset timed on the GPU
#   STEPS=profile bash scripts/gpu_check.sh      # Nsight Compute: one-token Psumbook, stalls per SASS instruction
#     (TOKENS=4 PROFILE_KERNEL=psumbook_mma_kernel: the four-token Psumbook of psumbook_mma.cu)
# Wheels in .whl/ (e.g. aqlm, for the benchmark's peer kernels) are installed to /tmp/site first.
# Logs and JSON go to $OUT (or ./out when OUT is unset).
set -uo pipefail
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-out}"; mkdir -p "$OUT"
export CODEGEMM_CUDA_CACHE="${CODEGEMM_CUDA_CACHE:-$PWD/build/cuda}"  # prebuilt CUDA library, if carried
STEPS="${STEPS:-tests memcheck bench}"
status=0

# STEP_LIMIT_S=N: run each step in its own process under `timeout N` and print a table of the steps' exit codes
# and seconds last, so that one device call of several steps ends inside the tool's 10-minute limit with a verdict
# per step (e.g. STEPS="tests memcheck gen-tests gen-cli" STEP_LIMIT_S=140).
if [ -n "${STEP_LIMIT_S:-}" ] && [ -z "${GPU_CHECK_ONE_STEP:-}" ]; then
  summary=""
  for step in $STEPS; do
    start=$SECONDS
    GPU_CHECK_ONE_STEP=1 STEPS="$step" timeout "$STEP_LIMIT_S" bash "$0"
    rc=$?
    [ "$rc" -eq 0 ] || status=1
    summary+=$(printf '%-12s %4s %6ss' "$step" "$rc" "$((SECONDS - start))")$'\n'
  done
  printf '\n== steps (rc 124: stopped at STEP_LIMIT_S=%s)\n%-12s %4s %7s\n%s' "$STEP_LIMIT_S" step rc seconds "$summary"
  exit $status
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

for step in $STEPS; do
  case "$step" in
  tests)
    echo "== GPU tests"
    python3 -m pytest -q -m "gpu or not gpu" tests/test_gpu_kernels.py tests/test_grouped_gpu.py tests/test_tiled_gpu.py \
      tests/test_psumbook_mma_gpu.py tests/test_gated_gpu.py tests/test_triton_kernels.py tests/test_cuda_sass_gpu.py \
      2>&1 | tee "$OUT/gpu_tests.log" | tail -n 30 || status=1
    ;;
  memcheck)
    echo "== compute-sanitizer memcheck on a representative sweep"
    cat > /tmp/memcheck_sweep.py <<'PY'
import torch
from codegemm import CodebookConfig
from codegemm.layout import can_tile, tile_codes, tile_scales
from codegemm.ops.dispatch import codebook_matmul
torch.manual_seed(0)
for name, n, k in [("m2v8g128", 300, 384), ("m1v4g128", 77, 256), ("m3b6v8g24", 45, 144), ("m4b4v16", 33, 208),
                   ("m2v8", 129, 1000), ("m1b12v8g64", 40, 128), ("m1v4g512", 1000, 1536), ("m2v8g256", 4099, 2048)]:
    cfg = CodebookConfig.from_name(name)
    codes = torch.randint(0, cfg.codebook_size, (n, k // cfg.vec_len, cfg.num_codebooks), device="cuda",
                          dtype=torch.int32).to(cfg.code_dtype)
    books = torch.randn(cfg.num_codebooks, cfg.codebook_size, cfg.vec_len, device="cuda").half()
    scales = torch.rand(n, cfg.num_groups(k), device="cuda").half()
    for tokens in (1, 3, 16, 17, 53):
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(tokens, k, device="cuda", dtype=dtype)
            bias = torch.randn(n, device="cuda", dtype=dtype) if tokens % 2 else None
            codebook_matmul(x, codes, books, scales, bias, cfg)
            if can_tile(cfg, k):
                codebook_matmul(x, tile_codes(codes), books, tile_scales(scales), bias, cfg, tiled=True)
from codegemm.ops.dispatch import grouped_matmul
cfg = CodebookConfig.from_name("m2v8g128")
for sizes, k in [((2048, 1024, 1024), 1024), ((1024, 256, 256), 512), ((3072, 2048), 256)]:
    layers = [(torch.randint(0, 256, (n, k // 8, 2), device="cuda", dtype=torch.int32).to(torch.uint8),
               torch.randn(2, 256, 8, device="cuda").half(), torch.rand(n, k // 128, device="cuda").half())
              for n in sizes]
    for tokens in (1, 3, 16, 33):  # 33: slices of at most 16 tokens
        grouped_matmul(torch.randn(tokens, k, device="cuda", dtype=torch.float16), layers, None, cfg)
        grouped_matmul(torch.randn(tokens, k, device="cuda", dtype=torch.float16),
                       [(tile_codes(c), b, tile_scales(s)) for c, b, s in layers], None, cfg, tiled=True)
from codegemm.ops.dispatch import gated_matmul  # gate/up with the activation in the reduce, every kernel family
for n, k in [(1024, 512), (2048, 256)]:
    pair = [(torch.randint(0, 256, (n, k // 8, 2), device="cuda", dtype=torch.int32).to(torch.uint8),
             torch.randn(2, 256, 8, device="cuda").half(), torch.rand(n, k // 128, device="cuda").half()) for _ in "gu"]
    for tokens in (1, 3, 9, 20):
        for dtype in (torch.float16, torch.bfloat16):
            bias = torch.randn(2 * n, device="cuda", dtype=dtype) if tokens == 3 else None
            gated_matmul(torch.randn(tokens, k, device="cuda", dtype=dtype), pair, bias, cfg, "silu")
        gated_matmul(torch.randn(tokens, k, device="cuda", dtype=torch.float16),
                     [(tile_codes(c), b, tile_scales(s)) for c, b, s in pair], None, cfg, "gelu_tanh", tiled=True)
from codegemm.layout import tile_tables
from codegemm.ops.cuda import codebook_mma_cuda
for name, n, k in [("m1v4g128", 1100, 640), ("m2v8", 77, 384)]:  # psumbook_mma.cu on every plan, m1v4 included
    cfg = CodebookConfig.from_name(name)
    tables = tile_tables(torch.randint(0, 256, (n, k // cfg.vec_len, cfg.num_codebooks), device="cuda",
                                       dtype=torch.int32).to(torch.uint8),
                         torch.randn(cfg.num_codebooks, 256, cfg.vec_len, device="cuda").half(),
                         torch.rand(n, cfg.num_groups(k), device="cuda").half())
    for tokens in (1, 4):
        for tiles, splits in [(1, 1), (2, 2), (4, 1), (4, 5)]:
            codebook_mma_cuda(torch.randn(tokens, k, device="cuda", dtype=torch.float16), *tables, None, tiles, splits,
                              tiled=True, psumbook=True)
from codegemm import CodeGEMMLinear  # a captured graph: the matmuls load weights before waiting (weights_settled)
for name in ("m2v8g128", "m1v4g128"):
    cfg = CodebookConfig.from_name(name)
    chain = [CodeGEMMLinear.from_unpacked(
        torch.randint(0, 256, (n, 640 // cfg.vec_len, cfg.num_codebooks), device="cuda", dtype=torch.int32).to(torch.uint8),
        torch.randn(cfg.num_codebooks, 256, cfg.vec_len, device="cuda").half(),
        torch.rand(n, cfg.num_groups(640), device="cuda").half()).tile_() for n in (640, 640, 1000)]
    for tokens in (1, 3, 16):
        x = torch.randn(tokens, 640, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            for layer in chain:
                layer(x[:, :layer.in_features])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = x
                for layer in chain:
                    y = layer(y) * 0.05
            graph.replay()
torch.cuda.synchronize()
print("memcheck sweep ran")
PY
    compute-sanitizer --tool memcheck --error-exitcode 3 python3 /tmp/memcheck_sweep.py \
      2>&1 | tee "$OUT/memcheck.log" | tail -n 8 || status=1
    ;;
  tune)
    echo "== Psumbook tile plans"
    python3 -m codegemm.cli.main bench kernels --models "${TUNE_MODELS:-llama3-8b}" \
      --tune "${TUNE_KIND:-both}" --configs "${TUNE_CONFIGS:-m2v8g128}" --tokens "${TUNE_TOKENS:-1,16}" --json "$OUT/tune.json" \
      2>&1 | tee "$OUT/tune.log" | grep -v "^[0-9:]* WARNING" || status=1
    ;;
  bench)
    echo "== kernel benchmark"
    python3 -m codegemm.cli.main bench kernels --json "$OUT/kernels.json" ${BENCH_ARGS:-} \
      2>&1 | tee "$OUT/bench.log" || status=1
    ;;
  profile)
    echo "== Nsight Compute: one-token Psumbook on 8192x57344 and 4096x28672 (PROFILE_SKIP / PROFILE_COUNT pick launches)"
    ncu --clock-control none --kernel-name "regex:${PROFILE_KERNEL:-psumbook_kernel}" --launch-skip "${PROFILE_SKIP:-3}" \
      --launch-count "${PROFILE_COUNT:-2}" --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
      --section Occupancy --section MemoryWorkloadAnalysis --section SourceCounters --import-source no \
      -o "$OUT/psumbook" -f python3 scripts/profile_psumbook.py > "$OUT/profile_run.log" 2>&1 || status=1
    ncu -i "$OUT/psumbook.ncu-rep" --print-details all > "$OUT/profile.txt" 2>&1 || status=1
    ncu -i "$OUT/psumbook.ncu-rep" --page source --print-source sass --csv > "$OUT/profile_sass.csv" 2>&1 || status=1
    grep -E "Duration|Throughput|Warp Cycles Per Issued|Issued Warp Per|No Eligible|Stall" "$OUT/profile.txt" | head -n 60
    ;;
  quant-best)
    echo "== quantizer: best preset on one GPU (Gemma 3 270M architecture, random weights)"
    python3 scripts/time_quantize.py "$OUT/quant_best.json" 2>&1 | tee "$OUT/quant_best.log" | tail -n 3 || status=1
    ;;
  gen-tests)
    echo "== generation GPU tests (compiled, graph-replayed decode step)"
    python3 -m pytest -q -m gpu tests/test_generation_gpu.py 2>&1 | tee "$OUT/gen_tests.log" | tail -n 30 || status=1
    ;;
  gen-cli)
    echo "== codegemm generate on the GPU: random-weight CodeGEMM model of the Gemma 3 270M architecture (bf16, fp16 tables as codegemm quantize stores them), byte tokenizer"
    python3 - /tmp/gemma3-270m-random <<'PY' || status=1
import sys, torch
from codegemm.bench.archs import architecture_config
from codegemm.hf.checkpoint import save_quantized
from codegemm.quant.driver import cast_quantized
from codegemm.random_model import build_random_quantized_model
from tests._tiny_models import byte_tokenizer
model = build_random_quantized_model(architecture_config("gemma3-270m"), "m2v8g128", "cpu", torch.bfloat16, seed=0)
cast_quantized(model, torch.float16)  # loaded in bf16 by generate, the tables stay fp16: the CUDA kernels run
save_quantized(model, sys.argv[1])
byte_tokenizer().save_pretrained(sys.argv[1])
PY
    python3 -m codegemm.cli.main generate /tmp/gemma3-270m-random "The capital of France is" --max-new-tokens 48 \
      --ignore-eos 2>&1 | tee "$OUT/gen_cli.log" | tail -n 4 || status=1
    ;;
  decode)
    echo "== decode benchmark: Llama-3-8B architecture, batch 1/4/16 (DECODE_ARGS adds or overrides flags)"
    python3 -m codegemm.cli.main bench decode --arch llama3-8b --config m2v8g128 --batch 1 --batch 4 --batch 16 \
      --prompt 128 --tokens 256 --backends "${DECODE_BACKENDS:-fp16,codegemm,codegemm-separate,aqlm}" --json "$OUT/decode_8b.json" ${DECODE_ARGS:-} \
      2>&1 | tee "$OUT/decode_8b.log" | grep -v "^[0-9:]* WARNING" || status=1
    ;;
  decode70b)
    echo "== decode benchmark: Llama-3-70B architecture, 4k KV cache, batch 1"
    python3 -m codegemm.cli.main bench decode --arch llama3-70b --config m2v8g128 --batch 1 --prompt 128 \
      --tokens 256 --cache-len 4096 --backends fp16,codegemm,aqlm-2x8 --json "$OUT/decode_70b.json" \
      ${DECODE70B_ARGS:-} 2>&1 | tee "$OUT/decode_70b.log" | grep -v "^[0-9:]* WARNING" || status=1
    ;;
  *)
    echo "unknown step '$step'; steps: tests memcheck tune bench profile quant-best gen-tests gen-cli decode decode70b"
    status=2
    ;;
  esac
done
exit $status
