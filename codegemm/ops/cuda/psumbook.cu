// Psumbook GEMV/small-batch GEMM for CodeGEMM, 1-16 tokens, 8-bit codes, fp16 codebooks and scales.
//
// One thread block (512 threads, one or two lanes per row) owns 512 / LANES * RPT output rows and a
// contiguous range of K chunks (a split of K).
// A chunk is the 32 code bytes of each row that cover JT = 32 / M vectors (JT * V inputs, inside one
// scale group). Per chunk and token the block builds the Psumbook in shared memory, table-minor,
//     psum[c * 64 + b * 32 + q] = <codebooks[i, c, :], x[t, (chunk * JT + j) * V : ... + V]>   (fp32, q = j * M + i),
// so table q lives in bank q whatever the code c; b is one of two buffers (v12, see the main loop), and the
// 256-byte rows make an entry's byte offset `c << 8 | (b * 32 + q) * 4`, formed by one PRMT. Each lane holds its share of its rows' 32 code bytes in
// registers (16-byte streaming loads) and gathers one entry per code; at step s it reads table H ^ s, where
// H differs across the 32 lanes of a warp, so a warp's 32 gathers hit 32 distinct banks (v8; random codes
// used to cost ~3.5 shared-memory wavefronts per warp-wide gather). The lane's code bytes must be in that order
// (byte s <- byte s ^ H): the tiled layout stores them so (v13); other codes are permuted once per chunk in
// registers. Entries are summed in fp32 and scaled by the row's group
// scale; with two lanes per row, one shuffle at the end adds the halves.
// The m2v8 Psumbook is built on the tensor cores (v10): per codebook it is the product of the chunk's activations
// [16 vectors x 8] with the codebook's transpose [8 x 256], 64 mma.m16n8k8 per chunk (four per warp) instead of
// 65536 FMAs and an fp32 codebook in shared memory. Products are exact and sums fp32: with bf16 activations each
// fp16 centroid is split into two bf16 parts (hi + lo holds its 11 bits exactly), two mma per tile. m1v4 builds
// with fp32 FMAs.
// Splits write fp32 partials that codegemm_split_reduce sums in split order: bit-identical results.
// Built at first use by codegemm/ops/cuda/__init__.py (nvcc -> shared library, called through ctypes).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"

namespace {

constexpr int THREADS = 512;
constexpr int CENTROIDS = 256;
// The Psumbook's shared-memory rows: a code's 32 tables of buffer 0, then of buffer 1 (256 bytes, so the code
// is byte 1 of an entry's byte offset).
constexpr int PSUM_ROW = 64;
constexpr int PSUM_WORDS = CENTROIDS * PSUM_ROW;

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

// Whether the Psumbook is built on the tensor cores (m2v8: a chunk's 16 vectors are one m16 tile of 8 inputs).
template <int M, int V>
__host__ __device__ constexpr bool tensor_core_build() { return M == 2 && V == 8; }
// B-fragment words per centroid pair: fp16 centroids as they are; for bf16 activations, a bf16 hi and lo part.
template <typename XT>
__host__ __device__ constexpr int centroid_parts() { return std::is_same<XT, __half>::value ? 1 : 2; }

// d += A * B for one m16n8k8 tile, inputs in the activations' type, fp32 accumulation. A: a0 = row g, a1 = row
// g + 8, columns 2 * tq, 2 * tq + 1; B: rows 2 * tq, 2 * tq + 1, column g; d: rows g, g + 8 x columns 2 * tq, 2 * tq + 1.
template <typename XT>
__device__ __forceinline__ void mma_m16n8k8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b) {
  if constexpr (std::is_same<XT, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b));
  } else {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b));
  }
}

// Two fp16 centroid values as B-fragment words in XT: fp16 as is; bf16 as hi = bf16(c) and lo = bf16(c - hi).
template <typename XT>
__device__ __forceinline__ void centroid_words(uint32_t w, uint32_t (&out)[centroid_parts<XT>()]) {
  if constexpr (std::is_same<XT, __half>::value) {
    out[0] = w;
  } else {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    const __nv_bfloat162 hi = __float22bfloat162_rn(f);
    const float2 fh = __bfloat1622float2(hi);
    const __nv_bfloat162 lo = __float22bfloat162_rn(make_float2(f.x - fh.x, f.y - fh.y));
    out[0] = *reinterpret_cast<const uint32_t*>(&hi);
    out[1] = *reinterpret_cast<const uint32_t*>(&lo);
  }
}

template <int M, int V, int RPT, int MAXT, int LANES, typename XT>
__global__ void __launch_bounds__(THREADS, MAXT == 1 && RPT <= 4 ? 2 : 1) psumbook_kernel(
    const XT* __restrict__ x, int tokens, int stride_x, const __grid_constant__ Segments segs, const XT* __restrict__ bias,
    XT* __restrict__ out, float* __restrict__ partial, int n_rows, int num_vectors, int groups,
    int vectors_per_group, int chunks_per_split) {
  static_assert(THREADS == 2 * CENTROIDS && (M == 1 || M == 2), "16 warps build 16 centroids each");
  constexpr int JT = 32 / M;
  BlockTrace trace;
  allow_dependent_launch();  // the split-K reduce may launch now (common.cuh)
  wait_before_weights(segs, trace);
  constexpr int KT = JT * V;
  constexpr bool TC = tensor_core_build<M, V>();
  constexpr int PARTS = centroid_parts<XT>();
  extern __shared__ __align__(16) float smem[];
  // Codebook i starts at i * CB_STRIDE floats: the 4-float pad puts the builders' two broadcast reads of
  // centroid c (one per codebook) in different banks.
  constexpr int CB_STRIDE = CENTROIDS * V + 4;
  float* psum = smem;                              // [256][2][32]: buffer b's entry (c, q = j * M + i) at c * 64 + b * 32 + q
  float* cbs = psum + PSUM_WORDS;                  // [M][CB_STRIDE] fp32 codebooks (FMA build only)
  float* xs = cbs + (TC ? 0 : M * CB_STRIDE);      // [2][MAXT][KT]: fp32 (FMA build), the input dtype (tensor cores)
  using XS = typename std::conditional<TC, XT, float>::type;
  constexpr bool DOUBLE_PSUM = MAXT == 1;

  const int tid = threadIdx.x;
  // Row role: LANES lanes per row, each with 32 / LANES of its code bytes per chunk. With two, one
  // warp-wide load touches 16 rows' cache lines instead of 32 (the L1 wavefronts of code loads halve),
  // which pays for one token; with more tokens the Psumbook builds dominate and one lane per row wins.
  static_assert(LANES == 1 || LANES == 2, "one or two lanes per row");
  constexpr int PAIRS = THREADS / LANES;
  constexpr int WORDS = 8 / LANES;
  constexpr int CODES = 32 / LANES;
  const int half = LANES == 2 ? (tid & 1) : 0;
  const int pair = tid / LANES;
  const int row0 = blockIdx.x * PAIRS * RPT;
  const int num_chunks = num_vectors / JT;
  const int chunk_lo = blockIdx.y * chunks_per_split;
  const int chunk_hi = min(chunk_lo + chunks_per_split, num_chunks);
  // This block's segment (its rows never straddle two): its tables, with row 0 of the segment at its start.
  const int seg = segs.find(row0);
  const int seg_row0 = segs.start[seg];
  const uint8_t* __restrict__ codes = segs.codes[seg];
  const __half* __restrict__ codebooks = segs.codebooks[seg];
  const __half* __restrict__ scales = segs.scales[seg];
  const uint32_t code_row = segs.code_row[seg], code_chunk = segs.code_chunk[seg];
  const uint32_t scale_row = segs.scale_row[seg], scale_group = segs.scale_group[seg];
  // A chunk lies inside one scale group (the dispatcher checks); chunks_per_group of them share it.
  const int chunks_per_group = vectors_per_group / JT;

  // Psumbook builder role: lane q of warp w computes table q's entries for the centroids
  // c = w * 16 ... w * 16 + 15, so a warp's 32 stores per step fill 32 distinct banks.
  const int bq = tid & 31;
  const int bc0 = (tid >> 5) * (CENTROIDS / (THREADS / 32));
  const float* my_book = cbs + (bq % M) * CB_STRIDE;
  static_assert((M * CENTROIDS * V / 2) % THREADS == 0, "whole rounds of the codebook copy");
  if constexpr (!TC) {
#pragma unroll
    for (int e = tid; e < M * CENTROIDS * V / 2; e += THREADS) {  // unrolled: all loads in flight at once
      const int book = e / (CENTROIDS * V / 2);
      const float2 f = __half22float2(reinterpret_cast<const __half2*>(codebooks)[e]);
      *reinterpret_cast<float2*>(cbs + book * CB_STRIDE + 2 * (e % (CENTROIDS * V / 2))) = f;
    }
  }
  // Tensor-core build: warp w computes centroids 16 w .. 16 w + 15 (two 8-centroid n-tiles) of both codebooks
  // for all 16 vectors of the chunk. Its B fragments (centroid halves) are loaded once per block. The lane's four
  // results per (n-tile, centroid) belong to (vector g or g + 8) x (codebook 0 or 1); lane tq stores them permuted
  // by tq (result k ^ tq at store k), so every warp-wide store hits 32 distinct banks (bank = 2 * vector + codebook).
  const int g = (tid & 31) >> 2, tq = tid & 3;
  uint32_t bfrag[2][2][PARTS];
  uint32_t store_off[4];
  if constexpr (TC) {
    const uint32_t* book_words = reinterpret_cast<const uint32_t*>(codebooks);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 2; ++i)  // B column g holds codebook i ^ ((g >> 1) & 1): see the stores below
        centroid_words<XT>(load_table_word(book_words + ((i ^ ((g >> 1) & 1)) * CENTROIDS + (tid >> 5) * 16 + nt * 8 + g) *
                                                            (V / 2) + tq),
                           bfrag[nt][i]);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int r = k ^ tq;  // result r: vector g + 8 * (r >> 1), codebook r & 1
      store_off[k] = static_cast<uint32_t>(((tid >> 5) * 16 + 2 * tq) * PSUM_ROW + 2 * g + 16 * (r >> 1) + (r & 1));
    }
  }

  // Gather role: this lane's tables are H ^ s (s = 0 .. CODES - 1), distinct across the warp's lanes.
  const int perm = (tid / LANES) % CODES;
  const uint32_t table_base = static_cast<uint32_t>(half * CODES + perm);
  // The permutation left to apply in registers: the tiled layout stores byte s of row n's chunk at
  // s ^ (n & code_xor) (common.cuh), which is H's for two lanes per row (n & 15 = perm, nothing left) and all but
  // its top bit for one lane per row; row-major codes need all of it.
  const int fix = perm ^ (pair & segs.code_xor);
  // byte_perm selector that maps byte b of a word to byte b ^ (fix & 3)
  const uint32_t byte_sel = 0x3210u ^ (0x1111u * static_cast<uint32_t>(fix & 3));

  float acc[RPT][MAXT];
#pragma unroll
  for (int r = 0; r < RPT; ++r)
#pragma unroll
    for (int t = 0; t < MAXT; ++t) acc[r][t] = 0.f;

  // This lane's rows as byte offsets into the segment's code and scale tables, clamped to the last row: a tail
  // row reads a real row's codes and scale (finite sums that are never written), so the loads need no branches.
  uint32_t code_off[RPT], scale_off[RPT];
#pragma unroll
  for (int r = 0; r < RPT; ++r) {
    const uint32_t row = static_cast<uint32_t>(min(row0 + r * PAIRS + pair, n_rows - 1) - seg_row0);
    code_off[r] = row * code_row + half * 16;
    scale_off[r] = row * scale_row * 2;
  }

  // The chunk's codes and scales are loaded before its Psumbook is built, so their latency hides behind the
  // build; the next chunk's activations are prefetched. (v3-v5 also prefetched the next chunk's codes: worth
  // 1.5%, and the registers it held made the one-token plan spill.)
  constexpr int XPT = (MAXT * KT + THREADS - 1) / THREADS;
  // The chunk's code and scale tables advance by pointer steps. Scales are loaded one chunk ahead (v13) as raw
  // fp16 bits and converted only after the chunk's gathers (v20), so their DRAM latency hides behind a chunk.
  uint32_t word[RPT][WORDS];
  uint32_t scale[RPT], next_scale[RPT];  // fp16 bits (load_table_half_bits)
  XT xr[XPT];
  const char* chunk_codes = reinterpret_cast<const char*>(codes);
  const char* group_scales = reinterpret_cast<const char*>(scales);
  auto fetch_codes = [&]() {
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const uint4* p = reinterpret_cast<const uint4*>(chunk_codes + code_off[r]);
#pragma unroll
      for (int u = 0; u < WORDS / 4; ++u) {
        const uint4 a = load_stream(p + u);
        word[r][4 * u] = a.x; word[r][4 * u + 1] = a.y; word[r][4 * u + 2] = a.z; word[r][4 * u + 3] = a.w;
      }
    }
  };
  auto fetch_scales = [&]() {
#pragma unroll
    for (int r = 0; r < RPT; ++r)
      next_scale[r] = load_table_half_bits(reinterpret_cast<const __half*>(group_scales + scale_off[r]));
  };
  auto fetch_x = [&](int chunk) {
#pragma unroll
    for (int u = 0; u < XPT; ++u) {
      const int i = tid + u * THREADS;
      const int t = i / KT, k = i - t * KT;
      if (t < tokens) xr[u] = x[static_cast<size_t>(t) * stride_x + static_cast<size_t>(chunk) * KT + k];
    }
  };
  // The prefetched activations into buffer b of xs (fp32 for the FMA build).
  auto store_x = [&](int b) {
#pragma unroll
    for (int u = 0; u < XPT; ++u) {
      const int i = tid + u * THREADS;
      if (i < tokens * KT) reinterpret_cast<XS*>(xs)[b * MAXT * KT + i] = static_cast<XS>(xr[u]);
    }
  };
  // Byte s of a lane's codes <- byte s ^ fix: the code of table H ^ s then sits where gather step s reads it.
  // Applied after the Psumbook build, by when the loads have landed.
  auto permute = [&](uint32_t (&w)[RPT][WORDS]) {
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
#pragma unroll
      for (int bit = 1; bit < WORDS; bit <<= 1) {
        const bool swap = ((fix >> 2) & bit) != 0;
#pragma unroll
        for (int k = 0; k < WORDS; ++k) {
          if (k & bit) continue;
          const uint32_t lo = w[r][k], hi = w[r][k | bit];
          w[r][k] = swap ? hi : lo;
          w[r][k | bit] = swap ? lo : hi;
        }
      }
#pragma unroll
      for (int k = 0; k < WORDS; ++k) w[r][k] = __byte_perm(w[r][k], 0u, byte_sel);
    }
  };

  // Double buffers (v12): for one token the Psumbook of chunk u goes to psum buffer u % 2, and a chunk's
  // activations to xs buffer chunk % 2, so one barrier per chunk suffices. Building chunk u overwrites what chunk
  // u - 2 gathered, and every thread passed chunk u - 1's barrier after its own chunk u - 2 gathers. The next
  // chunk's activations go to the other xs buffer at the start of a chunk, when the builds that read it last
  // (the previous chunk's) are behind a barrier, and the chunk's last barrier publishes them.
  int in_group = chunk_lo % chunks_per_group;
  chunk_codes += static_cast<size_t>(chunk_lo) * code_chunk;
  group_scales += static_cast<size_t>(chunk_lo / chunks_per_group) * scale_group * 2;
  uint32_t buf = 0;
  if (chunk_lo < chunk_hi) fetch_scales();
  wait_before_activations(segs, trace);
  if (chunk_lo < chunk_hi) {
    fetch_x(chunk_lo);
    store_x(0);
    if (chunk_lo + 1 < chunk_hi) fetch_x(chunk_lo + 1);
  }
  __syncthreads();
  for (int chunk = chunk_lo; chunk < chunk_hi; ++chunk) {
    const int xb = (chunk - chunk_lo) & 1;
    fetch_codes();
#pragma unroll
    for (int r = 0; r < RPT; ++r) scale[r] = next_scale[r];
    chunk_codes += code_chunk;
    if (++in_group == chunks_per_group) { in_group = 0; group_scales += scale_group * 2; }
    if (chunk + 1 < chunk_hi) fetch_scales();
    if (chunk + 1 < chunk_hi) {  // the previous chunk's builds, the last readers of xs[xb ^ 1], are done
      store_x(xb ^ 1);
      if (chunk + 2 < chunk_hi) fetch_x(chunk + 2);
    }
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t >= tokens) break;
      // One token: the Psumbook is double-buffered, one barrier per chunk. More tokens: one buffer and a
      // barrier before each build (a per-step buffer index made those plans spill hundreds of bytes).
      if (!DOUBLE_PSUM && (t > 0 || chunk > chunk_lo)) __syncthreads();  // the previous step's gathers are done
      float* pbuf = psum + buf * 32;
      if constexpr (TC) {
        // A = the chunk's activations [vector j][dim] (row j = g: words g * 4 + tq), B = a codebook's transpose.
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(reinterpret_cast<const XT*>(xs) + (xb * MAXT + t) * KT);
        const uint32_t a0 = xw[g * 4 + tq], a1 = xw[(g + 8) * 4 + tq];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          float d[2][4] = {};
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int part = 0; part < PARTS; ++part) mma_m16n8k8<XT>(d[i], a0, a1, bfrag[nt][i][part]);
#pragma unroll
          for (int e = 0; e < 2; ++e) {  // centroid 2 * tq + e of the n-tile
            // Store k writes result k ^ tq, so a warp's 32 stores hit 32 banks. The codebook half of that XOR is
            // free: lanes with odd tq receive the columns whose B fragments hold the codebooks swapped, so their
            // d[0] is codebook 1. Only the vector half takes selects (v20: 16 per chunk instead of 32).
            float v0 = d[0][e], v1 = d[1][e], v2 = d[0][2 + e], v3 = d[1][2 + e];  // results r = (0 .. 3) ^ (tq & 1)
            if (tq & 2) { float w = v0; v0 = v2; v2 = w; w = v1; v1 = v3; v3 = w; }
            float* out_e = pbuf + (nt * 8 + e) * PSUM_ROW;
            out_e[store_off[0]] = v0;
            out_e[store_off[1]] = v1;
            out_e[store_off[2]] = v2;
            out_e[store_off[3]] = v3;
          }
        }
      } else {
        float xj[V];  // this builder's v-slice of the activations (vector j = q / M)
        const float4* xv = reinterpret_cast<const float4*>(xs + (xb * MAXT + t) * KT + (bq / M) * V);
#pragma unroll
        for (int h = 0; h < V / 4; ++h) {
          const float4 xx = xv[h];
          xj[4 * h] = xx.x; xj[4 * h + 1] = xx.y; xj[4 * h + 2] = xx.z; xj[4 * h + 3] = xx.w;
        }
#pragma unroll 2
        for (int k = 0; k < CENTROIDS / (THREADS / 32); ++k) {
          const int c = bc0 + k;
          const float4* cv = reinterpret_cast<const float4*>(my_book + c * V);
          float s = 0.f;
#pragma unroll
          for (int h = 0; h < V / 4; ++h) {
            const float4 cc = cv[h];
            s = fmaf(cc.x, xj[4 * h], s);
            s = fmaf(cc.y, xj[4 * h + 1], s);
            s = fmaf(cc.z, xj[4 * h + 2], s);
            s = fmaf(cc.w, xj[4 * h + 3], s);
          }
          pbuf[c * PSUM_ROW + bq] = s;
        }
      }
      __syncthreads();
      if (t == 0 && fix != 0) permute(word);
      const char* pb = reinterpret_cast<const char*>(psum);
      // An opaque copy: the table offsets below are then formed where they are used instead of being hoisted
      // out of the chunk loop into registers (which spilled at 64 registers per thread).
      uint32_t tbase;
      asm volatile("mov.b32 %0, %1;" : "=r"(tbase) : "r"(table_base * 4u | buf << 7));
      float sum[RPT];
#pragma unroll
      for (int r = 0; r < RPT; ++r) sum[r] = 0.f;
#pragma unroll
      for (int q = 0; q < CODES; ++q) {
        // Byte 0: the table's byte offset in the row (bank H ^ q) and the buffer; byte 1: the code, which
        // selects the 256-byte row. One PRMT forms the whole address.
        const uint32_t toff = tbase ^ static_cast<uint32_t>(4 * q);
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
          const uint32_t at = __byte_perm(word[r][q >> 2], toff, 0x5504u | static_cast<uint32_t>((q & 3) << 4));
          sum[r] += *reinterpret_cast<const float*>(pb + at);
        }
      }
#pragma unroll
      for (int r = 0; r < RPT; ++r) acc[r][t] = fmaf(sum[r], half_bits_to_float(scale[r]), acc[r][t]);
      if constexpr (DOUBLE_PSUM) buf ^= 1u;
    }
  }

#pragma unroll
  for (int r = 0; r < RPT; ++r) {
    const int n = row0 + r * PAIRS + pair;
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t >= tokens) break;
      float total = acc[r][t];
      if constexpr (LANES == 2) total += __shfl_xor_sync(0xffffffffu, total, 1);  // the row's two halves
      if (half != 0 || n >= n_rows) continue;
      if (partial != nullptr) {
        partial[(static_cast<size_t>(blockIdx.y) * tokens + t) * n_rows + n] = total;
      } else {
        const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
        out[static_cast<size_t>(t) * n_rows + n] = from_float<XT>(total + b);
      }
    }
  }
  trace.done(TRACE_PSUMBOOK);
}

template <int M, int V, int RPT, int MAXT, int LANES, typename XT>
int launch_psumbook(const void* x, int tokens, int stride_x, const Segments& segs, const void* bias, void* out, float* partial, int n_rows, int num_vectors,
                    int groups, int vectors_per_group, int splits, cudaStream_t stream) {
  constexpr int JT = 32 / M;
  constexpr bool TC = tensor_core_build<M, V>();
  const int smem = (PSUM_WORDS + (TC ? 0 : M * (CENTROIDS * V + 4))) * 4 +
                   2 * MAXT * JT * V * (TC ? static_cast<int>(sizeof(XT)) : 4);
  if (!segs.aligned(THREADS / LANES * RPT)) return static_cast<int>(cudaErrorInvalidValue);
  auto kernel = psumbook_kernel<M, V, RPT, MAXT, LANES, XT>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int num_chunks = num_vectors / JT;
  const int per_split = (num_chunks + splits - 1) / splits;
  const int used_splits = (num_chunks + per_split - 1) / per_split;
  dim3 grid((n_rows + THREADS / LANES * RPT - 1) / (THREADS / LANES * RPT), used_splits);
  err = launch_dependent(kernel, grid, dim3(THREADS), smem, stream,
      static_cast<const XT*>(x), tokens, stride_x, segs, static_cast<const XT*>(bias), static_cast<XT*>(out),
      needs_reduce(used_splits, segs) ? partial : nullptr, n_rows, num_vectors, groups, vectors_per_group, per_split);
  if (err != cudaSuccess) return static_cast<int>(err);
  return needs_reduce(used_splits, segs) ? launch_split_reduce<XT>(partial, bias, out, tokens, n_rows, used_splits, segs, stream)
                                         : 0;
}

// Instantiated plans: one token: two lanes per row, RPT 2, 4 or 8 rows per lane pair; 2-16 tokens: one
// lane per row, RPT 2 rows per thread (more accumulators would spill).
template <int M, int V, typename XT>
int dispatch_plan(int rpt, int tokens, const void* x, int stride_x, const Segments& segs, const void* bias, void* out, float* partial, int n_rows, int num_vectors,
                  int groups, int vpg, int splits, cudaStream_t stream) {
#define CODEGEMM_P(RR, MT, LL)                                                                                   \
  return launch_psumbook<M, V, RR, MT, LL, XT>(x, tokens, stride_x, segs, bias, out, partial, n_rows, num_vectors, \
                                               groups, vpg, splits, stream)
  if (tokens == 1 && rpt == 8) { CODEGEMM_P(8, 1, 2); }
  if (tokens == 1 && rpt == 2) { CODEGEMM_P(2, 1, 2); }
  if (tokens == 1) { CODEGEMM_P(4, 1, 2); }
  if (tokens <= 4) { CODEGEMM_P(2, 4, 1); }
  if (tokens <= 8) { CODEGEMM_P(2, 8, 1); }
  CODEGEMM_P(2, 16, 1);
#undef CODEGEMM_P
}

template <typename XT>
int dispatch_config(int m, int v, int rpt, int tokens, const void* x, int stride_x, const Segments& segs,
                    const void* bias, void* out, float* partial,
                    int n_rows, int num_vectors, int groups, int vpg, int splits, cudaStream_t stream) {
  if (tokens < 1 || tokens > 16) return -1;
  if (m == 2 && v == 8)
    return dispatch_plan<2, 8, XT>(rpt, tokens, x, stride_x, segs, bias, out, partial, n_rows,
                                   num_vectors, groups, vpg, splits, stream);
  if (m == 1 && v == 4)
    return dispatch_plan<1, 4, XT>(rpt, tokens, x, stride_x, segs, bias, out, partial, n_rows,
                                   num_vectors, groups, vpg, splits, stream);
  return -1;
}

}  // namespace

extern "C" {

// Configs compiled in: (m, v) in {(2, 8), (1, 4)}, 1-16 tokens; rpt picks 2, 4 or 8 rows per lane pair for
// one token (ignored otherwise). segs: the layer (one segment) or sibling layers stacked along N (common.cuh),
// n_rows their total. Returns a cudaError_t (cudaErrorInvalidValue for segments off block boundaries), or -1
// for a config that is not compiled in. dtype: 0 fp16, 1 bf16 (activations, bias, output).
int codegemm_psumbook(int dtype, int m, int v, int rpt, int tokens, const void* x, int stride_x, const Segments* segs,
                      const void* bias, void* out, float* partial, int n_rows, int num_vectors, int groups,
                      int vectors_per_group, int splits, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return dispatch_config<__half>(m, v, rpt, tokens, x, stride_x, *segs, bias, out, partial, n_rows, num_vectors,
                                   groups, vectors_per_group, splits, s);
  if (dtype == 1)
    return dispatch_config<__nv_bfloat16>(m, v, rpt, tokens, x, stride_x, *segs, bias, out, partial, n_rows,
                                          num_vectors, groups, vectors_per_group, splits, s);
  return -1;
}

CODEGEMM_TRACE_SETTER(codegemm_trace_set_psumbook)
const char* codegemm_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
}
