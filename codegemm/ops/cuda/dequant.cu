// Dense weight from codes, for the prefill path (more than 16 tokens: dequantize once, then cuBLAS):
//     W[n, j * V + t] = scale[n, j / vectors_per_group] * sum_i codebooks[i, codes[n, j, i], t]
// summed and scaled in fp32 and rounded once to the activations' dtype, i.e. exactly
// codegemm.reference.dequantize(..., float32).to(dtype). m2v8 / m1v4 with 8-bit codes, fp16 codebooks and scales.
//
// Why CUDA: the job is a memory-bound pass (codes in, 2 bytes per weight out), and the Triton version's centroid
// gathers from global memory cap it at ~1.1 TB/s. Here the codebook sits in shared memory replicated once per
// lane of a memory phase (as in codebook_mma.cu), so the gathers are conflict-free; one lane per vector, so a
// warp reads 32 vectors' code bytes contiguously and writes 32 x 16 (or 8) contiguous bytes.

#include <stdint.h>

#include "common.cuh"

namespace {

constexpr int DQ_THREADS = 512;

template <int M, int V, typename XT>
__global__ void __launch_bounds__(DQ_THREADS) dequant_kernel(const Segments layer, XT* __restrict__ out, int n_rows,
                                                             int num_vectors, int vectors_per_group) {
  static_assert((M == 2 && V == 8) || (M == 1 && V == 4), "m2v8 or m1v4");
  constexpr int COPIES = codebook_copies<V>();
  constexpr int JT = 32 / M;  // vectors per 32-byte chunk of codes
  extern __shared__ __align__(16) uint8_t cbs[];
  const uint8_t* cb_lane = replicate_codebook<M, V, DQ_THREADS>(cbs, layer.codebooks[0]);
  const uint8_t* __restrict__ codes = layer.codes[0];
  const __half* __restrict__ scales = layer.scales[0];
  const size_t code_chunk = layer.code_chunk[0], scale_group = layer.scale_group[0];
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (DQ_THREADS / 32);
  for (int n = blockIdx.x * (DQ_THREADS / 32) + (threadIdx.x >> 5); n < n_rows; n += warps) {
    const uint8_t* row_codes = codes + static_cast<size_t>(n) * layer.code_row[0];
    const __half* row_scales = scales + static_cast<size_t>(n) * layer.scale_row[0];
    XT* row_out = out + static_cast<size_t>(n) * num_vectors * V;
    const int swz = n & layer.code_xor;  // byte s of the row's chunks is stored at s ^ swz (common.cuh)
#pragma unroll 4
    for (int j = lane; j < num_vectors; j += 32) {
      // M == 2: the vector's two code bytes stay adjacent under the swizzle, swapped when swz is odd.
      const uint8_t* vec_codes = row_codes + (j / JT) * code_chunk + (((j % JT) * M) ^ (swz & ~(M - 1)));
      float w[V];
      if constexpr (M == 2) {
        const uint32_t two = *reinterpret_cast<const uint16_t*>(vec_codes);
        const uint32_t shift = (swz & 1) * 8;
        const uint32_t c0 = (two >> shift) & 255u, c1 = (two >> (8 - shift)) & 255u;
        const uint4 a = *reinterpret_cast<const uint4*>(cb_lane + c0 * (COPIES * 16));
        const uint4 b = *reinterpret_cast<const uint4*>(cb_lane + 256 * COPIES * 16 + c1 * (COPIES * 16));
        const __half2* ha = reinterpret_cast<const __half2*>(&a);
        const __half2* hb = reinterpret_cast<const __half2*>(&b);
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const float2 fa = __half22float2(ha[h]), fb = __half22float2(hb[h]);
          w[2 * h] = fa.x + fb.x;
          w[2 * h + 1] = fa.y + fb.y;
        }
      } else {
        const uint2 a = *reinterpret_cast<const uint2*>(cb_lane + *vec_codes * (COPIES * 8));
        const __half2* ha = reinterpret_cast<const __half2*>(&a);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float2 fa = __half22float2(ha[h]);
          w[2 * h] = fa.x;
          w[2 * h + 1] = fa.y;
        }
      }
      const float s = __half2float(row_scales[j / vectors_per_group * scale_group]);
      XT packed[V];
#pragma unroll
      for (int t = 0; t < V; ++t) packed[t] = from_float<XT>(w[t] * s);
      if constexpr (V == 8) {
        reinterpret_cast<uint4*>(row_out)[j] = *reinterpret_cast<const uint4*>(packed);
      } else {
        reinterpret_cast<uint2*>(row_out)[j] = *reinterpret_cast<const uint2*>(packed);
      }
    }
  }
}

template <int M, int V, typename XT>
int launch_dequant(const Segments& layer, void* out, int n_rows, int num_vectors, int vectors_per_group,
                   cudaStream_t stream) {
  constexpr int smem = M * 256 * codebook_copies<V>() * V * 2;
  auto kernel = dequant_kernel<M, V, XT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  int device = 0, sms = 0, per_sm = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return static_cast<int>(err);
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
    return static_cast<int>(err);
  if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, DQ_THREADS, smem)) != cudaSuccess)
    return static_cast<int>(err);
  const int rows_per_block = DQ_THREADS / 32;
  const int grid = max(1, min((n_rows + rows_per_block - 1) / rows_per_block, sms * max(1, per_sm)));
  kernel<<<grid, DQ_THREADS, smem, stream>>>(layer, static_cast<XT*>(out), n_rows, num_vectors, vectors_per_group);
  return static_cast<int>(cudaGetLastError());
}

template <typename XT>
int dequant_config(int m, int v, const Segments& layer, void* out, int n_rows, int num_vectors, int vpg,
                   cudaStream_t stream) {
  if (layer.count != 1) return static_cast<int>(cudaErrorInvalidValue);
  if (m == 2 && v == 8) return launch_dequant<2, 8, XT>(layer, out, n_rows, num_vectors, vpg, stream);
  if (m == 1 && v == 4) return launch_dequant<1, 4, XT>(layer, out, n_rows, num_vectors, vpg, stream);
  return -1;
}

}  // namespace

extern "C" {

// dtype: 0 fp16, 1 bf16 (the output W). layer: one segment (its tables and strides). Returns a cudaError_t, or -1
// for a config that is not compiled in.
int codegemm_dequant(int dtype, int m, int v, const Segments* layer, void* out, int n_rows, int num_vectors,
                     int vectors_per_group, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == 0) return dequant_config<__half>(m, v, *layer, out, n_rows, num_vectors, vectors_per_group, s);
  if (dtype == 1) return dequant_config<__nv_bfloat16>(m, v, *layer, out, n_rows, num_vectors, vectors_per_group, s);
  return -1;
}
}
