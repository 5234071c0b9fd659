// Codebook tensor-core kernel for 1-16 tokens: dequantize in registers from a bank-conflict-free replicated
// codebook, multiply with mma.sync (m16n8k16, fp32 accumulation). 8-bit codes, m2v8 or m1v4, fp16
// codebooks and scales, fp16/bf16 activations, scale groups that are multiples of 128 inputs (or per row).
//
// Why: the Psumbook kernel (psumbook.cu) gathers one 4-byte entry per code and token from a table that
// differs per token, so its shared-memory gathers (random banks, ~3.5 wavefronts per warp) grow linearly
// with the tokens. Here each code gathers one centroid (16 bytes for v = 8, 8 bytes for v = 4) once for all
// tokens, and the shared-memory codebook holds one copy per lane of a memory phase (8 copies of 16-byte
// centroids for the 8 lanes of a quarter warp, 16 copies of 8-byte centroids for a half warp), so every
// gather is conflict-free: 4 wavefronts per warp, whatever the codes. The tokens ride in the mma's N = 8
// columns (two n-tiles for 9-16 tokens), so 1-8 tokens cost the same.
//
// Layout of work. A chunk is the 32 code bytes of a row that cover 128 inputs (16 vectors of m2v8, 32 of
// m1v4; inside one scale group). Warp tile: 16 * R rows. Lane (g = lane / 4, q = lane % 4) owns rows
// g and g + 8 of each 16-row m-tile and the inputs [32 q, 32 q + 32) of every chunk, i.e. code bytes
// [8 q, 8 q + 8) of the chunk: one 8-byte load per row. Inside an mma the reduction order over k is free, so
// lane q's four k-slots {2q, 2q+1, 2q+8, 2q+9} of mma step s carry its inputs 32 q + 4 s + {0, 1, 2, 3},
// and the B fragment (activations of token g) is loaded in the same order from a shared-memory copy of x.
// Per chunk the 8 mma steps accumulate into a temporary that is scaled by the row's group scale in fp32.
// Splits of K write fp32 partials summed in split order (split_reduce in psumbook.cu's style): deterministic.
// With two n-tiles (9-16 tokens) one block has the SM, so a split may stage far more chunks of x than two blocks
// could (codegemm.ops.cuda.mma_x_budget): fewer partials to write and reduce. Its default is 8 warps of two m-tiles
// (256 threads, up to 255 registers), so each B fragment loaded from shared memory feeds both tiles.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

constexpr int MMA_THREADS = 512;  // 16 warps share one codebook copy: 2 blocks (32 warps) per SM up to 8 tokens
constexpr int CHUNK_INPUTS = 128;

template <typename XT> struct MmaTraits;
template <> struct MmaTraits<__half> {
  // Sum of two fp16 centroid pairs, rounded once to fp16 (the weight an fp16 model would hold).
  static __device__ __forceinline__ uint32_t add(uint32_t a, uint32_t b) {
    __half2 r = __hadd2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t one(uint32_t a) { return a; }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct MmaTraits<__nv_bfloat16> {
  // fp16 centroids summed in fp32, rounded once to bf16 (the weight a bf16 model would hold).
  static __device__ __forceinline__ uint32_t add(uint32_t a, uint32_t b) {
    const float2 fa = __half22float2(*reinterpret_cast<__half2*>(&a));
    const float2 fb = __half22float2(*reinterpret_cast<__half2*>(&b));
    __nv_bfloat162 r = __floats2bfloat162_rn(fa.x + fb.x, fa.y + fb.y);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t one(uint32_t a) {
    const float2 fa = __half22float2(*reinterpret_cast<__half2*>(&a));
    __nv_bfloat162 r = __floats2bfloat162_rn(fa.x, fa.y);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint2 load_codes(const uint8_t* p) {
  uint2 r;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}

// Shared memory: the replicated codebook, then x for the block's chunks as [chunk][token][16 slots of 16 B],
// slot (4 u + q + 4 t) % 16 holding inputs 32 q + 8 u .. + 8 (the rotation by token keeps the two tokens of a
// quarter warp on different banks).
template <int M, int V>
__host__ __device__ constexpr int codebook_bytes() { return M * 256 * codebook_copies<V>() * (V * 2); }

template <int M, int V, int R, int NT, typename XT, int THREADS>
__global__ void __launch_bounds__(THREADS, R == 1 && NT == 1 ? 2 : 1) codebook_mma_kernel(
    const XT* __restrict__ x, int tokens, int stride_x, const Segments segs, const XT* __restrict__ bias,
    XT* __restrict__ out, float* __restrict__ partial, int n_rows, int num_chunks, int groups,
    int chunks_per_group, int chunks_per_split) {
  static_assert((M == 2 && V == 8) || (M == 1 && V == 4), "m2v8 or m1v4");
  using Tr = MmaTraits<XT>;
  // Two n-tiles (9-16 tokens): x holds all 16 token rows (zeros past the tokens), so the B fragments load
  // without a branch, and the chunk loop is unrolled by three (below).
  constexpr bool PADDED = NT == 2;
  const int x_rows = PADDED ? 16 : tokens;
  BlockTrace trace;
  allow_dependent_launch();  // the split-K reduce may launch now (common.cuh)
  // The first codebook is replicated before waiting for the kernel ahead (common.cuh), except with two blocks per SM:
  // at their 64 registers that prologue spilled 84 bytes instead of 12 and cost 1-2% at 5-8 tokens.
  const bool early_codebook = !(R == 1 && NT == 1) && segs.weights_settled;
  if (!early_codebook) {
    wait_for_primary_grid();
    trace.waited();
  }
  constexpr int COPIES = codebook_copies<V>();
  constexpr int CB_BYTES = codebook_bytes<M, V>();
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* cbs = smem;
  uint4* xs = reinterpret_cast<uint4*>(smem + CB_BYTES);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;

  // This lane's base in the replicated codebook (the same for every segment).
  const uint8_t* cb_lane = cbs + (lane % COPIES) * V * 2;

  // Persistent blocks: a block walks a contiguous range of work items (row block, split of K), reloading x
  // only when the split changes and the replicated codebook only when the segment (sibling layer) changes:
  // once per block for a single layer.
  constexpr int WARPS = THREADS / 32;
  const int rows_per_block = WARPS * 16 * R;
  const int row_blocks = (n_rows + rows_per_block - 1) / rows_per_block;
  const int splits = (num_chunks + chunks_per_split - 1) / chunks_per_split;
  const int items = row_blocks * splits;
  // Even shares (they differ by at most one item); consecutive items share a split.
  const int item_lo = static_cast<int>(static_cast<long long>(items) * blockIdx.x / gridDim.x);
  const int item_hi = static_cast<int>(static_cast<long long>(items) * (blockIdx.x + 1) / gridDim.x);
  int loaded_split = -1, loaded_seg = -1;
  const uint8_t* __restrict__ codes = nullptr;
  const __half* __restrict__ scales = nullptr;
  int seg_row0 = 0;
  size_t code_row = 0, code_chunk = 0, scale_row = 0, scale_group = 0;
  int replicated_seg = -1;
  if (early_codebook) {
    if (item_lo < item_hi) {
      replicated_seg = segs.find((item_lo % row_blocks) * rows_per_block);
      replicate_codebook<M, V, THREADS>(cbs, Segments::pick(segs.codebooks, replicated_seg));
    }
    wait_for_primary_grid();
    trace.waited();
  }
  for (int item = item_lo; item < item_hi; ++item) {
  const int split = item / row_blocks;
  const int chunk_lo = split * chunks_per_split;
  const int chunk_hi = min(chunk_lo + chunks_per_split, num_chunks);
  const int nch = chunk_hi - chunk_lo;
  if (split != loaded_split) {
    // x of the split's chunks: the tokens' rows (padded: 16 rows, zeros past the tokens; otherwise the absent
    // token columns read as zeros from registers).
    __syncthreads();
    for (int e = tid; e < nch * x_rows * 16; e += THREADS) {
      const int slot = e & 15, t = (e >> 4) % x_rows, cl = (e >> 4) / x_rows;
      const int logical = (slot - 4 * t) & 15;  // invert the per-token rotation
      const int u = logical >> 2, qq = logical & 3;
      xs[(cl * x_rows + t) * 16 + slot] =
          t < tokens ? *reinterpret_cast<const uint4*>(x + static_cast<size_t>(t) * stride_x +
                                                       static_cast<size_t>(chunk_lo + cl) * CHUNK_INPUTS + 32 * qq + 8 * u)
                     : make_uint4(0u, 0u, 0u, 0u);
    }
    __syncthreads();
    loaded_split = split;
  }
  const int block_row0 = (item % row_blocks) * rows_per_block;
  const int seg = segs.find(block_row0);
  if (seg != loaded_seg) {
    if (seg != replicated_seg) {
      if (loaded_seg >= 0) __syncthreads();  // the previous segment's gathers are done
      replicate_codebook<M, V, THREADS>(cbs, Segments::pick(segs.codebooks, seg));
      replicated_seg = seg;
    }
    codes = Segments::pick(segs.codes, seg);
    scales = Segments::pick(segs.scales, seg);
    seg_row0 = Segments::pick(segs.start, seg);
    code_row = Segments::pick(segs.code_row, seg);
    code_chunk = Segments::pick(segs.code_chunk, seg);
    scale_row = Segments::pick(segs.scale_row, seg);
    scale_group = Segments::pick(segs.scale_group, seg);
    loaded_seg = seg;
  }
  const int row_base = block_row0 + warp * 16 * R;

  float acc[R][NT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][nt][e] = 0.f;

  // This lane's rows g and g + 8 of each m-tile, relative to the segment and clamped to the layer's last row
  // (rows past it are computed from a real row's codes and never stored), as offsets into the code and scale
  // tables: computed once per work item, so the per-chunk loads need no branches and no 64-bit multiplies.
  // Tiled codes are swizzled (byte s of row n at s ^ (n & code_xor), n & 15 = g + 8 h here): the lane's 8 bytes
  // are then the 8-byte unit q ^ h (bit 3 of the swizzle), with byte k at k ^ (g & code_xor & 7), which two
  // PRMTs with these selectors put back in order where the codes are used.
  const uint32_t swz = static_cast<uint32_t>(g & segs.code_xor & 7);
  const uint32_t unswizzle_lo = 0x3210u ^ (0x1111u * swz), unswizzle_hi = 0x7654u ^ (0x1111u * swz);
  uint32_t code_off[R][2], scale_off[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t row = static_cast<uint32_t>(min(row_base + r * 16 + g + 8 * h, n_rows - 1) - seg_row0);
      const int unit = q ^ (((g + 8 * h) & segs.code_xor) >> 3);
      code_off[r][h] = row * static_cast<uint32_t>(code_row) + 8 * unit;
      scale_off[r][h] = row * static_cast<uint32_t>(scale_row);
    }
  // Codes of rows g and g + 8 of each m-tile for one chunk (8 bytes each), fetched two chunks ahead (padded:
  // through per-row pointers that step one chunk per fetch, fewer address instructions for a few registers).
  uint2 cw[R][2], next_cw[R][2], next2_cw[R][2];
  const uint8_t* code_ptr[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int h = 0; h < 2; ++h) code_ptr[r][h] = codes + static_cast<size_t>(chunk_lo) * code_chunk + code_off[r][h];
  auto fetch = [&](int chunk, uint2 (&w)[R][2]) {
    if constexpr (PADDED) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) w[r][h] = load_codes(code_ptr[r][h]), code_ptr[r][h] += code_chunk;
    } else {
      const uint8_t* chunk_codes = codes + static_cast<size_t>(chunk) * code_chunk;
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) w[r][h] = load_codes(chunk_codes + code_off[r][h]);
    }
  };
  // Group scales of rows g and g + 8 for four consecutive chunks: lane q loads chunk (base + q)'s, and the
  // chunk's owner lane is read with a shuffle (a quarter of the scale loads). A chunk past the split reads its
  // split's last chunk's group (never used). They stay raw fp16 bits until that shuffle: converted at the load,
  // they stalled every fourth chunk on a DRAM round trip (12% of the 16-token kernel's stall samples, v20).
  uint32_t sv[R][2], next_sv[R][2];
  auto fetch_scales = [&](int chunk, uint32_t (&sv)[R][2]) {
    const int c = min(chunk + q, chunk_hi - 1);
    const __half* group_scales = scales + static_cast<size_t>(c / chunks_per_group) * scale_group;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) sv[r][h] = load_table_half_bits(group_scales + scale_off[r][h]);
  };
  if (nch > 0) fetch(chunk_lo, cw);
  if (nch > 1) fetch(chunk_lo + 1, next_cw);
  if (nch > 0) fetch_scales(chunk_lo, next_sv);

  // This lane's B-fragment slot for each u (the per-token rotation; token g + 8 rotates like g).
  int x_slot[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) x_slot[u] = g * 16 + ((4 * u + q + 4 * g) & 15);
  // One chunk: cw holds its codes; the codes of chunk cl + 2 are fetched into ahead2.
  auto step = [&](int cl, uint2 (&cw)[R][2], uint2 (&ahead2)[R][2]) {
    const int chunk = chunk_lo + cl;
    if ((cl & 3) == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) sv[r][0] = next_sv[r][0], sv[r][1] = next_sv[r][1];
      if (cl + 4 < nch) fetch_scales(chunk + 4, next_sv);
    }
    if (cl + 2 < nch) fetch(chunk + 2, ahead2);
    const uint4* xc = xs + cl * x_rows * 16;
    float tmp[R][NT][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) tmp[r][nt][e] = 0.f;

#pragma unroll
    for (int u = 0; u < 4; ++u) {
      // B fragments: token g (+ 8 per n-tile), inputs 32 q + 8 u .. + 8 of this chunk.
      uint4 xb[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int t = g + 8 * nt;
        if constexpr (PADDED)
          xb[nt] = xc[x_slot[u] + 128 * nt];
        else
          xb[nt] = t < tokens ? xc[t * 16 + ((4 * u + q + 4 * t) & 15)] : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if constexpr (V == 8) {
          // Vector 4 q + u of rows g and g + 8: code bytes (2 u, 2 u + 1) of the lane's 8 bytes.
          uint32_t w8[2][4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t word = __byte_perm(cw[r][h].x, cw[r][h].y, u < 2 ? unswizzle_lo : unswizzle_hi);
            const uint32_t c0 = (word >> (16 * (u & 1))) & 255u, c1 = (word >> (16 * (u & 1) + 8)) & 255u;
            const uint4 a = *reinterpret_cast<const uint4*>(cb_lane + c0 * (COPIES * 16));
            const uint4 b = *reinterpret_cast<const uint4*>(cb_lane + 256 * COPIES * 16 + c1 * (COPIES * 16));
            w8[h][0] = Tr::add(a.x, b.x);
            w8[h][1] = Tr::add(a.y, b.y);
            w8[h][2] = Tr::add(a.z, b.z);
            w8[h][3] = Tr::add(a.w, b.w);
          }
          const uint32_t a_lo[4] = {w8[0][0], w8[1][0], w8[0][1], w8[1][1]};
          const uint32_t a_hi[4] = {w8[0][2], w8[1][2], w8[0][3], w8[1][3]};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            Tr::mma(tmp[r][nt], a_lo, xb[nt].x, xb[nt].y);
            Tr::mma(tmp[r][nt], a_hi, xb[nt].z, xb[nt].w);
          }
        } else {
          // Vectors 8 q + 2 u and 8 q + 2 u + 1: code bytes 2 u and 2 u + 1.
          uint32_t w4[2][2][2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t word = __byte_perm(cw[r][h].x, cw[r][h].y, u < 2 ? unswizzle_lo : unswizzle_hi);
#pragma unroll
            for (int s = 0; s < 2; ++s) {
              const uint32_t c = (word >> (16 * (u & 1) + 8 * s)) & 255u;
              const uint2 a = *reinterpret_cast<const uint2*>(cb_lane + c * (COPIES * 8));
              w4[s][h][0] = Tr::one(a.x);
              w4[s][h][1] = Tr::one(a.y);
            }
          }
          const uint32_t a0[4] = {w4[0][0][0], w4[0][1][0], w4[0][0][1], w4[0][1][1]};
          const uint32_t a1[4] = {w4[1][0][0], w4[1][1][0], w4[1][0][1], w4[1][1][1]};
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            Tr::mma(tmp[r][nt], a0, xb[nt].x, xb[nt].y);
            Tr::mma(tmp[r][nt], a1, xb[nt].z, xb[nt].w);
          }
        }
      }
    }
    const int owner = (lane & ~3) | (cl & 3);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t s2 = __shfl_sync(0xffffffffu, __byte_perm(sv[r][0], sv[r][1], 0x5410u), owner);
      const float s_lo = half_bits_to_float(s2), s_hi = half_bits_to_float(s2 >> 16);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        acc[r][nt][0] = fmaf(s_lo, tmp[r][nt][0], acc[r][nt][0]);
        acc[r][nt][1] = fmaf(s_lo, tmp[r][nt][1], acc[r][nt][1]);
        acc[r][nt][2] = fmaf(s_hi, tmp[r][nt][2], acc[r][nt][2]);
        acc[r][nt][3] = fmaf(s_hi, tmp[r][nt][3], acc[r][nt][3]);
      }
      if constexpr (!PADDED) {
#pragma unroll
        for (int h = 0; h < 2; ++h) cw[r][h] = next_cw[r][h], next_cw[r][h] = ahead2[r][h];
      }
    }
  };
  if constexpr (PADDED) {
    // Unrolled by three so the two-ahead ring of code buffers needs no register moves: chunk cl reads cl % 3.
    int cl = 0;
    for (; cl + 3 <= nch; cl += 3) {
      step(cl, cw, next2_cw);
      step(cl + 1, next_cw, cw);
      step(cl + 2, next2_cw, next_cw);
    }
    if (cl < nch) step(cl, cw, next2_cw);
    if (cl + 1 < nch) step(cl + 1, next_cw, cw);
  } else {
    for (int cl = 0; cl < nch; ++cl) step(cl, cw, next2_cw);
  }

  // Accumulator e of n-tile nt: row g + 8 (e / 2), token 8 nt + 2 q + e % 2.
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = row_base + r * 16 + g + 8 * (e >> 1);
        const int t = 8 * nt + 2 * q + (e & 1);
        if (n >= n_rows || t >= tokens) continue;
        if (partial != nullptr) {
          partial[(static_cast<size_t>(split) * tokens + t) * n_rows + n] = acc[r][nt][e];
        } else {
          const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
          out[static_cast<size_t>(t) * n_rows + n] = from_float<XT>(acc[r][nt][e] + b);
        }
      }
  }  // item
  trace.done(TRACE_CODEBOOK_MMA);
}

int max_blocks_per_sm = 0;  // 0: as many as fit (codegemm_codebook_mma_set_blocks_per_sm, for plan sweeps)

template <int M, int V, int R, int NT, typename XT, int THREADS>
int launch_mma(const void* x, int tokens, int stride_x, const Segments& segs, const void* bias, void* out, float* partial, int n_rows, int num_chunks,
               int groups, int chunks_per_group, int splits, cudaStream_t stream) {
  const int per_split = (num_chunks + splits - 1) / splits;
  const int used_splits = (num_chunks + per_split - 1) / per_split;
  const int smem = codebook_bytes<M, V>() + per_split * (NT == 2 ? 16 : tokens) * 256;  // x: see PADDED
  const int rows_per_block = THREADS / 32 * 16 * R;
  if (!segs.aligned(rows_per_block)) return static_cast<int>(cudaErrorInvalidValue);
  auto kernel = codebook_mma_kernel<M, V, R, NT, XT, THREADS>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const int items = (n_rows + rows_per_block - 1) / rows_per_block * used_splits;
  int device = 0, sms = 0, per_sm = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return static_cast<int>(err);
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
    return static_cast<int>(err);
  if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem)) != cudaSuccess)
    return static_cast<int>(err);
  if (max_blocks_per_sm > 0) per_sm = min(per_sm, max_blocks_per_sm);
  dim3 grid(max(1, min(items, sms * max(1, per_sm))));
  err = launch_dependent(kernel, grid, dim3(THREADS), smem, stream,
      static_cast<const XT*>(x), tokens, stride_x, segs, static_cast<const XT*>(bias), static_cast<XT*>(out),
      needs_reduce(used_splits, segs) ? partial : nullptr, n_rows, num_chunks, groups, chunks_per_group, per_split);
  if (err != cudaSuccess) return static_cast<int>(err);
  return needs_reduce(used_splits, segs) ? launch_split_reduce<XT>(partial, bias, out, tokens, n_rows, used_splits, segs, stream)
                                         : 0;
}

template <int M, int V, typename XT>
int mma_plan(int r, int tokens, const void* x, int stride_x, const Segments& segs, const void* bias, void* out, float* partial, int n_rows, int num_chunks, int groups,
             int cpg, int splits, cudaStream_t stream) {
#define CODEGEMM_MMA(RR, NN, THREADS)                                                                            \
  return launch_mma<M, V, RR, NN, XT, THREADS>(x, tokens, stride_x, segs, bias, out, partial, n_rows, num_chunks, \
                                               groups, cpg, splits, stream)
  if (tokens <= 8) {
    if (r >= 4) { CODEGEMM_MMA(4, 1, MMA_THREADS); }
    if (r == 2) { CODEGEMM_MMA(2, 1, MMA_THREADS); }
    CODEGEMM_MMA(1, 1, MMA_THREADS);
  }
  // Two n-tiles: 256-row blocks either way. r >= 2: 8 warps of two m-tiles that share each B fragment (a sixth fewer
  // shared-memory wavefronts at 16 tokens; 244 registers, no spills), the default; r = 1: 16 warps of one.
  if (r >= 2) { CODEGEMM_MMA(2, 2, 256); }
  CODEGEMM_MMA(1, 2, MMA_THREADS);
#undef CODEGEMM_MMA
}

template <typename XT>
int mma_config(int m, int v, int r, int tokens, const void* x, int stride_x, const Segments& segs,
               const void* bias, void* out, float* partial, int n_rows,
               int num_chunks, int groups, int cpg, int splits, cudaStream_t stream) {
  if (tokens < 1 || tokens > 16) return -1;
  if (m == 2 && v == 8)
    return mma_plan<2, 8, XT>(r, tokens, x, stride_x, segs, bias, out, partial, n_rows,
                              num_chunks, groups, cpg, splits, stream);
  if (m == 1 && v == 4)
    return mma_plan<1, 4, XT>(r, tokens, x, stride_x, segs, bias, out, partial, n_rows,
                              num_chunks, groups, cpg, splits, stream);
  return -1;
}

}  // namespace

extern "C" {
CODEGEMM_TRACE_SETTER(codegemm_trace_set_codebook_mma)

// m2v8 / m1v4 with 8-bit codes, fp16 codebooks and scales; 1-16 tokens; K a multiple of 128 and scale groups
// a multiple of 128 inputs (chunks_per_group chunks each; per-row scales: groups = 1, chunks_per_group =
// num_chunks). rows_per_warp16 picks 1, 2 or 4 m-tiles per warp (above 8 tokens 1 or 2, both in 256-row blocks:
// 16 warps of one tile or 8 of two). segs: the layer or sibling layers stacked along N (common.cuh), n_rows their
// total. dtype: 0 fp16, 1 bf16.
// Returns a cudaError_t (cudaErrorInvalidValue for segments off block boundaries), or -1 for a config that is
// not compiled in.
int codegemm_codebook_mma(int dtype, int m, int v, int rows_per_warp16, int tokens, const void* x, int stride_x,
                          const Segments* segs, const void* bias, void* out, float* partial, int n_rows,
                          int num_chunks, int groups, int chunks_per_group, int splits, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return mma_config<__half>(m, v, rows_per_warp16, tokens, x, stride_x, *segs, bias, out, partial, n_rows,
                              num_chunks, groups, chunks_per_group, splits, s);
  if (dtype == 1)
    return mma_config<__nv_bfloat16>(m, v, rows_per_warp16, tokens, x, stride_x, *segs, bias, out, partial, n_rows,
                                     num_chunks, groups, chunks_per_group, splits, s);
  return -1;
}

void codegemm_codebook_mma_set_blocks_per_sm(int blocks) { max_blocks_per_sm = blocks; }
}
