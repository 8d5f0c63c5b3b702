// Device-only helpers of the headq CUDA kernels (torch-free): element types, vector loads,
// ordered warp reductions and cp.async. The float/bit-exact math itself lives in
// csrc/include/headq/*.h and is shared with the CPU path.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "headq/common.h"
#include "headq/fp16.h"
#include "headq/pack.h"
#include "headq/quant.h"
#include "launch.cuh"

namespace headq {
namespace cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Programmatic dependent launch (sm_90+). A kernel that calls pdl_launch_dependents() lets the
// next kernel of the stream, if that one was launched with the programmatic-serialisation
// attribute (launch_maybe_pdl), be scheduled once every block of this grid has called it (or
// exited), i.e. into the slots its blocks leave free; the dependent calls pdl_wait() before it
// reads this grid's output (or before it exits, to extend the dependency), which returns once
// the previous grid has completed and its writes are visible. Both are no-ops for a kernel
// launched without the attribute and on older architectures.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // No memory clobber: the dependent waits for this whole grid anyway (pdl_wait), so nothing has
  // to be ordered around the trigger, and the compiler may move loads and stores across it.
  asm volatile("griddepcontrol.launch_dependents;\n");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), with the programmatic-stream-serialisation
// attribute when pdl is true (the kernel must then call pdl_wait() before reading the previous
// kernel's output).
template <typename... KArgs, typename... Args>
cudaError_t launch_maybe_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, bool pdl, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// Element i of a dense array of type `dt` as float32 (uniform switch; used off the hot loops).
__device__ __forceinline__ float load_as_float(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// A stored float16 scale/zero as float32 (exact).
__device__ __forceinline__ float f16_at(const __half* p, int64_t i) { return __half2float(p[i]); }

// 8 consecutive elements (16-byte aligned row slice) as float32.
template <typename T>
__device__ __forceinline__ void load8(const void* p, float (&f)[8]);
template <>
__device__ __forceinline__ void load8<float>(const void* p, float (&f)[8]) {
  const float4 a = static_cast<const float4*>(p)[0];
  const float4 b = static_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<__half>(const void* p, float (&f)[8]) {
  const uint4 u = *static_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const void* p, float (&f)[8]) {
  const uint4 u = *static_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // bfloat16 -> float32 is a 16-bit shift of the bit pattern (exact).
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Butterfly sum / max over the 32 lanes (every lane gets the result). Order-insensitive uses only.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Order-preserving NaN-propagating min/max over the 32 lanes, lane l holding the partial of
// elements that precede those of lane l+1. Pairs are merged as (lower lanes, higher lanes) at
// every level (offsets 1, 2, 4, ...), so ties between equal values (e.g. -0.0 and +0.0) resolve
// to the first element exactly as the sequential CPU loop (nan_min/nan_max) does; cub's
// WarpReduce does not document the operand order, hence this hand-written tree. The result is
// broadcast from lane 0.
__device__ __forceinline__ void warp_ordered_minmax(float& mn, float& mx) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const float omn = __shfl_down_sync(0xffffffffu, mn, off);
    const float omx = __shfl_down_sync(0xffffffffu, mx, off);
    if ((lane & (2 * off - 1)) == 0) {
      mn = nan_min(mn, omn);
      mx = nan_max(mx, omx);
    }
  }
  mn = __shfl_sync(0xffffffffu, mn, 0);
  mx = __shfl_sync(0xffffffffu, mx, 0);
}

// Shared-memory address (32-bit, the state space's own) of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared asynchronous copy (sm_80+), L2-only (.cg): the packed cache is
// streamed once, so it should not evict anything from L1.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
// All but the newest committed group.
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

// Hopper bulk copies (TMA engine, cp.async.bulk) completing on a shared-memory mbarrier: one
// thread moves a whole contiguous range, instead of every thread issuing 16-byte cp.async with
// its own address arithmetic. sm_90+ only (HEADQ_HAS_BULK).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define HEADQ_HAS_BULK 1
#else
#define HEADQ_HAS_BULK 0
#endif
#if HEADQ_HAS_BULK
// One-time init (one thread; a block barrier must follow before any use).
__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// The issuing thread: announce `bytes` of bulk copies on bar (its one arrival of the phase).
// The proxy fence orders the block's earlier generic accesses of the destination (reads of the
// previous tile, behind a block barrier) before the async-proxy writes.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
// Global -> shared bulk copy of `bytes` (a multiple of 16, both addresses 16-byte aligned).
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes,
                                              uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
// Wait (acquire) until the phase of the given parity has completed: its bytes have landed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
#endif

// Copy nbytes (a multiple of 16; both pointers 16-byte aligned) with the whole block.
__device__ __forceinline__ void block_copy_async(void* smem_dst, const void* gmem_src,
                                                 int64_t nbytes, int tid, int nthreads) {
  char* d = static_cast<char*>(smem_dst);
  const char* s = static_cast<const char*>(gmem_src);
  for (int64_t off = static_cast<int64_t>(tid) * 16; off < nbytes;
       off += static_cast<int64_t>(nthreads) * 16) {
    cp_async16(d + off, s + off);
  }
}

// The packed streams of one (batch b, KV head h) of the quantised region (docs/LAYOUT.md):
// global base pointers, row sizes, and block-wide cp.async copies of a token range into a stage
// buffer laid out by L (a struct with the byte offsets kc, ks, kz, zc, zs, vc, vs, vz). Shared by
// the SIMT and the tensor-core decode kernels. Pointers of absent streams are null.
template <int D>
struct PackedStreams {
  const char *kc, *ks, *kz, *zc, *zs, *vc, *vs, *vz;
  int krowb, zrowb, vrowb;

  __device__ __forceinline__ PackedStreams(const DecodeParams& p, int b, int h, bool side,
                                           bool vcodes)
      : kc(p.k_codes.p + b * p.k_codes.sb + h * p.k_codes.sh),  // [Tq, krowb]
        ks(p.k_scale.p + b * p.k_scale.sb + h * p.k_scale.sh),  // [Tq/G, D] f16
        kz(p.k_zero.p + b * p.k_zero.sb + h * p.k_zero.sh),
        zc(side ? p.z_codes.p + b * p.z_codes.sb + h * p.z_codes.sh : nullptr),
        zs(side ? p.z_scale.p + b * p.z_scale.sb + h * p.z_scale.sh : nullptr),
        vc(vcodes ? p.v_codes.p + b * p.v_codes.sb + h * p.v_codes.sh : nullptr),
        vs(vcodes ? p.v_scale.p + b * p.v_scale.sb + h * p.v_scale.sh : nullptr),
        vz(vcodes ? p.v_zero.p + b * p.v_zero.sb + h * p.v_zero.sh : nullptr),
        krowb(D * p.kbits / 8),
        zrowb(side ? p.r * p.zbits / 8 : 0),
        vrowb(D * p.vbits / 8) {}

  // Key codes, group scales / zeros (groups of G tokens) and (side) the side code and its scales
  // of tokens [t0, tc).
  template <typename Layout>
  __device__ __forceinline__ void stage_keys(unsigned char* sb, const Layout& L, int t0, int tc,
                                             int G, bool side, int tid, int nthreads) const {
    const int n = tc - t0;
    block_copy_async(sb + L.kc, kc + static_cast<int64_t>(t0) * krowb,
                     static_cast<int64_t>(n) * krowb, tid, nthreads);
    const int g0 = t0 / G, g1 = (tc + G - 1) / G;
    block_copy_async(sb + L.ks, ks + static_cast<int64_t>(g0) * D * 2,
                     static_cast<int64_t>(g1 - g0) * D * 2, tid, nthreads);
    block_copy_async(sb + L.kz, kz + static_cast<int64_t>(g0) * D * 2,
                     static_cast<int64_t>(g1 - g0) * D * 2, tid, nthreads);
    if (side) {
      block_copy_async(sb + L.zc, zc + static_cast<int64_t>(t0) * zrowb,
                       static_cast<int64_t>(n) * zrowb, tid, nthreads);
      block_copy_async(sb + L.zs, zs + static_cast<int64_t>(t0) * 2,
                       static_cast<int64_t>(n) * 2, tid, nthreads);
    }
  }

  // Value codes and the ngv per-token group scales / zeros of n tokens from t0.
  template <typename Layout>
  __device__ __forceinline__ void stage_values(unsigned char* sb, const Layout& L, int t0, int n,
                                               int ngv, int tid, int nthreads) const {
    block_copy_async(sb + L.vc, vc + static_cast<int64_t>(t0) * vrowb,
                     static_cast<int64_t>(n) * vrowb, tid, nthreads);
    block_copy_async(sb + L.vs, vs + static_cast<int64_t>(t0) * ngv * 2,
                     static_cast<int64_t>(n) * ngv * 2, tid, nthreads);
    block_copy_async(sb + L.vz, vz + static_cast<int64_t>(t0) * ngv * 2,
                     static_cast<int64_t>(n) * ngv * 2, tid, nthreads);
  }
};

template <typename E>
__device__ __forceinline__ void store8(E* out, const float (&x)[8]) {
  if constexpr (sizeof(E) == 4) {
    reinterpret_cast<float4*>(out)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4*>(out)[1] = make_float4(x[4], x[5], x[6], x[7]);
  } else {
    union {
      uint4 u;
      E e[8];
    } pk;
#pragma unroll
    for (int i = 0; i < 8; ++i) pk.e[i] = from_float<E>(x[i]);
    *reinterpret_cast<uint4*>(out) = pk.u;
  }
}

// Where a dequantising kernel writes the 8 channels 8j..8j+7 of token t of slab bh (= b * H + h)
// of its [B, H, T, D] result: the op's own contiguous tensor (`contig`: at 8 times the chunk
// index, one 16-byte store), or a caller's `out` with element strides sb, sh, st, sd (e.g. a
// token slice of a longer tensor): 16-byte stores where its rows are contiguous and aligned
// (`vec`), one element at a time otherwise. 64-bit offsets: a slice of a long tensor can lie
// beyond 2^31 elements. The one-element-per-thread kernels use at() (element idx of the
// contiguous result, or its place at the strides).
struct OutRows {
  int64_t sb, sh, st, sd;  // element strides
  uint32_t H;
  bool contig, vec;
  template <typename E>
  __device__ __forceinline__ void store(E* out, int64_t i, uint32_t bh, uint32_t t, uint32_t j,
                                        const float (&x)[8]) const {
    if (contig) {
      store8(out + i * 8, x);
      return;
    }
    E* p = out + offset<uint32_t>(bh, t, 8 * j);
    if (vec) {
      store8(p, x);
      return;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) p[k * sd] = from_float<E>(x[k]);
  }
  __device__ __forceinline__ int64_t at(int64_t idx, int64_t bh, int64_t t, int64_t c) const {
    return contig ? idx : offset<int64_t>(bh, t, c);
  }
  // Element offset of channel c of token t in row bh = b * H + h, computed in the caller's
  // index type I: uint32_t in the fast kernels' store (a 32-bit bh / H in their hot path),
  // int64_t in the element-wise kernels' at().
  template <typename I>
  __device__ __forceinline__ int64_t offset(I bh, I t, I c) const {
    return static_cast<int64_t>(bh / H) * sb + static_cast<int64_t>(bh % H) * sh +
           static_cast<int64_t>(t) * st + static_cast<int64_t>(c) * sd;
  }
};

}  // namespace cuda
}  // namespace headq
