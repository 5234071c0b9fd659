// Psumbook GEMV/small-batch GEMM for CodeGEMM, 1-16 tokens, 8-bit codes, fp16 codebooks and scales.
//
// One thread block (512 threads) owns 512 * RPT output rows and a contiguous range of K chunks (a split of K).
// A chunk is the 32 code bytes of each row that cover JT = 32 / M vectors (JT * V inputs, inside one
// scale group). Per chunk and token the block builds the Psumbook in shared memory,
//     psum[(j * M + i) * 256 + c] = <codebooks[i, c, :], x[t, (chunk * JT + j) * V : ... + V]>   (fp32),
// then each thread, which holds its rows' 32 code bytes in registers (two 16-byte streaming loads),
// gathers 32 entries per row, sums them in fp32 and scales by the row's group scale.
// Splits write fp32 partials that codegemm_split_reduce sums in split order: bit-identical results.
// Built at first use by codegemm/ops/cuda/__init__.py (nvcc -> shared library, called through ctypes).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int THREADS = 512;
constexpr int CENTROIDS = 256;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Codes are read exactly once: keep them out of L1. A block reads 32 bytes of each row per chunk; the L2
// prefetch size makes one DRAM access bring the row's next chunks into L2 as well (a block walks chunks
// in order), instead of a separate half-used 32-byte DRAM access per chunk.
#ifndef CODEGEMM_L2_PREFETCH
#define CODEGEMM_L2_PREFETCH 0
#endif
#define CODEGEMM_STR2(x) #x
#define CODEGEMM_STR(x) CODEGEMM_STR2(x)
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 r;
#if CODEGEMM_L2_PREFETCH > 0
  asm volatile("ld.global.nc.L1::no_allocate.L2::" CODEGEMM_STR(CODEGEMM_L2_PREFETCH) "B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
#else
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
#endif
  return r;
}

template <int M, int V, int RPT, int MAXT, typename XT>
__global__ void __launch_bounds__(THREADS) psumbook_kernel(
    const XT* __restrict__ x, int tokens, int stride_x, const uint8_t* __restrict__ codes,
    const __half* __restrict__ codebooks, const __half* __restrict__ scales, const XT* __restrict__ bias,
    XT* __restrict__ out, float* __restrict__ partial, int n_rows, int num_vectors, int groups,
    int vectors_per_group, int chunks_per_split) {
  static_assert(THREADS == 2 * CENTROIDS && (M == 1 || M == 2), "one centroid of one codebook per thread");
  constexpr int JT = 32 / M;
  constexpr int KT = JT * V;
  constexpr int ENTRIES = 32 * CENTROIDS;
  extern __shared__ __align__(16) float smem[];
  float* psum = smem;           // [32][256]: entry (q = j * M + i, c)
  float* xs = psum + ENTRIES;   // [MAXT][KT]

  const int tid = threadIdx.x;
  const int row0 = blockIdx.x * THREADS * RPT;
  const int num_chunks = num_vectors / JT;
  const int chunk_lo = blockIdx.y * chunks_per_split;
  const int chunk_hi = min(chunk_lo + chunks_per_split, num_chunks);
  const size_t row_bytes = static_cast<size_t>(num_vectors) * M;

  // Psumbook builder role: this thread computes centroid c of codebook q0 % M for every vector of a chunk,
  // so its centroid lives in registers for the whole kernel.
  const int cent = tid % CENTROIDS;
  const int q0 = tid / CENTROIDS;
  float centroid[V];
  {
    const __half2* cv = reinterpret_cast<const __half2*>(codebooks + ((q0 % M) * CENTROIDS + cent) * V);
#pragma unroll
    for (int h = 0; h < V / 2; ++h) {
      const float2 f = __half22float2(cv[h]);
      centroid[2 * h] = f.x;
      centroid[2 * h + 1] = f.y;
    }
  }

  float acc[RPT][MAXT];
#pragma unroll
  for (int r = 0; r < RPT; ++r)
#pragma unroll
    for (int t = 0; t < MAXT; ++t) acc[r][t] = 0.f;

  // Software pipeline: the next chunk's codes, scales and activations are in flight while this one is
  // built and gathered, so a block that walks several chunks hides the global-load latency.
  constexpr int XPT = (MAXT * KT + THREADS - 1) / THREADS;
  uint32_t word[RPT][8], next_word[RPT][8];
  float scale[RPT], next_scale[RPT];
  XT xr[XPT], next_xr[XPT];
  auto fetch = [&](int chunk, uint32_t (&w)[RPT][8], float (&sc)[RPT], XT (&xv)[XPT]) {
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int n = row0 + r * THREADS + tid;
      if (n < n_rows) {
        const uint4* p = reinterpret_cast<const uint4*>(codes + n * row_bytes + static_cast<size_t>(chunk) * 32);
        const uint4 a = load_stream(p), b = load_stream(p + 1);
        w[r][0] = a.x; w[r][1] = a.y; w[r][2] = a.z; w[r][3] = a.w;
        w[r][4] = b.x; w[r][5] = b.y; w[r][6] = b.z; w[r][7] = b.w;
        sc[r] = __half2float(scales[static_cast<size_t>(n) * groups + (chunk * JT) / vectors_per_group]);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) w[r][k] = 0u;
        sc[r] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < XPT; ++u) {
      const int i = tid + u * THREADS;
      const int t = i / KT, k = i - t * KT;
      if (t < tokens) xv[u] = x[static_cast<size_t>(t) * stride_x + static_cast<size_t>(chunk) * KT + k];
    }
  };
  if (chunk_lo < chunk_hi) fetch(chunk_lo, word, scale, xr);

  for (int chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
    __syncthreads();  // the previous chunk's readers of xs and psum are done
#pragma unroll
    for (int u = 0; u < XPT; ++u) {
      const int i = tid + u * THREADS;
      if (i < tokens * KT) xs[i] = to_float(xr[u]);
    }
    if (chunk + 1 < chunk_hi) fetch(chunk + 1, next_word, next_scale, next_xr);
    __syncthreads();
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t >= tokens) break;
      if (t > 0) __syncthreads();  // token t-1's gathers are done
      const float* xt = xs + t * KT;
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const int q = 2 * k + q0;
        const int j = M == 2 ? k : q;
        const float4* xv = reinterpret_cast<const float4*>(xt + j * V);
        float s = 0.f;
#pragma unroll
        for (int h = 0; h < V / 4; ++h) {
          const float4 xx = xv[h];
          s = fmaf(centroid[4 * h], xx.x, s);
          s = fmaf(centroid[4 * h + 1], xx.y, s);
          s = fmaf(centroid[4 * h + 2], xx.z, s);
          s = fmaf(centroid[4 * h + 3], xx.w, s);
        }
        psum[q * CENTROIDS + cent] = s;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int q = 0; q < 32; q += 2) {
          s0 += psum[q * CENTROIDS + ((word[r][q >> 2] >> ((q & 3) * 8)) & 255u)];
          s1 += psum[(q + 1) * CENTROIDS + ((word[r][(q + 1) >> 2] >> (((q + 1) & 3) * 8)) & 255u)];
        }
        acc[r][t] = fmaf(s0 + s1, scale[r], acc[r][t]);
      }
    }
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      scale[r] = next_scale[r];
#pragma unroll
      for (int k = 0; k < 8; ++k) word[r][k] = next_word[r][k];
    }
#pragma unroll
    for (int u = 0; u < XPT; ++u) xr[u] = next_xr[u];
  }

#pragma unroll
  for (int r = 0; r < RPT; ++r) {
    const int n = row0 + r * THREADS + tid;
    if (n >= n_rows) continue;
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t >= tokens) break;
      if (partial != nullptr) {
        partial[(static_cast<size_t>(blockIdx.y) * tokens + t) * n_rows + n] = acc[r][t];
      } else {
        const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
        out[static_cast<size_t>(t) * n_rows + n] = from_float<XT>(acc[r][t] + b);
      }
    }
  }
}

template <typename XT>
__global__ void split_reduce_kernel(const float* __restrict__ partial, const XT* __restrict__ bias,
                                    XT* __restrict__ out, int total, int n_rows, int splits) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  float s = 0.f;
  for (int k = 0; k < splits; ++k) s += partial[static_cast<size_t>(k) * total + i];
  if (bias != nullptr) s += to_float(bias[i % n_rows]);
  out[i] = from_float<XT>(s);
}

template <int M, int V, int RPT, int MAXT, typename XT>
int launch_psumbook(const void* x, int tokens, int stride_x, const void* codes, const void* codebooks,
                    const void* scales, const void* bias, void* out, float* partial, int n_rows, int num_vectors,
                    int groups, int vectors_per_group, int splits, cudaStream_t stream) {
  constexpr int JT = 32 / M;
  const int smem = (32 * CENTROIDS + MAXT * JT * V) * 4;
  auto kernel = psumbook_kernel<M, V, RPT, MAXT, XT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int num_chunks = num_vectors / JT;
  const int per_split = (num_chunks + splits - 1) / splits;
  const int used_splits = (num_chunks + per_split - 1) / per_split;
  dim3 grid((n_rows + THREADS * RPT - 1) / (THREADS * RPT), used_splits);
  kernel<<<grid, THREADS, smem, stream>>>(
      static_cast<const XT*>(x), tokens, stride_x, static_cast<const uint8_t*>(codes),
      static_cast<const __half*>(codebooks), static_cast<const __half*>(scales), static_cast<const XT*>(bias),
      static_cast<XT*>(out), used_splits > 1 ? partial : nullptr, n_rows, num_vectors, groups, vectors_per_group,
      per_split);
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  if (used_splits > 1) {
    const int total = tokens * n_rows;
    split_reduce_kernel<XT><<<(total + 255) / 256, 256, 0, stream>>>(
        partial, static_cast<const XT*>(bias), static_cast<XT*>(out), total, n_rows, used_splits);
    err = cudaGetLastError();
  }
  return static_cast<int>(err);
}

template <int M, int V, int RPT, typename XT>
int dispatch_tokens(int tokens, const void* x, int stride_x, const void* codes, const void* codebooks,
                    const void* scales, const void* bias, void* out, float* partial, int n_rows, int num_vectors,
                    int groups, int vpg, int splits, cudaStream_t stream) {
#define CODEGEMM_T(MT) \
  return launch_psumbook<M, V, RPT, MT, XT>(x, tokens, stride_x, codes, codebooks, scales, bias, out, partial, \
                                            n_rows, num_vectors, groups, vpg, splits, stream)
  if (tokens <= 1) { CODEGEMM_T(1); }
  if constexpr (RPT <= 2) {  // more accumulators would spill
    if (tokens <= 4) { CODEGEMM_T(4); }
    if (tokens <= 8) { CODEGEMM_T(8); }
    CODEGEMM_T(16);
  }
  return -1;
#undef CODEGEMM_T
}

template <typename XT>
int dispatch_config(int m, int v, int rpt, int tokens, const void* x, int stride_x, const void* codes,
                    const void* codebooks, const void* scales, const void* bias, void* out, float* partial,
                    int n_rows, int num_vectors, int groups, int vpg, int splits, cudaStream_t stream) {
#define CODEGEMM_C(MM, VV, RR)                                                                                    \
  if (m == MM && v == VV && rpt == RR)                                                                            \
  return dispatch_tokens<MM, VV, RR, XT>(tokens, x, stride_x, codes, codebooks, scales, bias, out, partial, n_rows, \
                                         num_vectors, groups, vpg, splits, stream)
  CODEGEMM_C(2, 8, 2);
  CODEGEMM_C(2, 8, 4);
  CODEGEMM_C(1, 4, 2);
  CODEGEMM_C(1, 4, 4);
#undef CODEGEMM_C
  return -1;
}

}  // namespace

extern "C" {

// Configs compiled in: (m, v) in {(2, 8), (1, 4)}, rows per thread 2 (any tokens) or 4 (one token).
// Returns a cudaError_t, or -1 for a config that is not compiled in. dtype: 0 fp16, 1 bf16 (activations, bias, output).
int codegemm_psumbook(int dtype, int m, int v, int rpt, int tokens, const void* x, int stride_x, const void* codes,
                      const void* codebooks, const void* scales, const void* bias, void* out, float* partial,
                      int n_rows, int num_vectors, int groups, int vectors_per_group, int splits, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return dispatch_config<__half>(m, v, rpt, tokens, x, stride_x, codes, codebooks, scales, bias, out, partial,
                                   n_rows, num_vectors, groups, vectors_per_group, splits, s);
  if (dtype == 1)
    return dispatch_config<__nv_bfloat16>(m, v, rpt, tokens, x, stride_x, codes, codebooks, scales, bias, out,
                                          partial, n_rows, num_vectors, groups, vectors_per_group, splits, s);
  return -1;
}

const char* codegemm_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
}
