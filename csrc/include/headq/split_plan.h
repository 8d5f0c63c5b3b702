// How the fused decode attention splits each sequence over thread blocks (flash-decoding):
// host-side arithmetic shared by the SIMT and tensor-core plans (csrc/cuda/decode_kernels.cu,
// decode_mma.cu), torch- and CUDA-free so that tests/cpp/test_split_plan.cc can check it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "headq/common.h"

namespace headq {

struct SplitPlan {
  int chunk_tokens;  // quantised tokens per split (a multiple of tile)
  int Sq;            // splits over the quantised region (0 when Tq == 0)
  int wchunk;        // window tokens per window split (a multiple of wtile)
  int Sw;            // splits over the dense window (0 when W == 0)
};

// Tq quantised-region capacity and W window tokens per sequence; `pairs` independent
// (batch, KV head, head chunk) pairs; `resident_blocks` = SMs x blocks per SM. The quantised
// region gets as many splits as one full wave of resident blocks allows (rounded down: one
// block more than fits starts a second, nearly empty wave that doubles the step time), in whole
// tiles of `tile` tokens, and no empty split; the window is cut into chunks no longer than a
// quantised chunk (whole tiles of `wtile` tokens, at least one).
//
// min_tiles >= 1: at least that many tiles per split where there are that many (1: the full
// wave). min_tiles == 0 (kAutoMinTiles, the tensor-core plan's default): the full wave, unless
// its splits would be one or two tiles long and fill more than half of the resident blocks;
// then splits twice as long, half as many. Each block pays a fixed setup (the query, q.U, the
// first tile's latency) that one or two tiles do not hide: on an H100 (132 SMs x 4 blocks,
// benchmarks/results/gpu_decode_batch.json) batch 1 at 16k / 32k tokens took 18.9 / 25.2 us
// with the longer splits against 22.3 / 27.5 us with the full wave, batch 4 at 4k 17.1 vs
// 18.3 us, batch 8 at 4k 23.4 vs 23.2 us (within the spread); splits of 4+ tiles were faster
// as a full wave (batch 2 at 32k: 34.5 vs 36.3 us with half as many).
constexpr int kAutoMinTiles = 0;

inline SplitPlan plan_splits(int Tq, int W, int64_t pairs, int64_t resident_blocks, int tile,
                             int wtile, int min_tiles = 1) {
  SplitPlan s{};
  const int tiles = (Tq + tile - 1) / tile;
  const int64_t npairs = std::max<int64_t>(pairs, 1);
  const int want = static_cast<int>(std::max<int64_t>(1, resident_blocks / npairs));
  if (tiles > 0) {
    const auto plan = [&](int mt) {
      const int sq = std::min(want, std::max(1, tiles / mt));
      const int chunk_tiles = (tiles + sq - 1) / sq;
      s.chunk_tokens = chunk_tiles * tile;
      s.Sq = (tiles + chunk_tiles - 1) / chunk_tiles;
      return chunk_tiles;
    };
    const int chunk_tiles = plan(std::max(min_tiles, 1));
    if (min_tiles <= kAutoMinTiles && chunk_tiles <= 2 &&
        2 * int64_t{s.Sq} * npairs > resident_blocks) {
      plan(2 * chunk_tiles);
    }
  } else {
    s.chunk_tokens = tile;
    s.Sq = 0;
  }
  if (W > 0) {
    const int wtiles = (W + wtile - 1) / wtile;
    const int wchunk_tiles = std::max(1, std::min(wtiles, s.chunk_tokens / wtile));
    s.wchunk = wchunk_tiles * wtile;
    s.Sw = (W + s.wchunk - 1) / s.wchunk;
  } else {
    s.wchunk = wtile;
    s.Sw = 0;
  }
  return s;
}

// Token range [*s0, *s1) of split `split` (of Sq) over the nq valid tokens of one sequence:
// ceil(tiles / Sq) whole tiles of `tile` tokens each, tiles counted over nq, not over the
// capacity the plan was made for. A cache whose buffers have grown past its length (capacity
// doubling, a reserved capacity, a CUDA graph captured for a larger cache) then still spreads
// its tokens over all Sq splits instead of leaving the splits past nq empty, so the step time
// follows the length. Every token of [0, nq) is in exactly one split; with nq equal to the
// planned capacity the ranges are the plan's (chunk_tokens per split).
HEADQ_HD inline void split_range(int split, int Sq, int nq, int tile, int* s0, int* s1) {
  const int tiles = (nq + tile - 1) / tile;
  const int chunk = ((tiles + Sq - 1) / Sq) * tile;
  const int lo = split * chunk;
  *s0 = lo < nq ? lo : nq;
  *s1 = lo + chunk < nq ? lo + chunk : nq;
}

// Heavy-slot splits (A² value policy): the K kept-token slots of every (batch, KV head) are
// cut into chunks of `hchunk` slots, one split each, after the quantised and window splits.
// Chunks of 64 slots (one block of decode_heavy_kernel each), or 128 (kMaxHeavyChunk, what its
// per-block logit buffer holds) once there would be more than 32 of them, so that the partials
// the combine merges stay few. Chunks of 32 instead when there are at most 32 of them and the
// `rows` (the heavy kernel's rows of blocks) x chunks blocks all fit at once (<= `resident`;
// short contexts): each block is then a shorter chain of loads and the step waits for one wave
// of short blocks. K == 0: no split.
constexpr int kMaxHeavyChunk = 128;

struct HeavyPlan {
  int hchunk;  // slots per heavy split (32, 64 or kMaxHeavyChunk)
  int Sh;      // heavy splits (ceil(K / hchunk), 0 when K == 0)
};

inline HeavyPlan plan_heavy(int K, int64_t rows = 0, int64_t resident = 0) {
  HeavyPlan h{};
  h.hchunk = K <= 32 * 64 ? 64 : kMaxHeavyChunk;
  if (K <= 32 * 32 && rows > 0 && rows * ((K + 31) / 32) <= resident) h.hchunk = 32;
  h.Sh = K > 0 ? (K + h.hchunk - 1) / h.hchunk : 0;
  return h;
}

// Slots the heavy-slot kernel stages in shared memory at a time (its key rows, then as many
// delta rows as fit): 64 while the launch's `blocks` all fit at once at the residency of the
// 64-slot stage (`resident64` = its resident blocks per SM x SMs), else 32, whose smaller stage
// lets more blocks be resident (H200, batch 8, 8 KV heads, 3% kept: 64 at 4k and 16k, where
// the blocks fit in one wave, 32 at 32k and 128k, where they would not; PERF.md).
constexpr int kHeavyStageLarge = 64, kHeavyStageSmall = 32;

inline int heavy_stage_slots(int64_t blocks, int64_t resident64) {
  return blocks <= resident64 ? kHeavyStageLarge : kHeavyStageSmall;
}

}  // namespace headq
