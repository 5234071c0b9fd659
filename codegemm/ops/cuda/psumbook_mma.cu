// Psumbook GEMM for 2-4 tokens whose sums run on the tensor cores (v14): fp16 activations, 8-bit codes, m2v8 or
// m1v4, fp16 codebooks and scales, the tiled and swizzled code layout (codegemm/layout.py), scale groups that are
// multiples of 128 inputs (or per row).
//
// Why: the one-token Psumbook kernel (psumbook.cu) gathers a 4-byte fp32 entry and adds it with an FADD per code,
// so more tokens cost that much more each; the codebook tensor-core kernel (codebook_mma.cu) gathers a 16-byte
// centroid per m2v8 code whatever the token count, 4 bytes of shared memory per weight. Here the Psumbook entry of
// a code holds its four tokens' partial sums as fp16 (8 bytes: 2 bytes per weight for m2v8), and the adds are an
// mma: the gathered entries are the A operand of an m16n8k16 product whose constant B operand routes each entry
// half to its token's column, so 16 rows x 4 codes x 4 tokens are summed in fp32 by one instruction. A code then
// costs one PRMT (its address) and one 8-byte shared-memory load for all four tokens.
//
// The Psumbook of a chunk (32 code bytes of a row, 128 inputs) is [256 codes][32 tables][4 tokens] fp16, built per
// block on the tensor cores (mma m16n8k8: the chunk's activations [vector, token] x the codebook's transpose) and
// stored as fp16. fp16 keeps 11 bits of each entry (relative error <= 2^-11 per entry, like an fp16 weight); so that
// no entry can overflow fp16 for any fp16 activations, every block scales its centroids by a power of two f with
// 16 * max|centroid| * f <= 1 (exact but for subnormal centroid parts) and multiplies its sums by 1 / f at the end.
//
// Bank-conflict freedom. Table t of code c is at byte c * 256 + 8 * slot(t) + 4 * p, tokens in the order 0, 2, 1, 3
// (p = 0: tokens 0 and 2; p = 1: tokens 1 and 3). Gathers: lane (g, q) of a 16-row tile reads 8 code bytes of rows
// g and g + 8 (the tiled layout's swizzle puts table 8 (q ^ h) + (j ^ g) at register byte j of row g + 8 h), and
// slot() maps the 16 tables a half warp reads at one step to 16 distinct bank pairs. Builds: m2v8 lane q stores
// m-tile i ^ (q & 2) of codebook (w / 8) ^ (q & 1) at store i (the codebook chosen by its B fragment, the m-tile
// by a swap in registers); m1v4 lane q stores m-tile (i + q) % 4 (a rotation). slot() maps both to 32 banks.
// Splits of K write fp32 partials that the reduce kernel of common.cuh sums in split order: bit-identical reruns.

#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

constexpr int PM_THREADS = 512;
constexpr int PM_WARPS = PM_THREADS / 32;
constexpr int PM_TOKENS = 4;
constexpr int PM_X_WORDS = 80;                  // a token's 128 inputs (64 words) + 16 words: tokens t, t + 1 on other banks
constexpr int PM_PSUM_BYTES = 256 * 32 * 8;     // [code][slot][4 fp16 tokens]
constexpr int PM_MAX_CHUNKS = 8;                // chunks per split (the activations staged per block)
constexpr int PM_X_BYTES = PM_MAX_CHUNKS * PM_TOKENS * PM_X_WORDS * 4;

// Slot of table t in a code's 256-byte row: bit 2 of t goes to the top, and for m2v8 (table = 2 * vector +
// codebook) bit 3 is xored with it. Linear over GF(2). Its low four bits (the bank pair) are distinct on the 16
// tables with a fixed bit 2 (one gather step of a half warp) and, for m2v8, on the 16 tables with a fixed bit 3
// (one build store of a warp: both codebooks, m-tiles i and i ^ 2); for m1v4 a build store covers the 16 tables
// with a fixed bit 2.
template <int M>
__host__ __device__ constexpr uint32_t slot(uint32_t t) {
  return (((t >> 2) & 1u) << 4) | (((t >> 4) & 1u) << 3) | ((((t >> 3) ^ (M == 2 ? t >> 2 : 0u)) & 1u) << 2) |
         (((t >> 1) & 1u) << 1) | (t & 1u);
}

__device__ __forceinline__ void mma_k8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(b));
}

__device__ __forceinline__ void mma_k16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint2 load_codes8(const uint8_t* p) {
  uint2 r;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// w[(i + q) % 4] at position i: the rotation that spreads a build store over the banks.
__device__ __forceinline__ void rotate4(uint32_t (&w)[4], int q) {
  uint32_t r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) r[i] = (q & 1) ? w[(i + 1) & 3] : w[i];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = (q & 2) ? r[(i + 2) & 3] : r[i];
}

// Largest |centroid| over the block's B fragments (together the whole codebook), as fp16 bits, via shared memory.
__device__ __forceinline__ float block_max_abs(uint32_t local_bits, uint32_t* red) {
  const uint32_t m = __reduce_max_sync(0xffffffffu, local_bits);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  uint32_t all = 0;
#pragma unroll
  for (int w = 0; w < PM_WARPS; ++w) all = max(all, red[w]);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(all)));
}

__device__ __forceinline__ uint32_t abs_bits(uint32_t w) { return max(w & 0x7fffu, (w >> 16) & 0x7fffu); }

// The power of two f with 16 * max_abs * f <= 1 (1 for an all-zero codebook), within fp16's range.
__device__ __forceinline__ float centroid_factor(float max_abs) {
  if (!(max_abs > 0.f)) return 1.f;
  const float f = __int_as_float(__float_as_int(1.f / (16.f * max_abs)) & 0x7f800000);
  return fminf(fmaxf(f, 0x1p-24f), 0x1p15f);
}

// Blocks of 1024 rows run one per SM (128 registers) and can afford two Psumbook buffers: one barrier per chunk,
// and a warp done with its gathers builds the next chunk while others still gather.
__host__ __device__ constexpr bool double_psumbook(int r) { return r >= 4; }
__host__ __device__ constexpr int psumbook_mma_smem(int r) {
  return (double_psumbook(r) ? 2 : 1) * PM_PSUM_BYTES + PM_X_BYTES + PM_WARPS * 4;
}

template <int M, int V, int R>
__global__ void __launch_bounds__(PM_THREADS, R <= 2 ? 2 : 1) psumbook_mma_kernel(
    const __half* __restrict__ x, int tokens, int stride_x, const __grid_constant__ Segments segs,
    const __half* __restrict__ bias, __half* __restrict__ out, float* __restrict__ partial, int n_rows, int num_chunks,
    int chunks_per_group, int chunks_per_split) {
  static_assert((M == 2 && V == 8) || (M == 1 && V == 4), "m2v8 or m1v4");
  constexpr bool DOUBLE = double_psumbook(R);
  BlockTrace trace;
  allow_dependent_launch();  // the split-K reduce may launch now (common.cuh)
  wait_before_weights(segs, trace);
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* psum = smem;
  uint32_t* xs = reinterpret_cast<uint32_t*>(smem + (DOUBLE ? 2 : 1) * PM_PSUM_BYTES);  // [chunk][token][PM_X_WORDS]
  uint32_t* red = xs + PM_X_BYTES / 4;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  constexpr int ROWS = PM_WARPS * 16 * R;
  const int block_row0 = blockIdx.x * ROWS;
  const int chunk_lo = blockIdx.y * chunks_per_split;
  const int nch = min(chunks_per_split, num_chunks - chunk_lo);
  const int seg = segs.find(block_row0);
  const int seg_row0 = segs.start[seg];
  const uint8_t* __restrict__ codes = segs.codes[seg];
  const __half* __restrict__ codebooks = segs.codebooks[seg];
  const __half* __restrict__ scales = segs.scales[seg];
  const uint32_t code_row = segs.code_row[seg], code_chunk = segs.code_chunk[seg];
  const uint32_t scale_row = segs.scale_row[seg], scale_group = segs.scale_group[seg];

  const int tile_row0 = block_row0 + warp * 16 * R;
  uint32_t code_off[R][2], scale_off[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t row = static_cast<uint32_t>(min(tile_row0 + r * 16 + g + 8 * h, n_rows - 1) - seg_row0);
      code_off[r][h] = row * code_row + 8 * q;
      scale_off[r][h] = row * scale_row;
    }

  // A chunk's codes and scales, loaded at its start: in flight during its build and barrier. Loading them a chunk
  // ahead (a copy in registers across the gathers) was 3-5% slower (H200: more register moves, 128 registers).
  // The chunk's code and scale tables advance by pointer steps: a chunk's address arithmetic (a division and a
  // 64-bit product per load) had been a fifth of the loop's instructions (v21).
  uint2 chunk_cw[R][2];
  __half chunk_sv[R][2];
  const uint8_t* chunk_codes = codes + static_cast<size_t>(chunk_lo) * code_chunk;
  const __half* group_scales = scales + static_cast<size_t>(chunk_lo / chunks_per_group) * scale_group;
  int in_group = chunk_lo % chunks_per_group;
  auto fetch = [&]() {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        chunk_cw[r][h] = load_codes8(chunk_codes + code_off[r][h]);
        chunk_sv[r][h] = group_scales[scale_off[r][h]];
      }
    chunk_codes += code_chunk;
    if (++in_group == chunks_per_group) {
      in_group = 0;
      group_scales += scale_group;
    }
  };

  // Build role. m2v8: warp w makes centroids 32 (w % 8) .. + 31 (four n-tiles of 8) for the chunk's 16 vectors x
  // 4 tokens (four m-tiles: rows 4 * token + vector % 4 of vectors 4 mt .. 4 mt + 3), codebook w / 8 in the
  // n-tiles' columns 0, 1, 4, 5 and the other one in columns 2, 3, 6, 7: lane (g, q)'s results are then of codebook
  // (w / 8) ^ (q & 1), which halves the selects that spread a warp's stores over the banks.
  // m1v4: warp w makes centroids 16 w .. 16 w + 15 (two n-tiles) for the 32 vectors (eight m-tiles; k = 4..7 zero).
  constexpr int NB = M == 2 ? 4 : 2;   // n-tiles per warp
  constexpr int MT = M == 2 ? 4 : 8;   // m-tiles per chunk
  const uint32_t* book_words = reinterpret_cast<const uint32_t*>(codebooks);
  uint32_t bfrag[NB];
  uint32_t local_max = 0;
#pragma unroll
  for (int k = 0; k < NB; ++k) {
    if constexpr (M == 2) {
      const int c = 8 * (4 * (warp & 7) + k) + g;
      bfrag[k] = load_table_word(book_words + (((warp >> 3) ^ ((g >> 1) & 1)) * 256 + c) * 4 + q);
    } else {
      const int c = 8 * (2 * warp + k) + g;
      bfrag[k] = q < 2 ? load_table_word(book_words + c * 2 + q) : 0u;
    }
    local_max = max(local_max, abs_bits(bfrag[k]));
  }
  // Stage the split's activations, tokens past `tokens` as zeros.
  wait_before_activations(segs, trace);
  const uint32_t* x_words = reinterpret_cast<const uint32_t*>(x);
  for (int e = tid; e < nch * PM_TOKENS * 64; e += PM_THREADS) {
    const int cl = e >> 8, t = (e >> 6) & 3, w = e & 63;
    xs[(cl * PM_TOKENS + t) * PM_X_WORDS + w] =
        t < tokens ? x_words[static_cast<size_t>(t) * (stride_x / 2) + (chunk_lo + cl) * 64 + w] : 0u;
  }
  const float factor = centroid_factor(block_max_abs(local_max, red));  // its barrier also covers xs
  const __half2 factor2 = __float2half2_rn(factor);
#pragma unroll
  for (int k = 0; k < NB; ++k) {
    __half2 b = __hmul2(*reinterpret_cast<const __half2*>(&bfrag[k]), factor2);
    bfrag[k] = *reinterpret_cast<const uint32_t*>(&b);
  }
  // Build stores: lane (g, q) holds rows g (token g / 4) and g + 8 (token g / 4 + 2) of vector g % 4 of an m-tile
  // and centroids 2 q, 2 q + 1 of an n-tile; store i writes m-tile i ^ (q & 2) for m2v8 (codebook (w / 8) ^ (q & 1)),
  // (i + q) % 4 of a group of four for m1v4.
  const uint32_t vl = g & 3, pair = g >> 2;
  uint32_t store_at[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (M == 2) {
      const uint32_t c0 = 32 * (warp & 7) + 2 * q;
      store_at[i] = c0 * 256 + 8 * slot<M>(8 * (i ^ (q & 2)) + 2 * vl + ((warp >> 3) ^ (q & 1))) + 4 * pair;
    } else {
      const uint32_t mt = (i + q) & 3;
      const uint32_t c0 = 16 * warp + 2 * q;
      store_at[i] = c0 * 256 + 8 * (slot<M>(8 * mt) ^ slot<M>(vl)) + 4 * pair;  // m-tile 2 mt (+ 1: slot 16 on)
    }
  }
  // A fragments (activations): row g -> token g / 4, row g + 8 -> token g / 4 + 2; inputs 2 q, 2 q + 1 of vector
  // 4 mt + g % 4 (m1v4: lanes q >= 2 hold the zero inputs 4..7).
  const int a_word = static_cast<int>(pair) * PM_X_WORDS + static_cast<int>(vl) * (V / 2) + q;

  // Gather role: rows g + 8 h of each 16-row tile; step j reads register byte j of the lane's 8 code bytes, table
  // 8 (q ^ h) + (j ^ g). The PRMT's other operand holds two steps' table byte offsets (bytes 0 and 2), the Psumbook
  // buffer (byte 1) and a zero (byte 3), so the address is code << 8 | offset | buffer << 16 in one instruction.
  uint32_t table_at[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const uint32_t base = 8 * (q ^ h);
      table_at[h][jj] = 8 * slot<M>(base + ((2 * jj) ^ g)) | (8 * slot<M>(base + ((2 * jj + 1) ^ g))) << 16;
    }
  // The sums: one mma adds two codes (steps 2 i, 2 i + 1) of one row for four lanes. A row's 8-byte entry fills
  // A-rows g (tokens 0, 2) and g + 8 (tokens 1, 3) at once, straight from the load; B sends k-slot 2 q to column 0
  // and 2 q + 1 to column 2, so D[g][0], D[g + 8][0], D[g][2], D[g + 8][2] are tokens 0, 1, 2, 3.
  constexpr uint32_t ONE = 0x3c00u;
  const uint32_t sum_b = (g == 0 ? ONE : 0u) | (g == 2 ? ONE << 16 : 0u);

  float acc[R][2][2];  // rows g + 8 h of tile r, tokens 2 q and 2 q + 1 (lanes q < 2)
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[r][e >> 1][e & 1] = 0.f;


  for (int cl = 0; cl < nch; ++cl) {
    uint2 cw[R][2];
    float sv[R][2];
    fetch();
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) cw[r][h] = chunk_cw[r][h], sv[r][h] = __half2float(chunk_sv[r][h]);
    // One buffer: wait until the previous chunk's gathers are done. Two: the build writes the buffer whose last
    // readers (chunk cl - 2's gathers) finished before every warp passed the previous chunk's barrier.
    if (!DOUBLE && cl > 0) __syncthreads();
    uint8_t* pb = psum + (DOUBLE ? (cl & 1) * PM_PSUM_BYTES : 0);  // = table_at's buffer byte

    // Build.
    const uint32_t* xc = xs + cl * PM_TOKENS * PM_X_WORDS;
    uint32_t a[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const bool live = M == 2 || q < 2;
      a[mt][0] = live ? xc[a_word + mt * 4 * (V / 2)] : 0u;
      a[mt][1] = live ? xc[a_word + mt * 4 * (V / 2) + 2 * PM_X_WORDS] : 0u;
    }
#pragma unroll
    for (int k = 0; k < NB; ++k)
#pragma unroll
      for (int group = 0; group < MT / 4; ++group) {
        float d[4][4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int mt = M == 2 ? u : group + 2 * u;
#pragma unroll
          for (int e = 0; e < 4; ++e) d[u][e] = 0.f;
          mma_k8(d[u], a[mt][0], a[mt][1], bfrag[k]);
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          uint32_t w[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) w[u] = pack_half2(d[u][j], d[u][j + 2]);
          if constexpr (M == 2) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              const uint32_t lo = w[i], hi = w[i + 2];
              w[i] = (q & 2) ? hi : lo;
              w[i + 2] = (q & 2) ? lo : hi;
            }
          } else {
            rotate4(w, q);
          }
#pragma unroll
          for (int i = 0; i < 4; ++i)
            *reinterpret_cast<uint32_t*>(pb + store_at[i] + (8 * k + j) * 256 + group * 128) = w[i];
        }
      }
    __syncthreads();

    // Gathers and sums.
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tmp[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint2 e[2];
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            const int j = 2 * i + s;
            const uint32_t word = j < 4 ? cw[r][h].x : cw[r][h].y;
            // bytes: table offset, code, buffer, zero
            const uint32_t sel = (s ? 0x7506u : 0x7504u) | static_cast<uint32_t>((j & 3) << 4);
            e[s] = *reinterpret_cast<const uint2*>(psum + __byte_perm(word, table_at[h][i], sel));
          }
          mma_k16(tmp, e[0].x, e[0].y, e[1].x, e[1].y, sum_b, sum_b);
        }
        acc[r][h][0] = fmaf(sv[r][h], tmp[0], acc[r][h][0]);
        acc[r][h][1] = fmaf(sv[r][h], tmp[2], acc[r][h][1]);
      }
    if constexpr (DOUBLE) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) table_at[h][i] ^= 0x100u;
    }
  }

  const float unscale = 1.f / factor;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int n = tile_row0 + r * 16 + g + 8 * (e >> 1);
      const int t = 2 * q + (e & 1);
      if (q >= 2 || n >= n_rows || t >= tokens) continue;
      const float v = acc[r][e >> 1][e & 1] * unscale;
      if (partial != nullptr) {
        partial[(static_cast<size_t>(blockIdx.y) * tokens + t) * n_rows + n] = v;
      } else {
        out[static_cast<size_t>(t) * n_rows + n] = __float2half_rn(v + (bias != nullptr ? __half2float(bias[n]) : 0.f));
      }
    }
  trace.done(TRACE_PSUMBOOK_MMA);
}

template <int M, int V, int R>
int launch_psumbook_mma(const void* x, int tokens, int stride_x, const Segments& segs, const void* bias, void* out,
                        float* partial, int n_rows, int num_chunks, int chunks_per_group, int splits,
                        cudaStream_t stream) {
  constexpr int ROWS = PM_WARPS * 16 * R;
  const int per_split = (num_chunks + splits - 1) / splits;
  const int used_splits = (num_chunks + per_split - 1) / per_split;
  if (per_split > PM_MAX_CHUNKS || !segs.aligned(ROWS) || segs.code_xor != 15) return static_cast<int>(cudaErrorInvalidValue);
  constexpr int smem = psumbook_mma_smem(R);
  auto kernel = psumbook_mma_kernel<M, V, R>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  dim3 grid((n_rows + ROWS - 1) / ROWS, used_splits);
  err = launch_dependent(kernel, grid, dim3(PM_THREADS), smem, stream, static_cast<const __half*>(x), tokens, stride_x, segs,
                      static_cast<const __half*>(bias), static_cast<__half*>(out),
                      needs_reduce(used_splits, segs) ? partial : nullptr, n_rows, num_chunks, chunks_per_group,
                      per_split);
  if (err != cudaSuccess) return static_cast<int>(err);
  return needs_reduce(used_splits, segs) ? launch_split_reduce<__half>(partial, bias, out, tokens, n_rows, used_splits, segs, stream)
                                         : 0;
}

template <int M, int V>
int psumbook_mma_plan(int r, const void* x, int tokens, int stride_x, const Segments& segs, const void* bias, void* out,
                      float* partial, int n_rows, int num_chunks, int cpg, int splits, cudaStream_t stream) {
  if (r >= 4)
    return launch_psumbook_mma<M, V, 4>(x, tokens, stride_x, segs, bias, out, partial, n_rows, num_chunks, cpg, splits,
                                        stream);
  if (r == 2)
    return launch_psumbook_mma<M, V, 2>(x, tokens, stride_x, segs, bias, out, partial, n_rows, num_chunks, cpg, splits,
                                        stream);
  return launch_psumbook_mma<M, V, 1>(x, tokens, stride_x, segs, bias, out, partial, n_rows, num_chunks, cpg, splits,
                                      stream);
}

}  // namespace

extern "C" {
CODEGEMM_TRACE_SETTER(codegemm_trace_set_psumbook_mma)

// fp16 activations (dtype 0 only), 1-4 tokens, m2v8 / m1v4 with 8-bit codes, fp16 codebooks and scales in the tiled
// layout (segs.code_xor == 15), K a multiple of 128, scale groups multiples of 128 inputs (chunks_per_group chunks
// each; per-row scales: groups = 1, chunks_per_group = num_chunks), at most PM_MAX_CHUNKS (8) chunks per split.
// rows_per_warp16 picks 1, 2 or 4 16-row tiles per warp (256, 512 or 1024 rows per block). Same arguments as
// codegemm_codebook_mma. Returns a cudaError_t (cudaErrorInvalidValue for a call off those conditions), or -1 for a
// config or dtype that is not compiled in.
int codegemm_psumbook_mma(int dtype, int m, int v, int rows_per_warp16, int tokens, const void* x, int stride_x,
                          const Segments* segs, const void* bias, void* out, float* partial, int n_rows,
                          int num_chunks, int groups, int chunks_per_group, int splits, void* stream) {
  (void)groups;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype != 0 || tokens < 1 || tokens > PM_TOKENS) return -1;
  if (m == 2 && v == 8)
    return psumbook_mma_plan<2, 8>(rows_per_warp16, x, tokens, stride_x, *segs, bias, out, partial, n_rows, num_chunks,
                                   chunks_per_group, splits, s);
  if (m == 1 && v == 4)
    return psumbook_mma_plan<1, 4>(rows_per_warp16, x, tokens, stride_x, *segs, bias, out, partial, n_rows, num_chunks,
                                   chunks_per_group, splits, s);
  return -1;
}
}
