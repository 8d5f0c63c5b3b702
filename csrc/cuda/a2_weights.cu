// a2_weights: the A² weights w[b, h, t] = Σ_(query heads r of KV head h) Σ_i a[r, i, t]² of
// dense attention, a = softmax(scale · q k^T) over the keys each query row sees, without ever
// materialising the attention matrix (the prefill of an A² cache used to write every block's
// float32 logits, probabilities and squares to memory: ~10 passes over B·Hq·L·T floats).
//
// Two streaming passes over 64 x 64 tiles, each a tiled matrix product whose epilogue never
// leaves registers:
//   pass 0 (rows):    grid over 64 query rows; walks the key tiles; online max / sum of
//                     exp2 per row -> lse[b, hq, i] (natural log).
//   pass 1 (columns): grid over 128 keys (16-bit inputs, a2_cols_mma_kernel: 32 keys per warp,
//                     query rows read by ldmatrix) or 64 keys (float32, a2_cols_kernel); walks
//                     every query row of the KV head's query heads that can see the keys;
//                     Σ exp(2 (s - lse_row)) per key -> w[b, h, t]. When the caller gives the
//                     rows' lse (from a fused attention kernel), pass 0 is skipped.
// Each block owns its output rows / keys: plain stores, no atomics, deterministic.
//
// float16 / bfloat16 inputs run on mma.sync.m16n8k16 with float32 accumulation (the products of
// two 16-bit inputs are exact in float32, so the logits are float32 dot products of the inputs,
// as the CPU op's float32 matmul computes them, up to the summation order). float32 inputs use
// the same tiles with float32 FMAs (no tensor cores: TF32 would round the inputs).
//
// Visibility: mask[b, i, t] when given, else causal with the queries the last L of the T tokens:
// t <= T - L + i. The kernels read the mask as bits (a2_mask_bits_kernel packs the bool mask
// first): bit t % 32 of word mbits[b, i, t / 32]. A lane then loads one 32-bit word for the
// keys of its warp (key pass) or two for a 64-key tile (row pass) instead of a byte per logit.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "device_common.cuh"
#include "launch.cuh"

namespace headq {
namespace cuda {
namespace {

constexpr int kTile = 64;     // rows of a tile (A: 16 per warp; B: 8 n-tiles of 8)
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
struct A2Traits;
template <>
struct A2Traits<float> {
  static constexpr bool kMma = false;
};
template <>
struct A2Traits<__half> {
  static constexpr bool kMma = true;
};
template <>
struct A2Traits<__nv_bfloat16> {
  static constexpr bool kMma = true;
};

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async4(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_wait_one() {
  asm volatile("cp.async.wait_group 1;\n" ::);
}

struct A2Params {
  const void* q;  // [B, Hq, L, D] contiguous
  const void* k;  // [B, H, T, D] contiguous
  const uint32_t* mbits;  // [B or 1, L, nw] mask bits, or null (causal)
  int64_t mbsb;           // words between two sequences' bits (0 when broadcast)
  int64_t nw;             // words per row: ceil(T / 32)
  float* lse;        // [B, Hq, L]
  float* w;          // [B, H, T]
  int64_t L, T;
  int H, n_rep;
  float scale2;  // scale · log2(e)
};

// Row bytes of a staged tile row: D elements + 16 bytes of padding, so that the 8 rows a
// fragment load touches start 4 banks apart (conflict-free 32-bit fragment loads).
template <typename T, int D>
struct TileShape {
  static constexpr int kRowBytes = D * int(sizeof(T)) + 16;
  static constexpr int kBytes = kTile * kRowBytes;
  static constexpr int kChunks = D * int(sizeof(T)) / 16;  // 16-byte chunks per row
};

// Stage 64 rows into smem: row j from row_ptr(j) (nullptr: zero-fill). All threads take part;
// the copies complete at the caller's cp.async wait.
template <typename T, int D, typename RowPtr>
__device__ __forceinline__ void stage_rows(unsigned char* dst, RowPtr row_ptr) {
  using S = TileShape<T, D>;
  for (int c = threadIdx.x; c < kTile * S::kChunks; c += kThreads) {
    const int j = c / S::kChunks, part = c % S::kChunks;
    unsigned char* d = dst + j * S::kRowBytes + part * 16;
    const unsigned char* src = static_cast<const unsigned char*>(row_ptr(j));
    if (src != nullptr) {
      cp_async16(d, src + part * 16);
    } else {
      *reinterpret_cast<uint4*>(d) = make_uint4(0, 0, 0, 0);
    }
  }
}

// The warp's 16 x 64 score tile: c[j][e] = A row (g + 8 (e / 2)) · B row (8 j + 2 cq + e % 2),
// g = lane / 4, cq = lane % 4 (the mma C-fragment layout). 16-bit: A fragments in registers.
template <typename T, int D>
struct ScoreTile {
  static constexpr int kSteps = D / 16;
  uint32_t a[A2Traits<T>::kMma ? kSteps : 1][4];
  const unsigned char* a_smem;  // float32 path: the warp's 16 A rows in shared memory

  __device__ __forceinline__ void load_a(const unsigned char* tile, int warp, int lane) {
    using S = TileShape<T, D>;
    const unsigned char* base = tile + warp * 16 * S::kRowBytes;
    if constexpr (A2Traits<T>::kMma) {
      const int g = lane >> 2, cq = lane & 3;
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const uint32_t* r0 = reinterpret_cast<const uint32_t*>(base + g * S::kRowBytes) + ks * 8;
        const uint32_t* r1 =
            reinterpret_cast<const uint32_t*>(base + (g + 8) * S::kRowBytes) + ks * 8;
        a[ks][0] = r0[cq];
        a[ks][1] = r1[cq];
        a[ks][2] = r0[cq + 4];
        a[ks][3] = r1[cq + 4];
      }
    } else {
      a_smem = base;
    }
  }

  __device__ __forceinline__ void scores(const unsigned char* btile, int lane,
                                         float (&c)[8][4]) const {
    using S = TileShape<T, D>;
    const int g = lane >> 2, cq = lane & 3;
    if constexpr (A2Traits<T>::kMma) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
        const uint32_t* br =
            reinterpret_cast<const uint32_t*>(btile + (8 * j + g) * S::kRowBytes);
#pragma unroll
        for (int ks = 0; ks < kSteps; ++ks) mma16816<T>(c[j], a[ks], br[ks * 8 + cq], br[ks * 8 + 4 + cq]);
      }
    } else {
      const float4* a0 = reinterpret_cast<const float4*>(a_smem + g * S::kRowBytes);
      const float4* a1 = reinterpret_cast<const float4*>(a_smem + (g + 8) * S::kRowBytes);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float4* b0 = reinterpret_cast<const float4*>(btile + (8 * j + 2 * cq) * S::kRowBytes);
        const float4* b1 =
            reinterpret_cast<const float4*>(btile + (8 * j + 2 * cq + 1) * S::kRowBytes);
        float s00 = 0.f, s01 = 0.f, s10 = 0.f, s11 = 0.f;
#pragma unroll 4
        for (int d = 0; d < D / 4; ++d) {
          const float4 x0 = a0[d], x1 = a1[d], y0 = b0[d], y1 = b1[d];
          s00 += x0.x * y0.x + x0.y * y0.y + x0.z * y0.z + x0.w * y0.w;
          s01 += x0.x * y1.x + x0.y * y1.y + x0.z * y1.z + x0.w * y1.w;
          s10 += x1.x * y0.x + x1.y * y0.y + x1.z * y0.z + x1.w * y0.w;
          s11 += x1.x * y1.x + x1.y * y1.y + x1.z * y1.z + x1.w * y1.w;
        }
        c[j][0] = s00;
        c[j][1] = s01;
        c[j][2] = s10;
        c[j][3] = s11;
      }
    }
  }
};

// 2^x by the SFU (ex2.approx.ftz: 2 ulp; results below 2^-126 flush to 0, 2^-inf = +0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Tile-local index of the last visible column: min(last in range, last allowed), clamped to
// [-1, kTile - 1] (both arguments relative to the tile's first column).
__device__ __forceinline__ int tile_last(int64_t last_in_range, int64_t last_allowed) {
  int64_t x = last_in_range < last_allowed ? last_in_range : last_allowed;
  x = x < -1 ? -1 : (x > kTile - 1 ? kTile - 1 : x);
  return static_cast<int>(x);
}

// Stage n of a key pass: the 64 query rows i0 = i_start + 64 (n % per_head) .. of query head
// r = n / per_head (zero rows past L) into dst and their lse (-inf past L) into lse_dst; one
// cp.async group.
template <typename T, int D>
__device__ __forceinline__ void stage_query_rows(unsigned char* dst, float* lse_dst, const T* qh,
                                                 const float* lseh, int64_t L, int64_t i_start,
                                                 int per_head, int n) {
  const int r = n / per_head;
  const int64_t i0 = i_start + int64_t(n % per_head) * kTile;
  const T* qr = qh + int64_t(r) * L * D;
  stage_rows<T, D>(dst, [&](int j) -> const void* {
    return i0 + j < L ? qr + (i0 + j) * D : nullptr;
  });
  for (int j = threadIdx.x; j < kTile; j += kThreads) {
    if (i0 + j < L) {
      cp_async4(lse_dst + j, lseh + int64_t(r) * L + i0 + j);
    } else {
      lse_dst[j] = -INFINITY;
    }
  }
  cp_async_commit();
}

// Double-buffered walk over n_tiles tiles: issue(n) stages tile n into buffer n & 1 and commits
// one cp.async group; body(n) runs once tile n has landed, between two block barriers (the
// second keeps a buffer from being restaged while a warp still reads it).
template <typename Issue, typename Body>
__device__ __forceinline__ void double_buffered(int n_tiles, Issue& issue, Body&& body) {
  if (n_tiles > 0) issue(0);
  for (int n = 0; n < n_tiles; ++n) {
    if (n + 1 < n_tiles) {
      issue(n + 1);
      cp_async_wait_one();
    } else {
      cp_async_wait_all();
    }
    __syncthreads();
    body(n);
    __syncthreads();
  }
}

// Shared memory: float32 keeps the A tile staged for the whole block (SIMT reads it), 16-bit
// types load it into registers and reuse the buffer.
template <typename T, int D>
constexpr int a2_smem_bytes() {
  return (A2Traits<T>::kMma ? 2 : 3) * TileShape<T, D>::kBytes + 2 * kTile * int(sizeof(float));
}

// ---------------------------------------------------------------------------------------------
// pass 0: lse of 64 query rows. Rows are the KV head's n_rep·L query rows flattened (query head
// r, row i) -> v = r·L + i, as q[b, h·n_rep : (h+1)·n_rep] is laid out.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) a2_rows_kernel(A2Params p) {
  using S = TileShape<T, D>;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* buf[2] = {smem, smem + S::kBytes};
  unsigned char* a_tile = A2Traits<T>::kMma ? smem : smem + 2 * S::kBytes;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = blockIdx.z, h = blockIdx.y;
  const int64_t nv = p.n_rep * p.L;
  const int64_t v0 = int64_t(blockIdx.x) * kTile;
  const int64_t v_last = (v0 + kTile < nv ? v0 + kTile : nv) - 1;
  const T* qh = static_cast<const T*>(p.q) + (int64_t(b) * p.H + h) * nv * D;
  const T* kh = static_cast<const T*>(p.k) + (int64_t(b) * p.H + h) * p.T * D;
  // keys any row of the block may see
  const int64_t i_max = (v0 / p.L != v_last / p.L) ? p.L - 1 : v_last % p.L;
  const int64_t t_end = p.mbits != nullptr ? p.T : p.T - p.L + i_max + 1;
  const int n_tiles = static_cast<int>((t_end + kTile - 1) / kTile);

  stage_rows<T, D>(a_tile, [&](int j) -> const void* {
    const int64_t v = v0 + j;
    return v < nv ? qh + v * D : nullptr;
  });
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  ScoreTile<T, D> st;
  st.load_a(a_tile, warp, lane);
  __syncthreads();  // the 16-bit path reuses a_tile (= buf[0]) for key tiles

  const int g = lane >> 2, cq = lane & 3;
  int64_t row_i[2];
  bool row_ok[2];
  for (int hi = 0; hi < 2; ++hi) {
    const int64_t v = v0 + warp * 16 + g + 8 * hi;
    row_ok[hi] = v < nv;
    row_i[hi] = row_ok[hi] ? v % p.L : 0;
  }
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  auto issue = [&](int n) {
    const int64_t t0 = int64_t(n) * kTile;
    stage_rows<T, D>(buf[n & 1], [&](int j) -> const void* {
      return t0 + j < p.T ? kh + (t0 + j) * D : nullptr;
    });
    cp_async_commit();
  };
  double_buffered(n_tiles, issue, [&](int n) {
    float c[8][4];
    st.scores(buf[n & 1], lane, c);
    const int64_t t0 = int64_t(n) * kTile;
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      // last visible column of the tile for this row (tile-local, -1: none), so that the
      // causal rule costs one 32-bit compare per element
      const int last = row_ok[hi] ? tile_last(p.T - 1 - t0, p.mbits != nullptr
                                                                 ? int64_t(kTile)
                                                                 : p.T - p.L + row_i[hi] - t0)
                                  : -1;
      if (last < 2 * cq) continue;  // none of this lane's columns of the tile is in range
      float tmax = -INFINITY;
      bool any = true;  // a visible column among this lane's (causal: last >= 2 cq)
      if (p.mbits == nullptr) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float s = 8 * j + 2 * cq + e <= last ? c[j][2 * hi + e] * p.scale2 : -INFINITY;
            c[j][2 * hi + e] = s;
            tmax = fmaxf(tmax, s);
          }
      } else {
        any = false;
        // the tile's 64 bits of this row (t0 is a multiple of 64)
        const uint32_t* mrow = p.mbits + b * p.mbsb + row_i[hi] * p.nw + (t0 >> 5);
        const uint64_t bits =
            uint64_t(mrow[0]) | ((t0 >> 5) + 1 < p.nw ? uint64_t(mrow[1]) << 32 : uint64_t(0));
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 8 * j + 2 * cq + e;
            const bool ok = col <= last && ((bits >> col) & 1u);
            any |= ok;
            const float s = ok ? c[j][2 * hi + e] * p.scale2 : -INFINITY;
            c[j][2 * hi + e] = s;
            tmax = fmaxf(tmax, s);
          }
      }
      if (tmax == -INFINITY) {
        // fmaxf drops NaN: visible columns and no maximum means their logits were all NaN;
        // the row's lse is then NaN, as the CPU op's logsumexp (a single NaN among finite
        // logits turns the sum below NaN)
        if (any) l[hi] = NAN;
        continue;
      }
      const float m_new = fmaxf(m[hi], tmax);
      float sum = l[hi] * fast_exp2(m[hi] - m_new);  // m = -inf: l = 0 (or NaN) times +0
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) sum += fast_exp2(c[j][2 * hi + e] - m_new);
      m[hi] = m_new;
      l[hi] = sum;
    }
  });
  // the four lanes of a quad hold disjoint columns of the same two rows
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[hi], off);
      const float lo = __shfl_xor_sync(0xffffffffu, l[hi], off);
      const float mn = fmaxf(m[hi], mo);
      if (mn != -INFINITY) {
        l[hi] = l[hi] * fast_exp2(m[hi] - mn) + lo * fast_exp2(mo - mn);
        m[hi] = mn;
      } else {
        l[hi] += lo;  // 0, or NaN from a lane whose logits were all NaN
      }
    }
    const int64_t v = v0 + warp * 16 + g + 8 * hi;
    if (cq == 0 && v < nv) {
      // l NaN (a NaN logit): lse NaN, as the CPU op's logsumexp; the column pass skips it
      const float lse2 = l[hi] > 0.f ? m[hi] + log2f(l[hi]) : (l[hi] == l[hi] ? -INFINITY : l[hi]);
      p.lse[(int64_t(b) * p.H + h) * nv + v] = lse2 * kLn2;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// pass 1: w of 64 keys. Walks (query head r, 64-row tile) of the KV head's query rows, from the
// first row that can see the block's first key (causal) or row 0 (mask).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) a2_cols_kernel(A2Params p) {
  using S = TileShape<T, D>;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* buf[2] = {smem, smem + S::kBytes};
  unsigned char* a_tile = A2Traits<T>::kMma ? smem : smem + 2 * S::kBytes;
  float* lse_buf = reinterpret_cast<float*>(smem + a2_smem_bytes<T, D>() - 2 * kTile * sizeof(float));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int b = blockIdx.z, h = blockIdx.y;
  const int64_t t0 = int64_t(blockIdx.x) * kTile;
  const int64_t nv = p.n_rep * p.L;
  const T* qh = static_cast<const T*>(p.q) + (int64_t(b) * p.H + h) * nv * D;
  const T* kh = static_cast<const T*>(p.k) + (int64_t(b) * p.H + h) * p.T * D;
  const float* lseh = p.lse + (int64_t(b) * p.H + h) * nv;
  int64_t i_start = 0;
  if (p.mbits == nullptr) {
    i_start = t0 - (p.T - p.L);  // first row with t0 <= T - L + i
    if (i_start < 0) i_start = 0;
  }
  const int64_t rows = p.L - i_start;
  const int per_head = rows > 0 ? static_cast<int>((rows + kTile - 1) / kTile) : 0;
  const int n_tiles = per_head * p.n_rep;

  stage_rows<T, D>(a_tile, [&](int j) -> const void* {
    return t0 + j < p.T ? kh + (t0 + j) * D : nullptr;
  });
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  ScoreTile<T, D> st;
  st.load_a(a_tile, warp, lane);
  __syncthreads();

  const int g = lane >> 2, cq = lane & 3;
  int64_t key_t[2];
  for (int hi = 0; hi < 2; ++hi) key_t[hi] = t0 + warp * 16 + g + 8 * hi;
  float acc[2] = {0.f, 0.f};
  const float scale2x2 = 2.f * p.scale2;  // a^2 = 2^(2 (s2 - lse2)), one FMA

  auto issue = [&](int n) {
    stage_query_rows<T, D>(buf[n & 1], lse_buf + (n & 1) * kTile, qh, lseh, p.L, i_start,
                           per_head, n);
  };
  double_buffered(n_tiles, issue, [&](int n) {
    float c[8][4];
    st.scores(buf[n & 1], lane, c);
    const float* lb = lse_buf + (n & 1) * kTile;
    const int64_t i0 = i_start + int64_t(n % per_head) * kTile;
    // first tile-local row that sees each key (causal: i >= t - (T - L)); kTile: none
    int first[2];
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int64_t f = key_t[hi] >= p.T ? int64_t(kTile)
                        : p.mbits != nullptr ? int64_t(0)
                                            : key_t[hi] - (p.T - p.L) - i0;
      first[hi] = static_cast<int>(f < 0 ? 0 : (f > kTile ? kTile : f));
    }
    // rows whose lse is not finite add nothing: -inf (past L, or a row that sees no key), NaN
    // (a NaN logit), +inf
    if (p.mbits == nullptr && first[0] == 0 && first[1] == 0) {  // every row sees both keys
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float lse2 = lb[8 * j + 2 * cq + e] * kLog2e;
          if (!(fabsf(lse2) < INFINITY)) continue;
#pragma unroll
          for (int hi = 0; hi < 2; ++hi)
            acc[hi] += fast_exp2(fmaf(c[j][2 * hi + e], scale2x2, -2.f * lse2));
        }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jr = 8 * j + 2 * cq + e;
          const float lse2 = lb[jr] * kLog2e;
          if (!(fabsf(lse2) < INFINITY)) continue;
#pragma unroll
          for (int hi = 0; hi < 2; ++hi) {
            if (jr >= first[hi] &&
                (p.mbits == nullptr ||
                 ((p.mbits[b * p.mbsb + (i0 + jr) * p.nw + (key_t[hi] >> 5)] >> (key_t[hi] & 31)) &
                  1u)))
              acc[hi] += fast_exp2(fmaf(c[j][2 * hi + e], scale2x2, -2.f * lse2));
          }
        }
    }
  });
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    float x = acc[hi];
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    if (cq == 0 && key_t[hi] < p.T) p.w[(int64_t(b) * p.H + h) * p.T + key_t[hi]] = x;
  }
}

// ---------------------------------------------------------------------------------------------
// pass 1 for 16-bit inputs: w of 128 keys per block, 32 per warp (two m16 tiles whose A
// fragments stay in registers for the whole walk). The query rows stream through the same
// double-buffered 64-row stages and are read with ldmatrix.x4 (the B fragments of two n-tiles
// per instruction); each B fragment feeds both of the warp's m-tiles. The 16-key-per-warp
// layout of a2_cols_kernel (still used for float32) loaded every B fragment with two 32-bit
// LDS per mma and was bound by shared-memory wavefronts (2 per mma against 1 here).
constexpr int kKeysMma = 128;               // keys per block
constexpr int kMTiles = kKeysMma / 16 / kWarps;  // m16 tiles per warp (2)

template <typename T, int D>
constexpr int a2_cols_mma_stage_bytes() {
  // the 128-key tile is staged once into the space of the two 64-row query buffers
  return kKeysMma * TileShape<T, D>::kRowBytes > 2 * TileShape<T, D>::kBytes
             ? kKeysMma * TileShape<T, D>::kRowBytes
             : 2 * TileShape<T, D>::kBytes;
}
template <typename T, int D>
constexpr int a2_cols_mma_smem_bytes() {
  return a2_cols_mma_stage_bytes<T, D>() + 2 * kTile * int(sizeof(float));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr)));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 4) a2_cols_mma_kernel(A2Params p) {
  using S = TileShape<T, D>;
  constexpr int kSteps = D / 16;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* buf[2] = {smem, smem + S::kBytes};
  float* lse_buf = reinterpret_cast<float*>(smem + a2_cols_mma_stage_bytes<T, D>());
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, cq = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y;
  const int64_t t0 = int64_t(blockIdx.x) * kKeysMma;
  const int64_t nv = p.n_rep * p.L;
  const T* qh = static_cast<const T*>(p.q) + (int64_t(b) * p.H + h) * nv * D;
  const T* kh = static_cast<const T*>(p.k) + (int64_t(b) * p.H + h) * p.T * D;
  const float* lseh = p.lse + (int64_t(b) * p.H + h) * nv;
  const int64_t off = p.T - p.L;  // causal: row i sees key t iff t <= off + i
  int64_t i_start = 0;
  if (p.mbits == nullptr) {
    i_start = t0 - off;  // first row that sees the block's first key
    if (i_start < 0) i_start = 0;
  }
  const int64_t rows = p.L - i_start;
  const int per_head = rows > 0 ? static_cast<int>((rows + kTile - 1) / kTile) : 0;
  const int n_tiles = per_head * p.n_rep;

  for (int half = 0; half < kKeysMma / kTile; ++half) {
    const int64_t th = t0 + half * kTile;
    stage_rows<T, D>(smem + half * S::kBytes, [&](int j) -> const void* {
      return th + j < p.T ? kh + (th + j) * D : nullptr;
    });
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  // the warp's keys: rows 32 warp + 16 m + (g, g + 8) of the key tile
  uint32_t a[kMTiles][kSteps][4];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
    const unsigned char* base = smem + (warp * 16 * kMTiles + 16 * m) * S::kRowBytes;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const uint32_t* r0 = reinterpret_cast<const uint32_t*>(base + g * S::kRowBytes) + ks * 8;
      const uint32_t* r1 =
          reinterpret_cast<const uint32_t*>(base + (g + 8) * S::kRowBytes) + ks * 8;
      a[m][ks][0] = r0[cq];
      a[m][ks][1] = r1[cq];
      a[m][ks][2] = r0[cq + 4];
      a[m][ks][3] = r1[cq + 4];
    }
  }
  __syncthreads();  // the key tile's space becomes the query buffers

  const int64_t warp_t0 = t0 + warp * 16 * kMTiles;
  const bool warp_has_keys = warp_t0 < p.T;
  const int64_t warp_last = (warp_t0 + 16 * kMTiles < p.T ? warp_t0 + 16 * kMTiles : p.T) - 1;
  int64_t key_t[kMTiles][2];
#pragma unroll
  for (int m = 0; m < kMTiles; ++m)
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) key_t[m][hi] = warp_t0 + 16 * m + g + 8 * hi;
  float acc[kMTiles][2] = {};
  const float scale2x2 = 2.f * p.scale2;  // a^2 = 2^(2 (s2 - lse2)), one FMA
  // ldmatrix.x4 row address of this lane within a 16-row chunk: matrix lane / 8 is
  // (n-tile lane / 16, channels 8 ((lane / 8) & 1) .. + 7 of the k-step)
  const int ld_row = 8 * (lane >> 4) + (lane & 7);
  const int ld_col = 16 * ((lane >> 3) & 1);  // bytes

  auto issue = [&](int n) {
    stage_query_rows<T, D>(buf[n & 1], lse_buf + (n & 1) * kTile, qh, lseh, p.L, i_start,
                           per_head, n);
  };
  double_buffered(n_tiles, issue, [&](int n) {
    const int64_t i0 = i_start + int64_t(n % per_head) * kTile;
    // causal: no row of the stage sees any key of the warp
    if (!warp_has_keys || (p.mbits == nullptr && warp_t0 > off + i0 + kTile - 1)) return;
    // every row of the stage sees every key of the warp: no per-element checks
    const bool full = p.mbits == nullptr && warp_last <= off + i0;
    const unsigned char* bt = buf[n & 1];
    const float* lb = lse_buf + (n & 1) * kTile;
    // one 16-row chunk at a time: unrolled by 2 it spills and took 140.6 vs 136.2 ms (32k)
#pragma unroll 1
    for (int nc = 0; nc < kTile / 16; ++nc) {
      float c[kMTiles][2][4];
#pragma unroll
      for (int m = 0; m < kMTiles; ++m)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) c[m][nt][0] = c[m][nt][1] = c[m][nt][2] = c[m][nt][3] = 0.f;
      const unsigned char* brow = bt + (16 * nc + ld_row) * S::kRowBytes + ld_col;
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        uint32_t bf[4];
        ldsm_x4(bf, brow + ks * 32);
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          mma16816<T>(c[m][0], a[m][ks], bf[0], bf[1]);
          mma16816<T>(c[m][1], a[m][ks], bf[2], bf[3]);
        }
      }
      // rows whose lse is not finite add nothing: -inf (past L, or a row that sees no key),
      // NaN (a NaN logit), +inf. Their bias is -inf, and fmaxf turns the NaN of a non-finite
      // logit plus -inf into -inf (a row with a finite lse has finite logits).
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jr = 16 * nc + 8 * nt + 2 * cq + e;
          const float lv = lb[jr];
          const bool row_ok = fabsf(lv) < INFINITY;
          const float bias = row_ok ? -2.f * kLog2e * lv : -INFINITY;
          if (full) {
#pragma unroll
            for (int m = 0; m < kMTiles; ++m)
#pragma unroll
              for (int hi = 0; hi < 2; ++hi)
                acc[m][hi] += fast_exp2(fmaxf(fmaf(c[m][nt][2 * hi + e], scale2x2, bias),
                                              -INFINITY));
          } else if (row_ok) {
            // the row's bits of the warp's 32 keys (warp_t0 is a multiple of 32)
            const uint32_t bits =
                p.mbits != nullptr ? p.mbits[b * p.mbsb + (i0 + jr) * p.nw + (warp_t0 >> 5)] : 0u;
#pragma unroll
            for (int m = 0; m < kMTiles; ++m)
#pragma unroll
              for (int hi = 0; hi < 2; ++hi) {
                const int64_t t = key_t[m][hi];
                const bool vis = t < p.T && (p.mbits != nullptr
                                                 ? ((bits >> (16 * m + g + 8 * hi)) & 1u) != 0
                                                 : t <= off + i0 + jr);
                if (vis) acc[m][hi] += fast_exp2(fmaf(c[m][nt][2 * hi + e], scale2x2, bias));
              }
          }
        }
    }
  });
#pragma unroll
  for (int m = 0; m < kMTiles; ++m)
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      float x = acc[m][hi];
      x += __shfl_xor_sync(0xffffffffu, x, 1);
      x += __shfl_xor_sync(0xffffffffu, x, 2);
      if (cq == 0 && key_t[m][hi] < p.T) p.w[(int64_t(b) * p.H + h) * p.T + key_t[m][hi]] = x;
    }
}

// bits[word] = the 32 mask values of (sequence bm, row i, keys 32 wd .. 32 wd + 31), word =
// (bm · L + i) · nw + wd, 0 past T; one warp per word (a ballot of one bool per lane).
__global__ void __launch_bounds__(256) a2_mask_bits_kernel(const bool* mask, int64_t msb,
                                                           int64_t msl, int64_t L, int64_t T,
                                                           int64_t nw, int64_t n_words,
                                                           uint32_t* bits) {
  const int64_t word = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (word >= n_words) return;  // whole warps: blockDim is a multiple of 32
  const int lane = threadIdx.x & 31;
  const int64_t wd = word % nw, row = word / nw;
  const int64_t t = wd * 32 + lane;
  const bool v = t < T && mask[(row / L) * msb + (row % L) * msl + t];
  const uint32_t b = __ballot_sync(0xffffffffu, v);
  if (lane == 0) bits[word] = b;
}

template <typename T, int D>
cudaError_t launch_a2_typed(const A2Params& p, int64_t B, bool rows, cudaStream_t stream) {
  constexpr int smem = a2_smem_bytes<T, D>();
  cudaError_t err;
  if (rows) {
    err = cudaFuncSetAttribute(a2_rows_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               smem);
    if (err != cudaSuccess) return err;
    const int64_t nv = p.n_rep * p.L;
    const dim3 rows_grid(static_cast<unsigned>((nv + kTile - 1) / kTile), p.H,
                         static_cast<unsigned>(B));
    a2_rows_kernel<T, D><<<rows_grid, kThreads, smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if constexpr (A2Traits<T>::kMma) {
    constexpr int smem_c = a2_cols_mma_smem_bytes<T, D>();
    err = cudaFuncSetAttribute(a2_cols_mma_kernel<T, D>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem_c);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>((p.T + kKeysMma - 1) / kKeysMma), p.H,
                    static_cast<unsigned>(B));
    a2_cols_mma_kernel<T, D><<<grid, kThreads, smem_c, stream>>>(p);
  } else {
    err = cudaFuncSetAttribute(a2_cols_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               smem);
    if (err != cudaSuccess) return err;
    const dim3 cols_grid(static_cast<unsigned>((p.T + kTile - 1) / kTile), p.H,
                         static_cast<unsigned>(B));
    a2_cols_kernel<T, D><<<cols_grid, kThreads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_a2_mask_bits(const bool* mask, int64_t mask_sb, int64_t mask_sl, int64_t Bm,
                                int64_t L, int64_t T, uint32_t* bits, cudaStream_t stream) {
  const int64_t nw = (T + 31) / 32, n_words = Bm * L * nw;
  if (n_words == 0) return cudaSuccess;
  const int64_t blocks = (n_words * 32 + 255) / 256;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;  // > 2^31 blocks of 8 words
  a2_mask_bits_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(mask, mask_sb, mask_sl,
                                                                         L, T, nw, n_words, bits);
  return cudaGetLastError();
}

cudaError_t launch_a2_weights(const void* q, const void* k, DType dtype,
                              const uint32_t* mask_bits, int64_t bits_sb, int64_t B, int64_t H,
                              int64_t Hq, int64_t L, int64_t T, int64_t D, float scale,
                              float* lse, bool lse_given, float* w, cudaStream_t stream) {
  if (B == 0 || H == 0 || T == 0) return cudaSuccess;
  A2Params p;
  p.q = q;
  p.k = k;
  p.mbits = mask_bits;
  p.mbsb = bits_sb;
  p.nw = (T + 31) / 32;
  p.lse = lse;
  p.w = w;
  p.L = L;
  p.T = T;
  p.H = static_cast<int>(H);
  p.n_rep = static_cast<int>(Hq / H);
  p.scale2 = scale * kLog2e;
  if (L == 0) return cudaMemsetAsync(w, 0, sizeof(float) * B * H * T, stream);
  switch (dtype) {
    case DType::kFloat32:
      return D == 64 ? launch_a2_typed<float, 64>(p, B, !lse_given, stream)
                     : launch_a2_typed<float, 128>(p, B, !lse_given, stream);
    case DType::kFloat16:
      return D == 64 ? launch_a2_typed<__half, 64>(p, B, !lse_given, stream)
                     : launch_a2_typed<__half, 128>(p, B, !lse_given, stream);
    case DType::kBFloat16:
      return D == 64 ? launch_a2_typed<__nv_bfloat16, 64>(p, B, !lse_given, stream)
                     : launch_a2_typed<__nv_bfloat16, 128>(p, B, !lse_given, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace headq
