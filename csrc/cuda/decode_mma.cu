// Tensor-core split kernel of the fused decode attention (fp16/bf16 queries). Torch-free;
// launched from ops.cu. Same contract (docs/LAYOUT.md), split decomposition, partial layout
// [B, Hq, S, D] / [B, Hq, S, 2] and combine kernel as the SIMT kernel of decode_kernels.cu, which
// stays the fallback (fp32 queries, 3/8-bit codes, dense values, other head dims) and also runs
// the dense-window splits of this path (launch_decode_split with split0 = Sq); the heavy-slot
// splits are decode_heavy_kernel's (launch_decode_heavy).
//
// Work decomposition
// ------------------
// grid = (Sq, H * nchunk, B), 128 threads. A block owns one KV head, NG = 4 * NT query heads of
// its GQA group (NT = 1 for ratio <= 4, else 2: chunks of 8) and a range of whole 256-token
// tiles. Tiles are staged with cp.async into a double buffer exactly as in the SIMT kernel; each
// of the 4 warps then runs a complete flash-decoding step on its own 64-token sub-tile (its own
// running max, sum and accumulators: no block barrier inside a tile). The 4 warp partials are
// merged once at the end of the split.
//
// Both inner products run on mma.sync.m16n8k16 (fp16 operands, fp32 accumulation):
//   logits  [16 tokens x 8]  = codes [16 tokens x 16 channels] . Q' [16 channels x 8]
//   values  [16 chan.  x 8]  = codes^T [16 chan. x 16 tokens]  . P' [16 tokens x 8]
// The 8 columns are 4 query heads x (hi, lo): Q' = q*s (per key group) and P' = p*s_v (per token
// and value group) are split into two fp16 halves hi + lo (about 22 significant bits), so the
// logits and the output keep ~fp32 accuracy although the tensor-core operands are fp16. A lane
// owns columns (2t, 2t+1) = (hi, lo) of head t, so hi + lo is one FADD in the lane; the logits'
// C fragment (rows = tokens) becomes the P' B fragment of the value mma with one movmatrix.trans
// per 8x8 block. Zero points are not on the tensor cores: q.z per (group, head) is a small mma
// against q in fp16 (exact: q.z products are exact and fp32-accumulated), z_v is summed in fp32
// as sum_t p_t z_v (as in the SIMT kernel).
//
// Unpacking: a b-bit code at bit p of a 16-bit half (p + b <= 10) masked out of its word with one
// LOP3 is the fp16 *subnormal* code * 2^(p - 24), an exact tensor-core operand (fp16 subnormals
// are not flushed by HMMA). A code therefore costs half a LOP3 (two codes per fp16x2) plus, per
// word, one SHF (keys: the upper byte of each half) or one PRMT per fp16x2 (values: the two
// codes of a pair come from two token rows). The 2^(p - 24) is folded into Q' (keys, per
// channel) and into a per-lane power of two of the output rows (values). The k <-> channel
// assignment inside a 16-channel block is a fixed permutation (kmap_*) chosen so that every
// lane's codes sit at bit positions <= 6 of their half. -DHEADQ_MMA_NO_SUBNORMAL switches to the
// 0x6400 magic number + one HSUB2 per fp16x2 (codes as normal fp16), should subnormals misbehave.
//
// Ranges: Q' = q^ * s * 2^(24 - pos) * 2^-e_g with q^ = q * 2^-e_h (|q^| < 1, per head) and e_g
// from the group's largest scale, so |Q'| < 2^15; P' carries a per-warp power of two 2^kv chosen
// from the largest value scale seen (non-increasing, accumulators rescaled when it drops) so
// that |P'| < 2^15. Products smaller than ~2^-40 of the largest term lose relative precision
// (fp16 subnormal range of hi/lo), which is far below the fp32 rounding of the logits.
//
// Instruction budget at the benchmark shape (D=128, 2-bit K/V, r=8, bz=8, G=Gv=64, 4 heads per
// KV head), warp instructions per 16 tokens: key codes ~60 (8 k-blocks x (2 SHF + 4 LOP3 +
// 1 HMMA) + 4 LDS.128), side code ~12, logit epilogue ~16, P' fragments ~45 (hi/lo split,
// movmatrix, z_v and l sums), value codes ~80 (8 m-tiles x (4 PRMT + 4 LOP3 + 1 HMMA) + 8 LDS.128),
// plus per 64-token sub-tile ~250 for the Q' fragments, q.z, the softmax and the P' power of two.
// Measured (ncu, 32k, H200): lean executes ~1,835 warp instructions per 64-token sub-tile (28.7
// per token per KV head: staging address math ~20%, masks, runtime format switches, a hot loop
// of ~6k SASS instructions that misses the instruction cache); fixed ~1,460 (22.8) at 106 us
// (ncu, 1.76 GHz; profile and what was tried: docs/PERF.md).
// At ~2 IPC per SM that, not the ~45 us of moving 189 MB at copy bandwidth, sets the time.
//
// Instantiations: D in {64, 128} x NT in {1, 2} for variant 0 (base) plus D in {64, 128} x NT = 1
// for the ring4 / ring5 / lean / fixed variants (mma_min_blocks, HEADQ_MMA_VARIANT) = 12 kernels.
// Key bits, value bits x value groups per head (templated inner phases) are warp-uniform runtime
// switches per sub-tile, except in "fixed", where they are constants.

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "device_common.cuh"

namespace headq {
namespace cuda {
namespace {

constexpr int kThreadsM = 128;
constexpr int kWarpsM = kThreadsM / 32;
constexpr int kSub = 64;                   // tokens per warp per tile
constexpr int kTileM = kWarpsM * kSub;     // tokens per staged tile
constexpr int kSimtTile = 128;             // window tile of the SIMT kernel (decode_kernels.cu)

#if defined(HEADQ_MMA_NO_SUBNORMAL)
constexpr int kCodeShift = 0;   // codes enter the mma as normal fp16: code * 2^pos
#else
constexpr int kCodeShift = 24;  // codes enter the mma as fp16 subnormals: code * 2^(pos - 24)
#endif

__host__ __device__ constexpr int al16(int x) { return (x + 15) & ~15; }

// Independent HMMA accumulator chains of the key phase (2 or 4; D = 64 has 4 k-blocks).
// Measured at 32k (fixed): 2 chains 0.114 ms, 4 chains 0.119 ms (more spills: 180 vs 80 B).
#if !defined(HEADQ_MMA_KEY_CHAINS)
#define HEADQ_MMA_KEY_CHAINS 2
#endif
constexpr int kKeyChains = HEADQ_MMA_KEY_CHAINS;
static_assert(kKeyChains == 2 || kKeyChains == 4, "HEADQ_MMA_KEY_CHAINS: 2 or 4");

// uint2 slots per (head tile, k-block) row of the per-warp Q' fragments: the 32 lane slots plus
// 4 of padding, so that build_qfrag's stores (8 k-blocks x 4 lanes per instruction, rows apart)
// take the minimum 2 wavefronts instead of 8 (an unpadded row is 256 B: every k-block on the
// same banks). load_kf still reads 32 consecutive slots.
constexpr int kQfRow = 36;

// Channel (within a 16-channel key block) of k-index k, and the bit position (within its 16-bit
// half word) at which the lane finds its code. Lane t (= lane % 4) owns k = 2t, 2t+1 (a0/b0) and
// 2t+8, 2t+9 (a2/b1): for 2 bits they are channels t, t+8 of word w (mask 3 << 2t in each half)
// and t+4, t+12 (same mask on w >> 8); for 4 bits channels v, v+4 / v+2, v+6 (v = t & 1) of word
// t >> 1 of the block's two words.
__host__ __device__ constexpr int kmap_ch(int bits, int k) {
  return bits == 2 ? ((k & 7) >> 1) + 8 * (k & 1) + 4 * (k >> 3)
                   : 8 * ((k & 7) >> 2) + ((k >> 1) & 1) + 4 * (k & 1) + 2 * (k >> 3);
}
__host__ __device__ constexpr int kmap_pos(int bits, int k) {
  return bits == 2 ? 2 * ((k & 7) >> 1) : 4 * ((k >> 1) & 1);
}
// Side code j (within a 16-j block) of k-index k, and its bit position: 8 bits: bytes 0, 2 of
// word t (a0) and 1, 3 (a2, word >> 8); 4 bits: as 4-bit keys.
__host__ __device__ constexpr int zmap_j(int bits, int k) {
  return bits == 8 ? 4 * ((k & 7) >> 1) + 2 * (k & 1) + (k >> 3) : kmap_ch(4, k);
}
__host__ __device__ constexpr int zmap_pos(int bits, int k) { return bits == 8 ? 0 : kmap_pos(4, k); }

// Partials merged at the end of a split: the 4 warps' (L.red), then the split's window slice
// (win_mma; L.winr).
constexpr int kMergeSlots = kWarpsM + 1;

// ---------------------------------------------------------------------------------------------
// Shared-memory layout (bytes), identical on host and device.
struct MmaSmem {
  int qn;     // float [NG][D]  q * 2^-e_h (raw q during setup)
  int qk;     // float [NG][D]  qn * 2^-kmap_pos in key k-order, fragment-major: [kb][t][e]
              // = k-index 2t + (e & 1) + 8 (e >> 1) of block kb (one float4 per lane)
  int qzf;    // uint2 [NT][D/16][32]  hi/lo B fragments of qn (zero-point mma)
  int qu;     // float [NG][r]  sign * q.U (raw q)
  int hexp;   // int [NG]       e_h
  int qfrag;  // uint2 [warps][slots][NT][D/16][32]  per-warp Q' fragments of the key group(s)
  int slots;
  int stage0, stage_bytes;
  int kc, ks, kz, zc, zs, vc, vs, vz;  // offsets inside a stage buffer
  int red;                             // end-of-split merge (aliases the stages)
  int mbar;   // uint64_t [2]  mbarriers of the fixed variant's bulk copies (keys, values)
  int win;    // 16-bit [2][kMmaWindowPerSplit][D]  the split's window keys, values (win_mma)
  int winr;   // float [NG][D] + [NG][2]  the window slice's partial (merge slot kWarpsM; win_mma)
  int total;
};

// Kernel configurations (HEADQ_MMA_VARIANT, chosen per call on the host; NT = 2 always runs
// variant 0, whose 255 registers leave no room for more blocks):
//   0 "base":  two full stage buffers (tile t+1 loads during tile t), >= 3 blocks/SM (168 regs),
//              ~60 KB of shared memory per block at the benchmark shape: 12 warps/SM.
//   1 "ring4": one stage buffer used as a two-phase ring: the value part of tile t loads during
//              the key phase of tile t, the key part of tile t+1 during the value phase of tile t
//              (two block barriers per tile); ~37 KB per block, >= 4 blocks/SM (<= 128 regs):
//              16 warps/SM.
//   2 "ring5": as ring4 with >= 5 blocks/SM (<= 102 regs): 20 warps/SM.
//   3 "lean":  ring4 with fewer instructions per token: 2-bit value codes unpacked with one PRMT
//              per two fp16x2 operands (rows gid / gid+8 of an m-tile are two bit positions of
//              one byte: channels 4(gid>>1) + 2(gid&1) + {0, 1}, per-row output powers of two)
//              and, for sub-tiles with no masked token, the P' power of two from one LDS.64 +
//              HMNMX2 per lane instead of 8 row loads.
//   4 "fixed": lean compiled for one cache format, the library's default: 2-bit keys in groups
//              of 64 tokens, 2-bit values in groups of 64 channels, an 8-bit rank-8 side code
//              (mma_fixed_ok). Every size, offset and loop bound of the format is then a
//              compile-time constant: full tiles are staged by eight Hopper bulk copies (one
//              thread, cp.async.bulk on two mbarriers; unrolled cp.async before sm_90 or with
//              -DHEADQ_MMA_NO_BULK), the runtime format switches and their code paths disappear
//              (a hot loop about a third of lean's, which thrashed the instruction cache), group
//              indices are shifts. Other formats run lean.
//              Measured at 32k: 116 us vs lean's 135 us (gpu_decode.json, session 2; with the
//              bulk copies and the bank-conflict-free token order 99 vs 126 us); in an earlier
//              run (118 vs 148 us) a >= 5 blocks/SM build (96 registers, spills) took 123 us.
constexpr int kMmaVariants = 5;
constexpr int kMmaFixed = 4;
constexpr int kMmaDefaultVariant = kMmaFixed;  // fixed where the format allows, else lean (plan_decode_mma)
__host__ __device__ constexpr bool mma_ring(int V) { return V != 0; }
__host__ __device__ constexpr bool mma_lean(int V) { return V >= 3; }
// Variant 5 (internal, not a HEADQ_MMA_VARIANT name): "fixed" that also attends its split's
// slice of the dense window (win_mma; plan_decode_mma picks it), a kernel of its own so that
// the window code costs the other configurations nothing (its registers spill 64 B there).
constexpr int kMmaFixedWindow = 5;
__host__ __device__ constexpr bool mma_fixed(int V) {
  return V == kMmaFixed || V == kMmaFixedWindow;
}
__host__ __device__ constexpr bool mma_window(int V) { return V == kMmaFixedWindow; }
// Blocks per SM the fixed variant is compiled for (register cap 65536 / (128 * blocks)).
// Measured at 32k: 4 (128 registers, 80 B spills) 0.114 ms; 3 (168 registers, 32 B) 0.118 ms.
#if !defined(HEADQ_MMA_FIXED_MIN_BLOCKS)
#define HEADQ_MMA_FIXED_MIN_BLOCKS 4
#endif
__host__ __device__ constexpr int mma_min_blocks(int NT, int V) {
  return NT == 2 ? 2 : (V == 0 ? 3 : (V == 2 ? 5 : (mma_fixed(V) ? HEADQ_MMA_FIXED_MIN_BLOCKS : 4)));
}

// The format compiled into the "fixed" variant.
constexpr int kFixKBits = 2, kFixG = 64, kFixVBits = 2, kFixGv = 64, kFixZBits = 8, kFixR = 8;
__host__ __device__ inline bool mma_fixed_ok(const DecodeParams& p) {
  return p.kbits == kFixKBits && p.G == kFixG && p.vbits == kFixVBits && p.Gv == kFixGv &&
         p.z_codes.p != nullptr && p.zbits == kFixZBits && p.r == kFixR;
}
// p with the fixed format's fields as constants (the compiler folds them through every use).
template <int D>
__device__ __forceinline__ DecodeParams fix_params(const DecodeParams& p) {
  DecodeParams f = p;
  f.D = D;
  f.kbits = kFixKBits;
  f.G = kFixG;
  f.vbits = kFixVBits;
  f.Gv = kFixGv;
  f.zbits = kFixZBits;
  f.r = kFixR;
  return f;
}

__host__ __device__ inline MmaSmem mma_smem(const DecodeParams& p, int NT, bool ring, bool fixed) {
  const int D = p.D, NG = 4 * NT;
  const bool side = fixed || p.z_codes.p != nullptr;
  const int ngv = D / p.Gv;
  const int gpt = kTileM / p.G;
  MmaSmem s;
  int o = 0;
  s.qn = o;    o += al16(NG * D * 4);
  s.qk = o;    o += al16(NG * D * 4);
  s.qzf = o;   o += al16(NT * (D / 16) * 32 * 8);
  s.qu = o;    o += al16(NG * (side ? p.r : 1) * 4);
  s.hexp = o;  o += al16(NG * 4);
  s.slots = p.G == 32 ? 2 : 1;
  s.qfrag = o; o += kWarpsM * s.slots * NT * (D / 16) * kQfRow * 8;
  int b = 0;
  s.kc = b; b += al16(kTileM * D * p.kbits / 8);
  s.ks = b; b += al16(gpt * D * 2);
  s.kz = b; b += al16(gpt * D * 2);
  s.zc = b; b += side ? al16(kTileM * p.r * p.zbits / 8) + 16 : 0;  // lanes read past a row
  s.zs = b; b += side ? al16(kTileM * 2) : 0;
  s.vc = b; b += al16(kTileM * D * p.vbits / 8);
  s.vs = b; b += al16(kTileM * ngv * 2);
  s.vz = b; b += al16(kTileM * ngv * 2);
  s.stage0 = o;
  s.stage_bytes = b;
  s.red = o;
  const int red_bytes = kWarpsM * NG * (D + 2 + D / 32) * 4;  // (below the stages)
  const int nbuf = ring ? 1 : 2;
  o += (nbuf * b > red_bytes) ? nbuf * b : red_bytes;
  // Placed last: before stage0, the 16 bytes shifted every later offset and cost the general
  // variants ~100 B of spills (their layout arithmetic is done at run time).
  s.mbar = al16(o);
  o = s.mbar + 16;
  s.win = o;
  if (p.win_mma) o += 2 * kMmaWindowPerSplit * D * 2;
  s.winr = o;
  if (p.win_mma) o += al16(NG * (D + 2) * 4);
  s.total = o;
  return s;
}

// --------------------------------------------------------------------------- small helpers ---
// block_copy_async of a compile-time byte count (a multiple of 16): unrolled, constant offsets.
template <int NBYTES>
__device__ __forceinline__ void block_copy_async_n(unsigned char* dst, const char* src, int tid) {
  static_assert(NBYTES % 16 == 0, "whole 16-byte chunks");
  constexpr int kChunks = NBYTES / 16;
#pragma unroll
  for (int i = 0; i < (kChunks + kThreadsM - 1) / kThreadsM; ++i) {
    const int off = (i * kThreadsM + tid) * 16;
    if (kChunks % kThreadsM == 0 || off < NBYTES) cp_async16(dst + off, src + off);
  }
}

// A compile-time byte count for stage_fixed's region lists.
template <int N>
using Bytes = std::integral_constant<int, N>;

// The fixed variant's staging of one full tile part: the regions that regions(f) lists as
// f(dst, src, Bytes<n>{}) are copied by bulk copies that thread 0 issues on bar, announced as one
// byte total summed from the same list (KBULK), or by unrolled per-thread cp.async (before sm_90
// or with -DHEADQ_MMA_NO_BULK). One list serves all three uses, so the mbarrier's expected total
// cannot drift from the copies issued (a mismatch would hang the wait).
template <bool KBULK, typename Regions>
__device__ __forceinline__ void stage_fixed(const Regions& regions, uint64_t* bar, int tid) {
#if HEADQ_HAS_BULK
  if constexpr (KBULK) {
    if (tid == 0) {
      uint32_t total = 0;
      regions([&](unsigned char*, const char*, auto n) { total += decltype(n)::value; });
      mbar_expect_tx(bar, total);
      regions([&](unsigned char* dst, const char* src, auto n) {
        bulk_copy_g2s(dst, src, decltype(n)::value, bar);
      });
    }
    return;
  }
#endif
  regions([&](unsigned char* dst, const char* src, auto n) {
    block_copy_async_n<decltype(n)::value>(dst, src, tid);
  });
}

__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Transpose of an 8x8 b16 matrix held as the standard fragment (lane l: row l/4, cols 2(l%4)+{0,1}).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// fp16x2 bits of (a, b): a in the low half.
__device__ __forceinline__ uint32_t pack_h2(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// x truncated to 11 significant bits: exactly an fp16 value when |x| is in the fp16 normal range.
__device__ __forceinline__ float hi11(float x) { return __uint_as_float(__float_as_uint(x) & 0xFFFFE000u); }

// (hi, lo) fp16 pair of x: hi + lo == x to ~2^-22 relative.
__device__ __forceinline__ uint32_t pack_hilo(float x) {
  const float h = hi11(x);
  return pack_h2(h, x - h);
}

// Two masked codes as the fp16x2 tensor-core operand code * 2^(pos - kCodeShift).
__device__ __forceinline__ uint32_t code_h2(uint32_t x, uint32_t mask) {
#if defined(HEADQ_MMA_NO_SUBNORMAL)
  uint32_t y = (x & mask) | 0x64006400u;  // 1024 + code * 2^pos in each half
  __half2 h = __hsub2(*reinterpret_cast<__half2*>(&y), __floats2half2_rn(1024.0f, 1024.0f));
  return *reinterpret_cast<uint32_t*>(&h);
#else
  return x & mask;
#endif
}

// 2^x by one MUFU.EX2 (exp2f adds the denormal-result fixup; results below 2^-126 of the
// running max are flushed to 0, far below the fp32 sum they enter).
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// floor(log2(x)) of a normal, infinite or NaN float (128 for the last two).
__device__ __forceinline__ int exp_of(float x) {
  return static_cast<int>((__float_as_uint(x) >> 23) & 0xFFu) - 127;
}
// 2^e for e in [-126, 127].
__device__ __forceinline__ float pow2i(int e) { return __uint_as_float(static_cast<uint32_t>(e + 127) << 23); }

// Per-lane constants.
// Token (within a 16-token m-tile) of row j < 8 of the key-phase A fragment (row j + 8: that
// token + 8): 0, 4, 1, 5, 2, 6, 3, 7. Shared-memory bank conflicts decide it. Rows of 2-bit codes
// are 32 bytes at D = 128, so rows r and r + 4 share banks. After the movmatrix transpose the P'
// B fragment of lane t holds tokens tok(2t), tok(2t + 1) = t, t + 4 (k = 2t, 2t + 1) and those
// + 8, so each value-code load reads rows t (or t + 4, + 8, + 12) of the 4 lanes t: 4 rows on 4
// different bank groups. In token order (rows 2t, 2t + 1, ...) those loads conflicted 2-way:
// 35% of the kernel's shared-memory wavefronts; removing that made the fixed kernel ~8% faster
// at 32k. The key loads (lanes of a quarter-warp read rows tok(2p), tok(2p + 1) = p, p + 4) now
// conflict 2-way instead (~8% of the wavefronts); an order free of both conflicts exists
// (0, 5, 1, 6, 2, 7, 3, 4) but needs a lane-dependent row offset in the value phase: measured
// 0.0996 vs 0.0984 ms at 32k, 0.347 vs 0.341 ms at 128k (more spills), so not used.
__host__ __device__ constexpr int tok_of_row(int j) { return (j >> 1) + 4 * (j & 1); }

template <int NT>
struct MmaLane {
  int lane, gid, t4;
  int trow;                     // tok_of_row(gid): token of the lane's key-fragment rows
  float fh[NT];                 // 2^e_h * scale*log2(e) of head t4 (+4 nt)
  // side code
  float fsd[NT], szd[NT];       // 2^es * scale_log2, sign*off*sum(qU)*scale_log2 of head t4
  uint32_t sfrag[2][NT][2];     // B fragments of sign*qU (hi/lo), two 16-j blocks
  uint32_t zmask;
  int zword, zwpb, nrb, zrowb;  // lane's word in a 16-j block, words per block, blocks, row bytes
  // codes
  uint32_t kmask;
  uint32_t vsel0, vsel1, vmask;
  uint32_t vmask1;              // lean 2-bit values: mask of row gid + 8 (vmask: row gid)
  int vpos;
  int vchA, vchB;               // channel (in the m-tile) of output rows gid / gid + 8
  int vposA, vposB;             // their code bit positions
};

// Per-warp running state (lane-partial l and az; m identical in the lanes of a head).
template <int D, int NT>
struct WarpState {
  float m[NT], l[NT];
  float az[NT][D / 32];     // sum_t p_t * z_v[t, g]
  float acc[D / 16][NT][4]; // value mma accumulators (m-tile, head tile)
  int kv;                   // P' = p * s_v * 2^kv
};

// -------------------------------------------------------------------- key-group fragments ---
// Q' B fragments of one key group for all NG heads, computed by the warp into dst
// [NT][D/16][32] (lane order). Returns 2^e_g: q^ . (s * code) = C * 2^e_g for the mma result C.
template <int D, int NT, int KB>
__device__ __forceinline__ float build_qfrag(const __half* ksg,  // smem [D] f16 group scales
                                             const float* qk,    // smem [NG][D] k-order
                                             uint2* dst, int lane) {
  constexpr int NKB = D / 16, NC = D / 4, NG = 4 * NT;
  const int kb = lane >> 2, tt = lane & 3;
  const bool act = lane < NC;
  float s[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int k = 2 * tt + (e & 1) + 8 * (e >> 1);
    s[e] = act ? __half2float(ksg[kb * 16 + kmap_ch(KB, k)]) : 0.0f;
  }
  const float smax = warp_max(fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3])));
  const int E = smax > 0.0f ? exp_of(smax) : 0;
  if (act) {
    const float fs = pow2i(14 - E);  // s * fs < 2^15
#pragma unroll
    for (int e = 0; e < 4; ++e) s[e] *= fs;
#pragma unroll
    for (int hh = 0; hh < NG; ++hh) {
      const float4 qv = *reinterpret_cast<const float4*>(qk + hh * D + kb * 16 + 4 * tt);
      const float v0 = qv.x * s[0], v1 = qv.y * s[1], v2 = qv.z * s[2], v3 = qv.w * s[3];
      const float h0 = hi11(v0), h1 = hi11(v1), h2 = hi11(v2), h3 = hi11(v3);
      uint2* d = dst + ((hh >> 2) * NKB + kb) * kQfRow + tt;
      d[(2 * (hh & 3)) * 4] = make_uint2(pack_h2(h0, h1), pack_h2(h2, h3));
      d[(2 * (hh & 3) + 1) * 4] = make_uint2(pack_h2(v0 - h0, v1 - h1), pack_h2(v2 - h2, v3 - h3));
    }
  }
  return pow2i(min(E + kCodeShift - 14, 127));
}

// qz[nt] (lane's head t4 + 4 nt) = q^ . z of one key group, on the tensor cores.
template <int D, int NT>
__device__ __forceinline__ void qz_mma(const __half* kzg,  // smem [D] f16 group zeros
                                       const uint2* qzf,   // smem [NT][D/16][32]
                                       int lane, float (&qz)[NT]) {
  constexpr int NKB = D / 16;
  const int tt = lane & 3;
  float c[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
#pragma unroll
  for (int kb = 0; kb < NKB; ++kb) {
    const uint32_t a0 = *reinterpret_cast<const uint32_t*>(kzg + kb * 16 + 2 * tt);
    const uint32_t a2 = *reinterpret_cast<const uint32_t*>(kzg + kb * 16 + 2 * tt + 8);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint2 bq = qzf[(nt * NKB + kb) * 32 + lane];
      mma16816(c[nt], a0, a0, a2, a2, bq.x, bq.y);
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) qz[nt] = c[nt][0] + c[nt][1];
}

template <int D, int NT>
__device__ __forceinline__ void load_kf(const uint2* qf, uint32_t (&kf)[NT][D / 16][2], int lane) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      const uint2 u = qf[(nt * (D / 16) + kb) * kQfRow + lane];
      kf[nt][kb][0] = u.x;
      kf[nt][kb][1] = u.y;
    }
  }
}

// ------------------------------------------------------------------------------ key phase ---
// Logits (log2 units, -inf when masked) of the warp's 64 tokens: x[nt][2*mt + r] is token
// tl0 + 16 mt + tok_of_row(gid) + 8 r of the tile for head t4 + 4 nt.
// KFREG: hold the Q' fragments of the key group in registers over the 4 m-tiles (16 NT
// registers); otherwise each HMMA reads its fragment from shared memory (one LDS.64 per HMMA).
// ptxas showed no register/spill relief from false at 128 or 96 registers, so all variants use
// true; kept for experiments.
// MASK = false: the caller knows every token of the sub-tile is visible (fixed variant, whole
// sub-tiles inside [lo, hi)): no per-token masks (~55 instructions per sub-tile with value_phase).
template <int D, int NT, int KB, bool KFREG, bool MASK = true>
__device__ __forceinline__ void key_phase(const DecodeParams& p, const MmaLane<NT>& c,
                                          const unsigned char* sb, const MmaSmem& L, int tl0,
                                          int tok0, int lo, int hi, const float* qk,
                                          const uint2* qzf, uint2* qf, bool side,
                                          float (&x)[NT][8]) {
  constexpr int NKB = D / 16, KROWB = D * KB / 8;
  const __half* ks_t = reinterpret_cast<const __half*>(sb + L.ks);  // [groups][D]
  const __half* kz_t = reinterpret_cast<const __half*>(sb + L.kz);
  const int nslot = L.slots;
  float fg[2] = {0.0f, 0.0f}, qz[2][NT];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) qz[s][nt] = 0.0f;
    if (s < nslot) {
      const int gl = (tl0 + 32 * s) >> (p.G == 32 ? 5 : (p.G == 64 ? 6 : 7));  // tiles are group-aligned
      fg[s] = build_qfrag<D, NT, KB>(ks_t + gl * D, qk, qf + s * NT * NKB * kQfRow, c.lane);
      qz_mma<D, NT>(kz_t + gl * D, qzf, c.lane, qz[s]);
    }
  }
  __syncwarp();
  uint32_t kf[NT][KFREG ? NKB : 1][2];
  if constexpr (KFREG) load_kf<D, NT>(qf, kf, c.lane);
  const unsigned char* kc = sb + L.kc;
  const __half* zs_t = reinterpret_cast<const __half*>(sb + L.zs);
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    const bool second = nslot == 2 && mt >= 2;
    if constexpr (KFREG) {
      if (nslot == 2 && mt == 2) load_kf<D, NT>(qf + NT * NKB * kQfRow, kf, c.lane);
    }
    const uint2* qfm = qf + (second ? NT * NKB * kQfRow : 0) + c.lane;
    const float fgm = second ? fg[1] : fg[0];
    const int ra = tl0 + 16 * mt + c.trow, rb = ra + 8;
    uint32_t wa[NKB], wb[NKB];
    if constexpr (KB == 2) {
#pragma unroll
      for (int i = 0; i < NKB / 4; ++i) {
        const uint4 ua = reinterpret_cast<const uint4*>(kc + ra * KROWB)[i];
        const uint4 ub = reinterpret_cast<const uint4*>(kc + rb * KROWB)[i];
        wa[4 * i] = ua.x; wa[4 * i + 1] = ua.y; wa[4 * i + 2] = ua.z; wa[4 * i + 3] = ua.w;
        wb[4 * i] = ub.x; wb[4 * i + 1] = ub.y; wb[4 * i + 2] = ub.z; wb[4 * i + 3] = ub.w;
      }
    } else {
#pragma unroll
      for (int kb = 0; kb < NKB; ++kb) {
        wa[kb] = reinterpret_cast<const uint32_t*>(kc + ra * KROWB)[2 * kb + (c.t4 >> 1)];
        wb[kb] = reinterpret_cast<const uint32_t*>(kc + rb * KROWB)[2 * kb + (c.t4 >> 1)];
      }
    }
    // kKeyChains independent accumulator chains (k-block kb feeds chain kb % kKeyChains) cut
    // the dependent HMMA latency of the NKB k-blocks.
    float ck[kKeyChains][NT][4];
#pragma unroll
    for (int u = 0; u < kKeyChains; ++u) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) ck[u][nt][0] = ck[u][nt][1] = ck[u][nt][2] = ck[u][nt][3] = 0.0f;
    }
#pragma unroll
    for (int kb = 0; kb < NKB; ++kb) {
      const uint32_t a0 = code_h2(wa[kb], c.kmask), a1 = code_h2(wb[kb], c.kmask);
      const uint32_t a2 = code_h2(wa[kb] >> 8, c.kmask), a3 = code_h2(wb[kb] >> 8, c.kmask);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if constexpr (KFREG) {
          mma16816(ck[kb % kKeyChains][nt], a0, a1, a2, a3, kf[nt][kb][0], kf[nt][kb][1]);
        } else {
          const uint2 u = qfm[(nt * NKB + kb) * kQfRow];
          mma16816(ck[kb % kKeyChains][nt], a0, a1, a2, a3, u.x, u.y);
        }
      }
    }
    float xa[NT], xb[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      // (s * 2^e_g + qz) * fh as one FMA: 2^e_g * fh is exact (power of two), qz * fh one rounding.
      const float qzm = (second ? qz[1][nt] : qz[0][nt]) * c.fh[nt];
      const float fgh = fgm * c.fh[nt];
      float sa = ck[0][nt][0] + ck[0][nt][1], sb = ck[0][nt][2] + ck[0][nt][3];
#pragma unroll
      for (int u = 1; u < kKeyChains; ++u) {
        sa += ck[u][nt][0] + ck[u][nt][1];
        sb += ck[u][nt][2] + ck[u][nt][3];
      }
      xa[nt] = fmaf(sa, fgh, qzm);
      xb[nt] = fmaf(sb, fgh, qzm);
    }
    if (side) {
      const unsigned char* zc = sb + L.zc;
      float cs[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) cs[nt][0] = cs[nt][1] = cs[nt][2] = cs[nt][3] = 0.0f;
#pragma unroll
      for (int rbk = 0; rbk < 2; ++rbk) {
        if (rbk < c.nrb) {
          const int wo = 4 * (rbk * c.zwpb + c.zword);
          const uint32_t za = *reinterpret_cast<const uint32_t*>(zc + ra * c.zrowb + wo);
          const uint32_t zb = *reinterpret_cast<const uint32_t*>(zc + rb * c.zrowb + wo);
          const uint32_t a0 = code_h2(za, c.zmask), a1 = code_h2(zb, c.zmask);
          const uint32_t a2 = code_h2(za >> 8, c.zmask), a3 = code_h2(zb >> 8, c.zmask);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            mma16816(cs[nt], a0, a1, a2, a3, c.sfrag[rbk][nt][0], c.sfrag[rbk][nt][1]);
        }
      }
      const float zsa = __half2float(zs_t[ra]), zsb = __half2float(zs_t[rb]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        xa[nt] = fmaf(zsa, fmaf(cs[nt][0] + cs[nt][1], c.fsd[nt], -c.szd[nt]), xa[nt]);
        xb[nt] = fmaf(zsb, fmaf(cs[nt][2] + cs[nt][3], c.fsd[nt], -c.szd[nt]), xb[nt]);
      }
    }
    // lo <= tok0 + row < hi as one unsigned compare (hi - lo >= 0 is clamped)
    const unsigned span = static_cast<unsigned>(max(hi - lo, 0));
    const bool va = !MASK || static_cast<unsigned>(tok0 + ra - lo) < span;
    const bool vb = !MASK || static_cast<unsigned>(tok0 + rb - lo) < span;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      x[nt][2 * mt] = va ? xa[nt] : -INFINITY;
      x[nt][2 * mt + 1] = vb ? xb[nt] : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------- value phase ---
// NGV value groups per token as raw f16 words (0 when the token is masked).
template <int NGV>
struct HalfWords {
  uint32_t w[(NGV + 1) / 2];
  __device__ __forceinline__ void load(const __half* p, bool valid) {
    if constexpr (NGV == 1) {
      w[0] = valid ? static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) : 0u;
    } else if constexpr (NGV == 2) {
      w[0] = valid ? *reinterpret_cast<const uint32_t*>(p) : 0u;
    } else {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      w[0] = valid ? u.x : 0u;
      w[1] = valid ? u.y : 0u;
    }
  }
  __device__ __forceinline__ float get(int g) const {  // g compile-time after unrolling
    const uint32_t v = w[g >> 1];
    return __half2float(__ushort_as_half(static_cast<unsigned short>((g & 1) ? (v >> 16) : (v & 0xFFFFu))));
  }
};

// acc += codes^T . P' over the warp's 64 tokens; MPG value m-tiles (16 channels) per value group.
template <int D, int NT, int VB, int MPG, bool LEAN, bool MASK = true>  // MASK: see key_phase
__device__ __forceinline__ void value_phase(const MmaLane<NT>& c, const unsigned char* sb,
                                            const MmaSmem& L, int tl0, int tok0, int lo, int hi,
                                            const float (&alpha)[NT], const float (&pw)[NT][8],
                                            WarpState<D, NT>& st) {
  constexpr int NKB = D / 16, NGV = NKB / MPG, VROWB = D * VB / 8, NCH = VROWB / 16;
  const __half* vs_t = reinterpret_cast<const __half*>(sb + L.vs);  // [tokens][NGV]
  const __half* vz_t = reinterpret_cast<const __half*>(sb + L.vz);
  const unsigned span = static_cast<unsigned>(max(hi - lo, 0));
  const int row_lo = lo - tok0;
  auto valid_row = [&](int row) { return !MASK || static_cast<unsigned>(row - row_lo) < span; };

  // Power of two of P' for this sub-tile: the largest visible value scale times 2^kv < 2^15.
  float vmax = 0.0f;
  // lean, no masked token in the sub-tile (warp-uniform): the sub-tile's 64 * NGV scales are
  // contiguous (64 * NGV * 2 = 128 * NGV bytes, NGV in {1, 2, 4}), read as one 4/8/16-byte word
  // per lane and reduced in fp16 (max of non-negative fp16 values is exact).
  const bool full = LEAN && (!MASK || (tok0 + tl0 >= lo && tok0 + tl0 + kSub <= hi));
  if (full) {
    const __half* base = vs_t + tl0 * NGV;
    __half2 hm;
    if constexpr (NGV == 1) {
      hm = reinterpret_cast<const __half2*>(base)[c.lane];
    } else if constexpr (NGV == 2) {
      const uint2 u = reinterpret_cast<const uint2*>(base)[c.lane];
      hm = __hmax2(*reinterpret_cast<const __half2*>(&u.x), *reinterpret_cast<const __half2*>(&u.y));
    } else {
      const uint4 u = reinterpret_cast<const uint4*>(base)[c.lane];
      hm = __hmax2(__hmax2(*reinterpret_cast<const __half2*>(&u.x), *reinterpret_cast<const __half2*>(&u.y)),
                   __hmax2(*reinterpret_cast<const __half2*>(&u.z), *reinterpret_cast<const __half2*>(&u.w)));
    }
    vmax = fmaxf(__low2float(hm), __high2float(hm));
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int row = tl0 + 16 * (j >> 1) + c.trow + 8 * (j & 1);
      HalfWords<NGV> sv;
      sv.load(vs_t + row * NGV, valid_row(row));
#pragma unroll
      for (int g = 0; g < NGV; ++g) vmax = fmaxf(vmax, sv.get(g));
    }
  }
  // An infinite scale (a value group that overflowed fp16) counts as the largest finite one,
  // 65504 (2^15 > it): as Inf it would give 2^-114 here and an infinite undo factor at the
  // merge, making every channel of the warp's rows non-finite; so only its own group's channels
  // are (pp * Inf), as on the CPU, and every finite scale still fits.
  vmax = fminf(warp_max(vmax), 65504.0f);
  int kvn = st.kv;
  if (vmax > 0.0f) kvn = min(st.kv, 14 - exp_of(vmax));
  const float fk = exp2f(static_cast<float>(kvn - st.kv));
  bool need = fk != 1.0f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) need |= alpha[nt] != 1.0f;
  if (__any_sync(0xffffffffu, need)) {  // lazy rescale: only when a max rose or kv dropped
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float f = alpha[nt] * fk;
#pragma unroll
      for (int i = 0; i < NKB; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st.acc[i][nt][e] *= f;
      }
    }
  }
  st.kv = kvn;
  const float p2 = pow2i(kvn);

  const unsigned char* vc = sb + L.vc;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    // P' B fragments (tokens 16 mt + 0..15 of the sub-tile, columns (head, hi/lo)).
    uint32_t bf[NGV][NT][2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = tl0 + 16 * mt + c.trow + 8 * r;
      const bool ok = valid_row(row);
      HalfWords<NGV> sv, zv;
      sv.load(vs_t + row * NGV, ok);
      zv.load(vz_t + row * NGV, ok);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float pr = pw[nt][2 * mt + r];
        st.l[nt] += pr;
        const float pp = pr * p2;
#pragma unroll
        for (int g = 0; g < NGV; ++g) {
          bf[g][nt][r] = movmatrix_trans(pack_hilo(pp * sv.get(g)));
          st.az[nt][g] = fmaf(pr, zv.get(g), st.az[nt][g]);
        }
      }
    }
    // codes^T A fragments: channel rows gid / gid+8, k = 2t, 2t+1 / 2t+8, 2t+9 = tokens
    // tok_of_row(2t), tok_of_row(2t + 1) / those + 8.
    const unsigned char* r0 = vc + (tl0 + 16 * mt + c.t4) * VROWB;  // tok_of_row(2t) = t
    const unsigned char* r1 = r0 + 4 * VROWB;                          // tok_of_row(2t + 1) = t + 4
    const unsigned char* r2 = r0 + 8 * VROWB;
    const unsigned char* r3 = r1 + 8 * VROWB;
#pragma unroll
    for (int ch = 0; ch < NCH; ++ch) {
      const uint4 u0 = reinterpret_cast<const uint4*>(r0)[ch];
      const uint4 u1 = reinterpret_cast<const uint4*>(r1)[ch];
      const uint4 u2 = reinterpret_cast<const uint4*>(r2)[ch];
      const uint4 u3 = reinterpret_cast<const uint4*>(r3)[ch];
      const uint32_t w0[4] = {u0.x, u0.y, u0.z, u0.w}, w1[4] = {u1.x, u1.y, u1.z, u1.w};
      const uint32_t w2[4] = {u2.x, u2.y, u2.z, u2.w}, w3[4] = {u3.x, u3.y, u3.z, u3.w};
      if constexpr (VB == 2 && LEAN) {
        // rows gid / gid + 8 = two bit positions of the same byte: one PRMT per token pair.
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int i = 4 * ch + q;
          const uint32_t x01 = __byte_perm(w0[q], w1[q], c.vsel0);
          const uint32_t x23 = __byte_perm(w2[q], w3[q], c.vsel0);
          const uint32_t a0 = code_h2(x01, c.vmask), a1 = code_h2(x01, c.vmask1);
          const uint32_t a2 = code_h2(x23, c.vmask), a3 = code_h2(x23, c.vmask1);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            mma16816(st.acc[i][nt], a0, a1, a2, a3, bf[i / MPG][nt][0], bf[i / MPG][nt][1]);
        }
      } else if constexpr (VB == 2) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int i = 4 * ch + q;
          const uint32_t a0 = code_h2(__byte_perm(w0[q], w1[q], c.vsel0), c.vmask);
          const uint32_t a1 = code_h2(__byte_perm(w0[q], w1[q], c.vsel1), c.vmask);
          const uint32_t a2 = code_h2(__byte_perm(w2[q], w3[q], c.vsel0), c.vmask);
          const uint32_t a3 = code_h2(__byte_perm(w2[q], w3[q], c.vsel1), c.vmask);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            mma16816(st.acc[i][nt], a0, a1, a2, a3, bf[i / MPG][nt][0], bf[i / MPG][nt][1]);
        }
      } else {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int i = 2 * ch + q;
          const uint32_t a0 = code_h2(__byte_perm(w0[2 * q], w1[2 * q], c.vsel0), c.vmask);
          const uint32_t a1 = code_h2(__byte_perm(w0[2 * q + 1], w1[2 * q + 1], c.vsel0), c.vmask);
          const uint32_t a2 = code_h2(__byte_perm(w2[2 * q], w3[2 * q], c.vsel0), c.vmask);
          const uint32_t a3 = code_h2(__byte_perm(w2[2 * q + 1], w3[2 * q + 1], c.vsel0), c.vmask);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            mma16816(st.acc[i][nt], a0, a1, a2, a3, bf[i / MPG][nt][0], bf[i / MPG][nt][1]);
        }
      }
    }
  }
}

// The split's slice of the dense window (win_mma), attended while the split's first tile loads
// (before the streaming loop) and kept as merge slot kWarpsM in its own shared memory (L.winr):
// red [NG][D] (sum_w 2^(x_w - m) v_w), ml [NG][2] (m in log2 units, l); m = -inf for heads with
// nothing visible. Warp w takes heads w, w + 4, ...: the slice's (at most kMmaWindowPerSplit)
// dot products are computed together (lane-parallel over the channels, independent warp sums),
// then the softmax over the slice and the values of the lane's channels. A NaN key or value
// gives a NaN l or red entry, which the combine turns into a NaN row, as the window splits do
// (the merge keeps a NaN l also where the slice's only visible logits are NaN, m = -inf).
// Visibility as the window splits': w < n_window (less a few-token call's causal offset,
// window_end_of_row) and n_quant + w >= kv_start. Rows from L.win (16-bit, [2][slice][D]).
// The split's window slice (win_mma): tokens [*w_lo, *w_lo + *n) of the sequence's nw visible
// window tokens, ceil(nw / Sq) per split; the same where its rows are requested and attended.
__device__ __forceinline__ void window_slice_range(const DecodeParams& p, int b, int split,
                                                   int* nw, int* w_lo, int* n) {
  *nw = min(max(p.n_window[b], 0), p.W);
  const int per = (*nw + p.Sq - 1) / p.Sq;
  *w_lo = min(split * per, *nw);
  *n = min(per, *nw - *w_lo);
}

template <int D, int NG>
__device__ __forceinline__ void window_slice(const DecodeParams& p, const unsigned char* win,
                                             int b, int qh0, int nh, int split, int warp,
                                             int lane, float* red, float* ml) {
  constexpr int NJ = D / 32, NW = kMmaWindowPerSplit;
  const int nq = min(max(p.n_quant[b], 0), p.Tq);
  const int ks = p.kv_start != nullptr ? max(p.kv_start[b], 0) : 0;
  int nw, w_lo, n;
  window_slice_range(p, b, split, &nw, &w_lo, &n);
  const bool bf = p.dtype == DType::kBFloat16;
  const auto f16 = [bf](const unsigned char* row, int c) {
    const uint16_t u = reinterpret_cast<const uint16_t*>(row)[c];
    return bf ? __uint_as_float(static_cast<uint32_t>(u) << 16)
              : __half2float(__ushort_as_half(u));
  };
  for (int hh = warp; hh < NG; hh += kWarpsM) {
    float m = -INFINITY, l = 0.0f, acc[NJ];
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[j] = 0.0f;
    if (hh < nh && n > 0) {
      const int qh = qh0 + hh;
      const unsigned char* qrow =
          reinterpret_cast<const unsigned char*>(p.q.p + b * p.q.sb + qh * p.q.sh);
      float qv[NJ];
#pragma unroll
      for (int j = 0; j < NJ; ++j) qv[j] = f16(qrow, 32 * j + lane);
      const int w_end = p.qtok > 1 ? window_end_of_row(nw, p.qtok, qh) : nw;
      // Visible slice tokens (warp-uniform bits). Rows past n hold stale bytes: their dot
      // products are computed with the others and discarded by the select.
      unsigned vis = 0u;
#pragma unroll
      for (int i = 0; i < NW; ++i) {
        const int w = w_lo + i;
        if (i < n && w < w_end && nq + w >= ks) vis |= 1u << i;
      }
      float x[NW];
#pragma unroll
      for (int i = 0; i < NW; ++i) {
        const unsigned char* krow = win + i * D * 2;
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; ++j) dot = fmaf(qv[j], f16(krow, 32 * j + lane), dot);
        x[i] = dot;
      }
#pragma unroll
      for (int i = 0; i < NW; ++i) {
        const float sum = warp_sum(x[i]);  // every lane takes part: vis only selects
        x[i] = (vis >> i) & 1u ? sum * p.scale_log2 : -INFINITY;
      }
#pragma unroll
      for (int i = 0; i < NW; ++i) m = fmaxf(m, x[i]);  // NaN logits do not move m, as before
      const float msub = m == -INFINITY ? 0.0f : m;
#pragma unroll
      for (int i = 0; i < NW; ++i) {
        if ((vis >> i) & 1u) {  // warp-uniform
          const float pw = exp2f(x[i] - msub);
          l += pw;
          const unsigned char* vrow = win + (NW + i) * D * 2;
#pragma unroll
          for (int j = 0; j < NJ; ++j) acc[j] = fmaf(pw, f16(vrow, 32 * j + lane), acc[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < NJ; ++j) red[hh * D + 32 * j + lane] = acc[j];
    if (lane == 0) {
      ml[hh * 2] = m;
      ml[hh * 2 + 1] = l;
    }
  }
}

// --------------------------------------------------------------------------- split kernel ---
// 3 blocks/SM for NT = 1 (<= 168 registers; ~60 KB of shared memory per block at the benchmark
// shape), 2 for NT = 2 (64 accumulators + 32 fragment registers per lane).
template <int D, int NT, int V>
__global__ void __launch_bounds__(kThreadsM, mma_min_blocks(NT, V))
decode_mma_kernel(const DecodeParams p_in) {
  // Window splits launched after this grid (pdl_*, device_common.cuh) may be scheduled from now
  // on, into the slots this grid's blocks leave free: they fill the tail of this wave. Without
  // window splits the combine follows, triggered after the streaming loop below.
  if (p_in.S > p_in.Sq) pdl_launch_dependents();
  constexpr bool kFix = mma_fixed(V);
  constexpr bool kWin = mma_window(V);  // p.win_mma == 1 exactly for this variant
  // Full tiles of the fixed variant are staged by bulk copies (TMA) on two mbarriers instead of
  // per-thread cp.async (-DHEADQ_MMA_NO_BULK: cp.async, for A/B runs).
#if HEADQ_HAS_BULK && !defined(HEADQ_MMA_NO_BULK)
  constexpr bool kBulk = kFix;
#else
  constexpr bool kBulk = false;
#endif
  // Other variants read p_in directly (a local copy costs them registers: ptxas keeps the
  // copied fields live instead of reloading them from the parameter bank).
  DecodeParams pfix;
  if constexpr (kFix) pfix = fix_params<D>(p_in);
  const DecodeParams& p = kFix ? pfix : p_in;
  constexpr int NG = 4 * NT;
  constexpr int NKB = D / 16;
  constexpr int NGVMAX = D / 32;
  constexpr bool kRing = mma_ring(V);
  constexpr bool kLean = mma_lean(V);
  extern __shared__ __align__(16) unsigned char smem[];
  const MmaSmem L = mma_smem(p, NT, kRing, kFix);
  float* qn = reinterpret_cast<float*>(smem + L.qn);     // [NG][D]
  float* qk = reinterpret_cast<float*>(smem + L.qk);     // [NG][D] k-order
  uint2* qzf = reinterpret_cast<uint2*>(smem + L.qzf);   // [NT][NKB][32]
  float* qu_s = reinterpret_cast<float*>(smem + L.qu);   // [NG][r]
  int* hexp = reinterpret_cast<int*>(smem + L.hexp);     // [NG]

  const int split = blockIdx.x;
  const int h = blockIdx.y / p.nchunk;
  const int chunk = blockIdx.y % p.nchunk;
  const int b = blockIdx.z;
  const int qh0 = h * p.ratio + chunk * NG;
  const int nh = min(NG, p.ratio - chunk * NG);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nq = min(max(p.n_quant[b], 0), p.Tq);
  const int ks = p.kv_start != nullptr ? max(p.kv_start[b], 0) : 0;
  const bool side = kFix || p.z_codes.p != nullptr;  // fixed: launched only with a side code
  uint2* qf = reinterpret_cast<uint2*>(smem + L.qfrag) + warp * L.slots * NT * NKB * kQfRow;

  int s0, s1;  // this block's tokens: the length's tiles spread over the Sq splits
  split_range(split, p.Sq, nq, kTileM, &s0, &s1);
  const int lo = max(s0, ks);

  // The split's slice of the dense window (win_mma): ceil(nw / Sq) tokens per split, their key
  // and value rows requested now (cp.async into L.win, the oldest cp.async group) so that they
  // land during the setup; they are attended once the first tile is requested (attend_window).
  if constexpr (kWin) {  // (p_in: the parameter bank, no registers held)
    int nw, w_lo, n;
    window_slice_range(p_in, b, split, &nw, &w_lo, &n);
    constexpr int kPieces = D * 2 / 16;  // 16-byte pieces per row
    char* wk = reinterpret_cast<char*>(smem + L.win);
    char* wv = wk + kMmaWindowPerSplit * D * 2;
    const char* gk = p_in.k_window.p + b * p_in.k_window.sb + h * p_in.k_window.sh;
    const char* gv = p_in.v_window.p + b * p_in.v_window.sb + h * p_in.v_window.sh;
    for (int idx = tid; idx < 2 * n * kPieces; idx += kThreadsM) {
      const bool is_v = idx >= n * kPieces;
      const int j = is_v ? idx - n * kPieces : idx, row = j / kPieces, pc = j % kPieces;
      const char* g = (is_v ? gv : gk) +
                      static_cast<int64_t>(w_lo + row) * (is_v ? p_in.v_window.st : p_in.k_window.st);
      cp_async16((is_v ? wv : wk) + row * D * 2 + pc * 16, g + pc * 16);
    }
    cp_async_commit();
  }

  static_assert(!kBulk || kRing, "bulk staging is written for the ring pipeline");
  uint64_t* mbar = reinterpret_cast<uint64_t*>(smem + L.mbar);  // [2] keys, values (kBulk)
#if HEADQ_HAS_BULK
  if constexpr (kBulk) {
    if (tid == 0) {
      mbar_init(&mbar[0]);
      mbar_init(&mbar[1]);
    }  // the setup's block barriers below order the init before any use
  }
#endif

  // ---- setup: q, its per-head power of two, k-order table, q.z fragments, side code ----
  // fixed: the basis loads of q.U below (one round: NG * r = 32 pairs) are issued before q's,
  // so that the two global latencies overlap. (Only there: in the general variants the same
  // hoist moved their register allocation.)
  float uf[kFix ? D / 4 : 1];
  if constexpr (kFix) {
    static_assert(NG * kFixR == kThreadsM / 4, "fixed: q.U in one round of pairs");
    const float* u = p.basis + static_cast<int64_t>(h) * D * kFixR;
    const int j = (tid >> 2) % kFixR, q4 = tid & 3;
#pragma unroll
    for (int i = 0; i < D / 4; ++i) uf[i] = u[(4 * i + q4) * kFixR + j];
  }
  for (int idx = tid; idx < NG * D; idx += kThreadsM) {
    const int hh = idx / D, cc = idx % D;
    qn[idx] = hh < nh ? load_as_float(p.q.p + b * p.q.sb + static_cast<int64_t>(qh0 + hh) * p.q.sh,
                                      p.dtype, cc)
                      : 0.0f;
  }
  __syncthreads();
  if (side) {
    // qU[hh][j] = q[hh] . U[:, j]: 4 threads per (hh, j) pair, thread q4 summing channels
    // q4, q4 + 4, ... (a warp's loads of one step are 32 consecutive floats of U when r = 8),
    // every load of the D/4 steps issued before the sums, then 2 shuffles. Rounds of 32 pairs
    // keep the shuffles warp-uniform.
    const float* u = p.basis + static_cast<int64_t>(h) * D * p.r;  // [D, r]
    const int q4 = tid & 3;
    const int npairs = NG * p.r;
    for (int base = 0; base < npairs; base += kThreadsM / 4) {
      const int pair = base + (tid >> 2);
      const bool ok = pair < npairs;
      const int hh = ok ? pair / p.r : 0, j = ok ? pair % p.r : 0;
      float uv[D / 4];
#pragma unroll
      for (int i = 0; i < D / 4; ++i) {
        if constexpr (kFix) uv[i] = uf[i];
        else uv[i] = ok ? u[(4 * i + q4) * p.r + j] : 0.0f;
      }
      float a = 0.0f;
#pragma unroll
      for (int i = 0; i < D / 4; ++i) a = fmaf(qn[hh * D + 4 * i + q4], uv[i], a);
      a += __shfl_xor_sync(0xffffffffu, a, 1);
      a += __shfl_xor_sync(0xffffffffu, a, 2);
      if (ok && q4 == 0) qu_s[pair] = p.sign * a;
    }
  }
  for (int hh = warp; hh < NG; hh += kWarpsM) {
    float mx = 0.0f;
    for (int cc = lane; cc < D; cc += 32) mx = fmaxf(mx, fabsf(qn[hh * D + cc]));
    mx = warp_max(mx);
    int e = 0;
    if (mx > 0.0f && mx <= 3.402823466e38f) frexpf(mx, &e);  // mx * 2^-e in [0.5, 1)
    if (lane == 0) hexp[hh] = e;
  }
  __syncthreads();
  for (int idx = tid; idx < NG * D; idx += kThreadsM) qn[idx] = ldexpf(qn[idx], -hexp[idx / D]);
  __syncthreads();
  for (int idx = tid; idx < NG * D; idx += kThreadsM) {  // fragment-major (MmaSmem::qk)
    const int hh = idx / D, kk = idx % D, tt = (kk & 15) >> 2, e = kk & 3;
    const int k = 2 * tt + (e & 1) + 8 * (e >> 1);
    const int ch = (kk & ~15) + kmap_ch(p.kbits, k);
    qk[idx] = ldexpf(qn[hh * D + ch], -kmap_pos(p.kbits, k));
  }
  for (int e = tid; e < NT * NKB * 32; e += kThreadsM) {
    const int nt = e / (NKB * 32), kb = (e / 32) % NKB, ln = e & 31;
    const int head = nt * 4 + ((ln >> 2) >> 1), lo_part = (ln >> 2) & 1, tt = ln & 3;
    const float* qr = qn + head * D + kb * 16 + 2 * tt;
    float v[4] = {qr[0], qr[1], qr[8], qr[9]};
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = lo_part ? v[i] - hi11(v[i]) : hi11(v[i]);
    qzf[e] = make_uint2(pack_h2(v[0], v[1]), pack_h2(v[2], v[3]));
  }
  __syncthreads();

  MmaLane<NT> c;
  c.lane = lane;
  c.gid = lane >> 2;
  c.trow = tok_of_row(c.gid);
  c.t4 = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) c.fh[nt] = ldexpf(p.scale_log2, hexp[nt * 4 + c.t4]);
  c.kmask = p.kbits == 2 ? 0x00030003u << (2 * c.t4) : 0x000F000Fu << (4 * (c.t4 & 1));
  if (p.vbits == 2) {
    const int by = c.gid >> 2;
    c.vsel0 = static_cast<uint32_t>(by | ((4 + by) << 8));
    c.vsel1 = static_cast<uint32_t>((2 + by) | ((6 + by) << 8));
    c.vmask = 0x00030003u << (2 * (c.gid & 3));
    c.vpos = 2 * (c.gid & 3);
    c.vchA = c.gid;
    c.vchB = c.gid + 8;
    c.vposA = c.vposB = c.vpos;
    if constexpr (kLean) {
      // byte gid >> 1 of the m-tile's word (channels 4 (gid >> 1) + 0..3 at bits 0, 2, 4, 6):
      // row gid takes bits 4 (gid & 1), row gid + 8 the next code.
      const int bl = c.gid >> 1;
      c.vsel0 = c.vsel1 = static_cast<uint32_t>(bl | ((4 + bl) << 8));
      c.vposA = 4 * (c.gid & 1);
      c.vposB = c.vposA + 2;
      c.vmask = 0x00030003u << c.vposA;
      c.vchA = 4 * bl + 2 * (c.gid & 1);
      c.vchB = c.vchA + 1;
    }
  } else {
    const int by = c.gid >> 1;
    c.vsel0 = c.vsel1 = static_cast<uint32_t>(by | ((4 + by) << 8));
    c.vmask = 0x000F000Fu << (4 * (c.gid & 1));
    c.vpos = 4 * (c.gid & 1);
    c.vchA = c.gid;
    c.vchB = c.gid + 8;
    c.vposA = c.vposB = c.vpos;
  }
  c.vmask1 = 0x00030003u << c.vposB;
  c.nrb = 0;
  c.zrowb = 4;
  c.zword = 0;
  c.zwpb = 0;
  c.zmask = 0;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    c.fsd[nt] = 0.0f;
    c.szd[nt] = 0.0f;
#pragma unroll
    for (int rbk = 0; rbk < 2; ++rbk) c.sfrag[rbk][nt][0] = c.sfrag[rbk][nt][1] = 0u;
  }
  if (side) {
    const int zb = p.zbits, r = p.r;
    c.nrb = (r + 15) / 16;
    c.zrowb = r * zb / 8;
    c.zword = zb == 8 ? c.t4 : (c.t4 >> 1);
    c.zwpb = zb == 8 ? 4 : 2;
    c.zmask = zb == 8 ? 0x00FF00FFu : (0x000F000Fu << (4 * (c.t4 & 1)));
    const float off = zb == 8 ? 128.0f : 8.0f;
    // es: max_j |qU| * 2^(kCodeShift - es) in [2^14, 2^15) per head.
    auto head_es = [&](int head) {
      float mx = 0.0f;
      for (int j = 0; j < r; ++j) mx = fmaxf(mx, fabsf(qu_s[head * r + j]));
      int e = 0;
      if (mx > 0.0f && mx <= 3.402823466e38f) frexpf(mx, &e);  // mx in [2^(e-1), 2^e)
      return e - 1 + kCodeShift - 14;
    };
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int hs = nt * 4 + c.t4;  // the lane's logit head
      float su = 0.0f;
      for (int j = 0; j < r; ++j) su += qu_s[hs * r + j];
      c.fsd[nt] = ldexpf(p.scale_log2, head_es(hs));
      c.szd[nt] = off * su * p.scale_log2;
      const int hf = nt * 4 + (c.gid >> 1), part = c.gid & 1;  // the lane's B-fragment column
      const int es = head_es(hf);
#pragma unroll
      for (int rbk = 0; rbk < 2; ++rbk) {
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int k = 2 * c.t4 + (e & 1) + 8 * (e >> 1);
          const int j = rbk * 16 + zmap_j(zb, k);
          const float a = j < r ? ldexpf(qu_s[hf * r + j], kCodeShift - zmap_pos(zb, k) - es) : 0.0f;
          v[e] = part ? a - hi11(a) : hi11(a);
        }
        c.sfrag[rbk][nt][0] = pack_h2(v[0], v[1]);
        c.sfrag[rbk][nt][1] = pack_h2(v[2], v[3]);
      }
    }
  }

  WarpState<D, NT> st;
  st.kv = 127;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    st.m[nt] = -INFINITY;
    st.l[nt] = 0.0f;
#pragma unroll
    for (int g = 0; g < NGVMAX; ++g) st.az[nt][g] = 0.0f;
#pragma unroll
    for (int i = 0; i < NKB; ++i) st.acc[i][nt][0] = st.acc[i][nt][1] = st.acc[i][nt][2] = st.acc[i][nt][3] = 0.0f;
  }

  // The window slice (kWin), into merge slot kWarpsM (L.winr): after the setup, while the first
  // tile loads. Its rows are the oldest cp.async group; with first_tile_pending the newest group
  // (the first tile's cp.async pieces, if it is not a bulk-copied full tile) stays in flight.
  float* winr = reinterpret_cast<float*>(smem + L.winr);  // [NG][D], then ml [NG][2]
  auto attend_window = [&](bool first_tile_pending) {
    if constexpr (kWin) {
      if (first_tile_pending) cp_async_wait_one();
      else cp_async_wait_all();
      __syncthreads();  // every thread's row pieces have landed
      window_slice<D, NG>(p_in, smem + L.win, b, qh0, nh, split, warp, lane, winr, winr + NG * D);
    }
  };
  static_assert(!kWin || kRing, "the window slice is attended in the ring pipeline");

  if (lo < s1) {
    const PackedStreams<D> ps(p, b, h, side, /*vcodes=*/true);

    // Staged range of the tile at t0: whole 16-token chunks up to the capacity (Tq % 32 == 0).
    auto staged_end = [&](int t0) { return min((min(t0 + kTileM, s1) + 15) & ~15, p.Tq); };
    auto stage_keys = [&](int t0, int buf) {  // key codes, scales, zeros, side code
      const int tc = staged_end(t0);
      unsigned char* sb = smem + L.stage0 + buf * L.stage_bytes;
      if constexpr (kFix) {
        if (tc - t0 == kTileM) {  // a full, group-aligned tile: constant sizes
          constexpr int kKrow = D * kFixKBits / 8, kZrow = kFixR * kFixZBits / 8;
          constexpr int kGroups = kTileM / kFixG;
          const int g0 = t0 / kFixG;
          stage_fixed<kBulk>([&](auto&& f) {  // on mbar[0]
            f(sb + L.kc, ps.kc + static_cast<int64_t>(t0) * kKrow, Bytes<kTileM * kKrow>{});
            f(sb + L.ks, ps.ks + static_cast<int64_t>(g0) * D * 2, Bytes<kGroups * D * 2>{});
            f(sb + L.kz, ps.kz + static_cast<int64_t>(g0) * D * 2, Bytes<kGroups * D * 2>{});
            f(sb + L.zc, ps.zc + static_cast<int64_t>(t0) * kZrow, Bytes<kTileM * kZrow>{});
            f(sb + L.zs, ps.zs + static_cast<int64_t>(t0) * 2, Bytes<kTileM * 2>{});
          }, &mbar[0], tid);
          return;
        }
      }
      ps.stage_keys(sb, L, t0, tc, p.G, side, tid, kThreadsM);
    };
    auto stage_values = [&](int t0, int buf) {  // value codes, scales, zeros
      const int n = staged_end(t0) - t0;
      unsigned char* sb = smem + L.stage0 + buf * L.stage_bytes;
      if constexpr (kFix) {
        if (n == kTileM) {
          constexpr int kVrow = D * kFixVBits / 8, kNgv = D / kFixGv;
          stage_fixed<kBulk>([&](auto&& f) {  // on mbar[1]
            f(sb + L.vc, ps.vc + static_cast<int64_t>(t0) * kVrow, Bytes<kTileM * kVrow>{});
            f(sb + L.vs, ps.vs + static_cast<int64_t>(t0) * kNgv * 2, Bytes<kTileM * kNgv * 2>{});
            f(sb + L.vz, ps.vz + static_cast<int64_t>(t0) * kNgv * 2, Bytes<kTileM * kNgv * 2>{});
          }, &mbar[1], tid);
          return;
        }
      }
      ps.stage_values(sb, L, t0, n, D / p.Gv, tid, kThreadsM);
    };

    const int mpg = p.Gv / 16;
    const int tl0 = warp * kSub;
    // Key phase + online softmax of the warp's sub-tile (per head: lanes of equal t4 hold the
    // head's tokens).
    // fixed: sub-tiles wholly inside [lo, s1) run the key and value phases without token masks.
    auto whole = [&](int t0) { return kFix && t0 + tl0 >= lo && t0 + tl0 + kSub <= s1; };
    auto key_softmax = [&](const unsigned char* sb, int t0, float (&alpha)[NT], float (&pw)[NT][8]) {
      float x[NT][8];
      if constexpr (kFix) {
        if (whole(t0)) key_phase<D, NT, kFixKBits, true, false>(p, c, sb, L, tl0, t0, lo, s1, qk, qzf, qf, side, x);
        else key_phase<D, NT, kFixKBits, true>(p, c, sb, L, tl0, t0, lo, s1, qk, qzf, qf, side, x);
      } else if (p.kbits == 2) {
        key_phase<D, NT, 2, true>(p, c, sb, L, tl0, t0, lo, s1, qk, qzf, qf, side, x);
      } else {
        key_phase<D, NT, 4, true>(p, c, sb, L, tl0, t0, lo, s1, qk, qzf, qf, side, x);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float mx = x[nt][0];
#pragma unroll
        for (int j = 1; j < 8; ++j) mx = fmaxf(mx, x[nt][j]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float mnew = fmaxf(st.m[nt], mx);
        alpha[nt] = mnew == -INFINITY ? 1.0f : exp2f(st.m[nt] - mnew);
        st.m[nt] = mnew;
        // A masked logit is -inf and ex2(-inf - m) = +0 for finite m; only a head with nothing
        // visible yet (mnew = -inf) needs another subtrahend (-inf - 0 = -inf -> 0, where
        // -inf - -inf would be NaN). One select per head instead of one per logit.
        const float msub = mnew == -INFINITY ? 0.0f : mnew;
#pragma unroll
        for (int j = 0; j < 8; ++j) pw[nt][j] = ex2_ftz(x[nt][j] - msub);
        st.l[nt] *= alpha[nt];
#pragma unroll
        for (int g = 0; g < NGVMAX; ++g) st.az[nt][g] *= alpha[nt];
      }
    };
    auto values = [&](const unsigned char* sb, int t0, const float (&alpha)[NT], const float (&pw)[NT][8]) {
      if constexpr (kFix) {
        constexpr int kMpg = kFixGv / 16;
        if (whole(t0)) value_phase<D, NT, kFixVBits, kMpg, true, false>(c, sb, L, tl0, t0, lo, s1, alpha, pw, st);
        else value_phase<D, NT, kFixVBits, kMpg, true>(c, sb, L, tl0, t0, lo, s1, alpha, pw, st);
      } else if (p.vbits == 2) {
        if (mpg == 2) value_phase<D, NT, 2, 2, kLean>(c, sb, L, tl0, t0, lo, s1, alpha, pw, st);
        else if (mpg == 4) value_phase<D, NT, 2, 4, kLean>(c, sb, L, tl0, t0, lo, s1, alpha, pw, st);
        else if constexpr (D == 128) value_phase<D, NT, 2, 8, kLean>(c, sb, L, tl0, t0, lo, s1, alpha, pw, st);
      } else {
        if (mpg == 2) value_phase<D, NT, 4, 2, kLean>(c, sb, L, tl0, t0, lo, s1, alpha, pw, st);
        else if (mpg == 4) value_phase<D, NT, 4, 4, kLean>(c, sb, L, tl0, t0, lo, s1, alpha, pw, st);
        else if constexpr (D == 128) value_phase<D, NT, 4, 8, kLean>(c, sb, L, tl0, t0, lo, s1, alpha, pw, st);
      }
    };

    const int t_first = s0 + (lo - s0) / kTileM * kTileM;  // tiles before kv_start are skipped
    if constexpr (!kRing) {
      stage_keys(t_first, 0);
      stage_values(t_first, 0);
      cp_async_commit();
      int buf = 0;
      for (int t0 = t_first; t0 < s1; t0 += kTileM, buf ^= 1) {
        cp_async_wait_all();
        __syncthreads();  // tile t0 staged; the previous tile's readers are done
        if (t0 + kTileM < s1) {
          stage_keys(t0 + kTileM, buf ^ 1);
          stage_values(t0 + kTileM, buf ^ 1);
          cp_async_commit();
        }
        const unsigned char* sb = smem + L.stage0 + buf * L.stage_bytes;
        if (t0 + tl0 + kSub <= lo || t0 + tl0 >= s1) continue;  // warp-uniform: nothing visible
        float alpha[NT], pw[NT][8];
        key_softmax(sb, t0, alpha, pw);
        values(sb, t0, alpha, pw);
      }
    } else {
      // One stage buffer as a two-phase ring: V(t) loads during the key phase of t, K(t+1)
      // during the value phase of t. Every thread passes both barriers of every tile.
      // kBulk: full tiles arrive by bulk copies on mbar[0] (keys) / mbar[1] (values), whose
      // phases alternate parity with each full tile; partial tiles by cp.async as before. Warp 0
      // alone polls the mbarrier (acquire); the block barrier right after passes the landed
      // bytes on to the other warps, which wait in the barrier instead of spinning.
      const unsigned char* sb = smem + L.stage0;
      uint32_t kpar = 0, vpar = 0;
      auto wait_bulk = [&](bool full, int which, uint32_t& par) {
#if HEADQ_HAS_BULK
        if constexpr (kBulk) {
          if (full) {  // block-uniform, as when the copies were issued
            if (warp == 0) mbar_wait(&mbar[which], par);
            par ^= 1u;
          }
        }
#endif
      };
      stage_keys(t_first, 0);
      cp_async_commit();
      attend_window(true);  // (kWin) while the first tile's copies are in flight
      for (int t0 = t_first; t0 < s1; t0 += kTileM) {
        const bool full = staged_end(t0) - t0 == kTileM;  // staged by bulk copies (kBulk)
        cp_async_wait_all();
        wait_bulk(full, 0, kpar);
        __syncthreads();  // K(t0) staged; all warps are done with the value part of t0 - 1
        stage_values(t0, 0);
        cp_async_commit();
        const bool act = !(t0 + tl0 + kSub <= lo || t0 + tl0 >= s1);  // warp-uniform
        float alpha[NT], pw[NT][8];
        if (act) key_softmax(sb, t0, alpha, pw);
        cp_async_wait_all();
        wait_bulk(full, 1, vpar);
        __syncthreads();  // V(t0) staged; all warps are done with the key part of t0
        if (t0 + kTileM < s1) {
          stage_keys(t0 + kTileM, 0);
          cp_async_commit();
        }
        if (act) values(sb, t0, alpha, pw);
      }
    }
  } else {
    attend_window(false);
  }

  // ---- end of split: merge the 4 warps ----
  pdl_launch_dependents();  // the combine may be scheduled (it waits for this grid)
  __syncthreads();  // staging buffers are free (red aliases them)
  float* red = reinterpret_cast<float*>(smem + L.red);  // [kWarpsM][NG][D]
  float* mlw = red + kWarpsM * NG * D;                   // [kWarpsM][NG][2]
  float* azw = mlw + kWarpsM * NG * 2;                   // [kWarpsM][NG][NGVMAX]
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    float l = st.l[nt];
    l += __shfl_xor_sync(0xffffffffu, l, 4);
    l += __shfl_xor_sync(0xffffffffu, l, 8);
    l += __shfl_xor_sync(0xffffffffu, l, 16);
    const int head = nt * 4 + c.t4;
    if (c.gid == 0) {
      mlw[(warp * NG + head) * 2] = st.m[nt];
      mlw[(warp * NG + head) * 2 + 1] = l;
    }
#pragma unroll
    for (int g = 0; g < NGVMAX; ++g) {
      float a = st.az[nt][g];
      a += __shfl_xor_sync(0xffffffffu, a, 4);
      a += __shfl_xor_sync(0xffffffffu, a, 8);
      a += __shfl_xor_sync(0xffffffffu, a, 16);
      if (c.gid == 0) azw[(warp * NG + head) * NGVMAX + g] = a;
    }
    // Undo the operand powers of two: code * 2^(vpos - kCodeShift) and P' * 2^kv.
    const float fvA = ldexpf(1.0f, kCodeShift - c.vposA - st.kv);
    const float fvB = ldexpf(1.0f, kCodeShift - c.vposB - st.kv);
    float* o = red + (warp * NG + head) * D;
#pragma unroll
    for (int i = 0; i < NKB; ++i) {
      o[16 * i + c.vchA] = (st.acc[i][nt][0] + st.acc[i][nt][1]) * fvA;
      o[16 * i + c.vchB] = (st.acc[i][nt][2] + st.acc[i][nt][3]) * fvB;
    }
  }
  __syncthreads();
  // Merge slot kWarpsM: the split's window slice (win_mma only), in L.winr (no z_v sums).
  constexpr int nslots = kWin ? kMergeSlots : kWarpsM;
  const auto slot_m = [&](int w, int hh) {
    return kWin && w == kWarpsM ? winr[NG * D + hh * 2] : mlw[(w * NG + hh) * 2];
  };
  const auto slot_l = [&](int w, int hh) {
    return kWin && w == kWarpsM ? winr[NG * D + hh * 2 + 1] : mlw[(w * NG + hh) * 2 + 1];
  };
  const auto slot_o = [&](int w, int hh, int cc, int g) {
    return kWin && w == kWarpsM ? winr[hh * D + cc]
                                : red[(w * NG + hh) * D + cc] + azw[(w * NG + hh) * NGVMAX + g];
  };
  for (int idx = tid; idx < nh * D; idx += kThreadsM) {
    const int hh = idx / D, cc = idx % D, g = cc / p.Gv;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kMergeSlots; ++w)
      if (w < nslots) M = fmaxf(M, slot_m(w, hh));
    float o = 0.0f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kMergeSlots; ++w) {
        const float mw = w < nslots ? slot_m(w, hh) : -INFINITY;
        if (mw != -INFINITY) o = fmaf(exp2f(mw - M), slot_o(w, hh, cc, g), o);
      }
    }
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + qh0 + hh) * p.S + split;
    p.part_acc[row * D + cc] = o;
  }
  if (tid < nh) {
    float M = -INFINITY;
    bool nan_l = false;
#pragma unroll
    for (int w = 0; w < kMergeSlots; ++w) {
      if (w < nslots) {
        M = fmaxf(M, slot_m(w, tid));
        nan_l |= isnan(slot_l(w, tid));
      }
    }
    float l = 0.0f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kMergeSlots; ++w) {
        const float mw = w < nslots ? slot_m(w, tid) : -INFINITY;
        if (mw != -INFINITY) l = fmaf(exp2f(mw - M), slot_l(w, tid), l);
      }
    }
    // A slot whose only visible logits are NaN (a NaN key scale over a warp's whole sub-tile, a
    // NaN window key alone in its slice) kept m = -inf, since the max ignores NaN, with a NaN l:
    // skipped above as empty, its NaN still reaches the combine, which makes the row NaN.
    if (nan_l) l = NAN;
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + qh0 + tid) * p.S + split;
    p.part_ml[row * 2] = M;
    p.part_ml[row * 2 + 1] = l;
  }
}

template <int D, int NT, int V>
cudaError_t set_smem_attr(size_t smem) {
  if (smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(decode_mma_kernel<D, NT, V>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

// f(D, NT, V) with the configuration's compile-time constants. NT = 2 always runs variant 0;
// D = 64 and 128 with NT = 1 have all variants: 12 instantiations.
template <typename F>
cudaError_t with_mma_shape(int D, int NT, int V, F&& f) {
  using I64 = std::integral_constant<int, 64>;
  using I128 = std::integral_constant<int, 128>;
  using N1 = std::integral_constant<int, 1>;
  using N2 = std::integral_constant<int, 2>;
  using V0 = std::integral_constant<int, 0>;
  using V1 = std::integral_constant<int, 1>;
  using V2 = std::integral_constant<int, 2>;
  using V3 = std::integral_constant<int, 3>;
  using V4 = std::integral_constant<int, 4>;
  using V5 = std::integral_constant<int, 5>;
  if (NT == 2) {
    if (D == 64) return f(I64{}, N2{}, V0{});
    if (D == 128) return f(I128{}, N2{}, V0{});
    return cudaErrorInvalidValue;
  }
  if (NT != 1) return cudaErrorInvalidValue;
  if (D == 64) {
    if (V == 1) return f(I64{}, N1{}, V1{});
    if (V == 2) return f(I64{}, N1{}, V2{});
    if (V == 3) return f(I64{}, N1{}, V3{});
    if (V == 4) return f(I64{}, N1{}, V4{});
    if (V == 5) return f(I64{}, N1{}, V5{});
    return f(I64{}, N1{}, V0{});
  }
  if (D == 128) {
    if (V == 1) return f(I128{}, N1{}, V1{});
    if (V == 2) return f(I128{}, N1{}, V2{});
    if (V == 3) return f(I128{}, N1{}, V3{});
    if (V == 4) return f(I128{}, N1{}, V4{});
    if (V == 5) return f(I128{}, N1{}, V5{});
    return f(I128{}, N1{}, V0{});
  }
  return cudaErrorInvalidValue;  // unsupported by the tensor-core kernel (decode_mma_supported)
}

}  // namespace

bool decode_mma_supported(const DecodeParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  if (p.D != 64 && p.D != 128) return false;
  if (p.kbits != 2 && p.kbits != 4) return false;
  if (p.v_codes.p == nullptr || (p.vbits != 2 && p.vbits != 4)) return false;
  if (p.G != 32 && p.G != 64 && p.G != 128) return false;
  if (p.Gv < 32 || p.Gv > p.D || p.D % p.Gv != 0) return false;
  if (p.z_codes.p != nullptr) {
    if (p.zbits != 4 && p.zbits != 8) return false;
    if (p.r < 1 || p.r > 32 || (p.r * p.zbits / 8) % 4 != 0) return false;
  }
  return true;
}

int decode_mma_variant(const char* name) {
  if (name == nullptr || name[0] == '\0' || std::strcmp(name, "default") == 0) return kMmaDefaultVariant;
  static const char* const names[kMmaVariants] = {"base", "ring4", "ring5", "lean", "fixed"};
  for (int v = 0; v < kMmaVariants; ++v) {
    if (std::strcmp(name, names[v]) == 0) return v;
  }
  return -1;
}

cudaError_t plan_decode_mma(const DecodeParams& p, int sm_count, int variant, DecodePlan* plan) {
  DecodePlan pl{};
  const int NT = p.ratio <= 4 ? 1 : 2;
  if (variant < 0 || variant >= kMmaVariants) return cudaErrorInvalidValue;
  if (mma_fixed(variant) && !mma_fixed_ok(p)) variant = 3;  // another format: lean
  pl.variant = NT == 2 ? 0 : variant;
  pl.ng = 4 * NT;
  pl.nchunk = (p.ratio + pl.ng - 1) / pl.ng;
  pl.smem = static_cast<size_t>(mma_smem(p, NT, mma_ring(pl.variant), mma_fixed(pl.variant)).total);
  // blocks per SM of configuration `variant` with `smem` bytes of dynamic shared memory
  const auto occupancy = [&](int variant, size_t smem, int* blocks) {
    return with_mma_shape(p.D, NT, variant, [&](auto d, auto nt, auto v) {
      constexpr int Dv = decltype(d)::value, NTv = decltype(nt)::value, Vv = decltype(v)::value;
      const cudaError_t e = set_smem_attr<Dv, NTv, Vv>(smem);
      if (e != cudaSuccess) return e;
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, decode_mma_kernel<Dv, NTv, Vv>,
                                                           kThreadsM, smem);
    });
  };
  int per_sm = 1;
  const cudaError_t err = occupancy(pl.variant, pl.smem, &per_sm);
  if (err != cudaSuccess) return err;
  // quantised region in the tensor-core kernel's tiles, window splits in the SIMT kernel's
  set_plan_splits(p, sm_count, per_sm, kTileM, kSimtTile, kAutoMinTiles, &pl);
  // A window of at most kMmaWindowPerSplit tokens per split is attended by the splits
  // themselves (win_mma; HEADQ_MMA_WINDOW=0: window splits of the SIMT kernel, for A/B runs).
  // Its rows take 2 x 8 x D x 2 bytes more shared memory per block (4 KB at D = 128), which the
  // occupancy above did not count: the window goes to the splits only when the blocks per SM
  // stay the same with it.
  if (pl.variant == kMmaFixed && pl.Sw > 0 && pl.Sq > 0 &&
      (p.W + pl.Sq - 1) / pl.Sq <= kMmaWindowPerSplit && decode_mma_window_enabled()) {
    DecodeParams pw = p;
    pw.win_mma = 1;
    const size_t smem_w = static_cast<size_t>(mma_smem(pw, NT, true, true).total);
    int per_sm_w = 0;
    const cudaError_t e2 = occupancy(kMmaFixedWindow, smem_w, &per_sm_w);
    if (e2 != cudaSuccess) return e2;
    if (per_sm_w == per_sm) {
      pl.variant = kMmaFixedWindow;
      pl.win_mma = 1;
      pl.smem = smem_w;
      pl.Sw = 0;
    }
  }
  *plan = pl;
  return cudaSuccess;
}

cudaError_t launch_decode_mma(const DecodeParams& p, const DecodePlan& plan, cudaStream_t stream) {
  if (p.Sq == 0 || p.B == 0 || p.H == 0) return cudaSuccess;
  return with_mma_shape(p.D, plan.ng / 4, plan.variant, [&](auto d, auto nt, auto v) {
    constexpr int Dv = decltype(d)::value, NTv = decltype(nt)::value, Vv = decltype(v)::value;
    const cudaError_t e = set_smem_attr<Dv, NTv, Vv>(plan.smem);
    if (e != cudaSuccess) return e;
    const dim3 grid(p.Sq, p.H * p.nchunk, p.B);
    decode_mma_kernel<Dv, NTv, Vv><<<grid, kThreadsM, plan.smem, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace headq
