// Pieces shared by the CUDA kernels (psumbook.cu, codebook_mma.cu): dtype conversions and the split-K
// reduction that sums fp32 partials [split][token][row] in split order (deterministic, no atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <utility>

// Sibling layers that read the same activations (q/k/v, gate/up), stacked along the output rows so that one
// launch serves them all: segment s owns rows [start[s], start[s + 1]) of the output and has its own codes,
// codebooks and scales (same K and scale groups). A single layer is one segment. The launchers refuse segment
// starts that are not multiples of their rows per block, so a block's rows always share one codebook.
// Outside the anonymous namespace: the extern "C" launchers take it, and a parameter type with internal
// linkage would give them internal linkage too (no exported symbol).
constexpr int MAX_SEGMENTS = 4;
struct Segments {
  int count;
  int start[MAX_SEGMENTS];
  const uint8_t* codes[MAX_SEGMENTS];
  const __half* codebooks[MAX_SEGMENTS];
  const __half* scales[MAX_SEGMENTS];
  // Each segment's strides, so the kernels read the row-major layout (codes [N][chunks][32 bytes], scales
  // [N][groups]) and the tiled one (codes [chunks][N][32 bytes], scales [groups][N]: codegemm/layout.py) alike.
  int code_row[MAX_SEGMENTS];     // bytes from a row's codes to the next row's
  int code_chunk[MAX_SEGMENTS];   // bytes from a row's 32-byte chunk of codes to its next
  int scale_row[MAX_SEGMENTS];    // elements from a row's scales to the next row's
  int scale_group[MAX_SEGMENTS];  // elements from a row's scale group to its next
  // Byte s of row n's 32-byte chunk is stored at s ^ (n & code_xor), n counted from the segment's start: 15 in the
  // tiled layout (the order the Psumbook kernel's lanes gather in), 0 row-major. The same for every segment.
  int code_xor;
  // 0: the output holds every row. 1 (SiLU) or 2 (tanh-approximated GELU): the two segments are a gated MLP's gate
  // and up projections of equal size, and the output [T][n_rows / 2] holds act(gate) * up, computed by the split-K
  // reduce from the fp32 sums, each rounded to the output dtype first (what the unfused model computes).
  int gate_act;
  // 1: no kernel just ahead of this launch can have written the tables, so a matmul may read them before it waits
  // for that kernel (wait_before_weights below). 0: it waits first.
  int weights_settled;

  __host__ __device__ int find(int row) const {
    int s = 0;
#pragma unroll
    for (int i = 1; i < MAX_SEGMENTS; ++i) s += (i < count && row >= start[i]) ? 1 : 0;
    return s;
  }
  // a[s] for a block-uniform s, by constant indices: a run-time index would copy the whole struct from the
  // parameter bank into each thread's local memory.
  template <typename T>
  __device__ __forceinline__ static T pick(const T (&a)[MAX_SEGMENTS], int s) {
    T r = a[0];
#pragma unroll
    for (int i = 1; i < MAX_SEGMENTS; ++i) r = (i == s) ? a[i] : r;
    return r;
  }
  // Whether every segment starts on a block boundary (the kernels' precondition).
  __host__ bool aligned(int rows_per_block) const {
    if (count < 1 || count > MAX_SEGMENTS || start[0] != 0) return false;
    for (int i = 1; i < count; ++i)
      if (start[i] % rows_per_block != 0 || start[i] <= start[i - 1]) return false;
    return true;
  }
};

namespace {

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Lanes per shared-memory phase: 8 for 16-byte (v = 8) loads, 16 for 8-byte (v = 4) ones.
template <int V>
__host__ __device__ constexpr int codebook_copies() { return V == 8 ? 8 : 16; }

// The fp16 codebook in shared memory, one copy per lane of a memory phase: centroid idx = i * 256 + c, copy p at
// byte (idx * copies + p) * V * 2, so the lanes of a phase always hit distinct banks whatever the codes.
// All THREADS threads of the block call it; it ends with a barrier and returns this lane's base pointer (add
// code * copies * V * 2). THREADS is a compile-time stride so the copy loop unrolls and its global loads are all
// in flight at once: with blockDim.x as the stride they ran one after another, which cost the decode step of
// the 8B model 0.45 ms at batch 4 (H200).
template <int M, int V, int THREADS>
__device__ __forceinline__ const uint8_t* replicate_codebook(uint8_t* cbs, const __half* codebooks) {
  constexpr int COPIES = codebook_copies<V>();
  constexpr int UNITS = M * 256 * COPIES;
  static_assert(UNITS % THREADS == 0, "whole rounds of the copy loop");
#pragma unroll
  for (int e = threadIdx.x; e < UNITS; e += THREADS) {
    const int p = e % COPIES, idx = e / COPIES;
    if constexpr (V == 8) {
      reinterpret_cast<uint4*>(cbs)[idx * COPIES + p] = reinterpret_cast<const uint4*>(codebooks)[idx];
    } else {
      reinterpret_cast<uint2*>(cbs)[idx * COPIES + p] = reinterpret_cast<const uint2*>(codebooks)[idx];
    }
  }
  __syncthreads();
  return cbs + ((threadIdx.x & 31) % COPIES) * V * 2;
}

// Programmatic dependent launch (Hopper and later): the split-K reduce is launched while the matmul's blocks still
// run, so its launch latency hides behind their tail; it waits in griddepcontrol.wait until the matmul grid has
// finished and its partials are visible. The matmul kernels allow it as soon as all their blocks are running.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_primary_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Per-block timestamps (%globaltimer) for scripts/trace_chain.py, which builds the library with -DCODEGEMM_TRACE and
// splits a chain of layer calls into each kernel's body and the hand-offs between kernels. Without the macro every
// member is empty and compiles away. A block's thread 0 records (kind, grid size, block) and three times: its start,
// the end of its wait for the kernel ahead, its end; each translation unit keeps its own buffer (trace_set below).
enum TraceKind { TRACE_PSUMBOOK = 1, TRACE_CODEBOOK_MMA = 2, TRACE_PSUMBOOK_MMA = 3, TRACE_REDUCE = 4, TRACE_GATED_REDUCE = 5 };
#ifdef CODEGEMM_TRACE
__device__ unsigned long long* trace_buffer;  // 4 words per record
__device__ unsigned trace_capacity;
__device__ unsigned trace_length;
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
struct BlockTrace {
  unsigned long long start, waited_at = 0;
  __device__ BlockTrace() : start(global_ns()) {}
  __device__ void waited() { waited_at = global_ns(); }
  __device__ void done(TraceKind kind) const {
    if (threadIdx.x != 0 || trace_buffer == nullptr) return;
    const unsigned long long end = global_ns();
    const unsigned slot = atomicAdd(&trace_length, 1u);
    if (slot >= trace_capacity) return;
    unsigned long long* r = trace_buffer + 4ull * slot;
    r[0] = (static_cast<unsigned long long>(kind) << 48) |
           (static_cast<unsigned long long>(gridDim.x * gridDim.y) << 24) | (blockIdx.y * gridDim.x + blockIdx.x);
    r[1] = start;
    r[2] = waited_at;
    r[3] = end;
  }
};
// Points this translation unit's kernels at `buffer` (capacity records, 4 words each) and empties it.
inline int trace_set(void* buffer, unsigned capacity) {
  unsigned zero = 0;
  cudaError_t err = cudaMemcpyToSymbol(trace_buffer, &buffer, sizeof(buffer));
  if (err == cudaSuccess) err = cudaMemcpyToSymbol(trace_capacity, &capacity, sizeof(capacity));
  if (err == cudaSuccess) err = cudaMemcpyToSymbol(trace_length, &zero, sizeof(zero));
  return static_cast<int>(err);
}
#define CODEGEMM_TRACE_SETTER(name) \
  int name(void* buffer, unsigned capacity) { return trace_set(buffer, capacity); }
#else
struct BlockTrace {
  __device__ void waited() {}
  __device__ void done(TraceKind) const {}
};
#define CODEGEMM_TRACE_SETTER(name)
#endif

// Whether the current device takes programmatic dependent launches (compute capability 9.0 and later).
inline bool dependent_launch_supported() {
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 9;
}

template <typename XT>
__global__ void split_reduce_kernel(const float* __restrict__ partial, const XT* __restrict__ bias,
                                    XT* __restrict__ out, int total, int n_rows, int splits) {
  BlockTrace trace;
  allow_dependent_launch();  // the next matmul may start its weight-only prologue
  wait_for_primary_grid();
  trace.waited();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  float s = 0.f;
  for (int k = 0; k < splits; ++k) s += partial[static_cast<size_t>(k) * total + i];
  if (bias != nullptr) s += to_float(bias[i % n_rows]);
  out[i] = from_float<XT>(s);
  trace.done(TRACE_REDUCE);
}

// The gate_act reduce: out[t][j] = act(gate) * up from the gate row j and the up row half + j of every split.
template <typename XT, int ACT>
__global__ void gated_reduce_kernel(const float* __restrict__ partial, const XT* __restrict__ bias,
                                    XT* __restrict__ out, int tokens, int half, int splits) {
  BlockTrace trace;
  allow_dependent_launch();  // the next matmul may start its weight-only prologue
  wait_for_primary_grid();
  trace.waited();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= tokens * half) return;
  const int t = i / half, j = i - t * half;
  const size_t per_split = static_cast<size_t>(tokens) * 2 * half;
  const size_t at = static_cast<size_t>(t) * 2 * half + j;
  float gate = 0.f, up = 0.f;
  for (int k = 0; k < splits; ++k) {
    gate += partial[k * per_split + at];
    up += partial[k * per_split + at + half];
  }
  if (bias != nullptr) {
    gate += to_float(bias[j]);
    up += to_float(bias[half + j]);
  }
  gate = to_float(from_float<XT>(gate));
  up = to_float(from_float<XT>(up));
  float act;
  if constexpr (ACT == 1) {
    act = gate / (1.f + expf(-gate));
  } else {
    act = 0.5f * gate * (1.f + tanhf(0.7978845608028654f * (gate + 0.044715f * gate * gate * gate)));
  }
  out[i] = from_float<XT>(act * up);
  trace.done(TRACE_GATED_REDUCE);
}

// Whether a launcher must write fp32 partials and run the reduce: K is split, or the output is gated.
inline bool needs_reduce(int used_splits, const Segments& segs) { return used_splits > 1 || segs.gate_act != 0; }

// Launches `kernel` as a programmatic dependent of the work ahead of it on the stream (Hopper and later; a plain
// launch elsewhere): its blocks may start while that work drains, and must call wait_for_primary_grid before they
// read anything it may have written.
template <typename... Params, typename... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                             Args&&... args) {
  cudaLaunchAttribute dependent;
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &dependent;
  config.numAttrs = dependent_launch_supported() ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// The matmul kernels are launched as dependents too, so a layer's launch, block setup and weight loads overlap the
// kernel ahead of it (usually the previous layer's reduce). They wait before reading the activations, and before
// reading their tables as well unless segs.weights_settled: the caller's word that no kernel just ahead of this one
// can have written them (codegemm/ops/cuda/settled.py). wait_before_weights at the kernel's start,
// wait_before_activations after its weight-only prologue: exactly one of them waits.
__device__ __forceinline__ void wait_before_weights(const Segments& segs, BlockTrace& trace) {
  if (!segs.weights_settled) {
    wait_for_primary_grid();
    trace.waited();
  }
}
__device__ __forceinline__ void wait_before_activations(const Segments& segs, BlockTrace& trace) {
  if (segs.weights_settled) {
    wait_for_primary_grid();
    trace.waited();
  }
}

// Loads of a layer's tables (codebooks, scales) in a kernel that may read them before wait_before_activations: a
// volatile load stays after wait_before_weights as written. __ldg did not: it is an invariant load, which the compiler
// hoisted above that wait even with unsettled tables, i.e. while the kernel ahead might still be writing them.
__device__ __forceinline__ uint32_t load_table_word(const uint32_t* p) {
  uint32_t r;
  asm volatile("ld.global.u32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
}
// An fp16 table value (a group scale) as raw bits in a 32-bit register, for a kernel that loads it chunks ahead:
// converted (half_bits_to_float) where it is used. Loaded as a __half, it was packed or converted right after
// its load, and that instruction waited on the DRAM round trip: the one-token kernel's largest stall (v20).
__device__ __forceinline__ uint32_t load_table_half_bits(const __half* p) {
  uint32_t r;
  asm volatile("ld.global.u16 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// out = sum over splits of partial (+ bias), or its gated form (segs.gate_act); returns the launch's cudaError_t.
template <typename XT>
int launch_split_reduce(const float* partial, const void* bias, void* out, int tokens, int n_rows, int splits,
                        const Segments& segs, cudaStream_t stream) {
  const int act = segs.gate_act;
  if (act != 0 && (act > 2 || segs.count != 2 || 2 * segs.start[1] != n_rows)) return static_cast<int>(cudaErrorInvalidValue);
  const int total = tokens * (act != 0 ? n_rows / 2 : n_rows);
  const dim3 grid((total + 255) / 256), block(256);
  const XT* b = static_cast<const XT*>(bias);
  XT* o = static_cast<XT*>(out);
  if (act == 1) return static_cast<int>(launch_dependent(gated_reduce_kernel<XT, 1>, grid, block, 0, stream, partial, b, o, tokens, n_rows / 2, splits));
  if (act == 2) return static_cast<int>(launch_dependent(gated_reduce_kernel<XT, 2>, grid, block, 0, stream, partial, b, o, tokens, n_rows / 2, splits));
  return static_cast<int>(launch_dependent(split_reduce_kernel<XT>, grid, block, 0, stream, partial, b, o, total, n_rows, splits));
}

}  // namespace
