// plan_splits (csrc/include/headq/split_plan.h): the split arithmetic of the fused decode.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>

#include "headq/split_plan.h"

namespace {

using headq::heavy_stage_slots;
using headq::HeavyPlan;
using headq::kMaxHeavyChunk;
using headq::plan_heavy;
using headq::plan_splits;
using headq::split_range;
using headq::SplitPlan;

// The properties every plan must have, whatever the inputs.
void check_plan(int Tq, int W, int64_t pairs, int64_t resident, int tile, int wtile) {
  const SplitPlan s = plan_splits(Tq, W, pairs, resident, tile, wtile);
  SCOPED_TRACE(::testing::Message() << "Tq=" << Tq << " W=" << W << " pairs=" << pairs
                                    << " resident=" << resident << " tile=" << tile);
  ASSERT_GT(s.chunk_tokens, 0);
  EXPECT_EQ(s.chunk_tokens % tile, 0);
  const int64_t want = std::max<int64_t>(1, resident / pairs);
  if (Tq == 0) {
    EXPECT_EQ(s.Sq, 0);
  } else {
    EXPECT_GE(int64_t{s.Sq} * s.chunk_tokens, Tq);        // every token is in a split
    EXPECT_LT(int64_t{s.Sq - 1} * s.chunk_tokens, Tq);    // no empty split
    EXPECT_LE(s.Sq, want);                                // one wave (rounded down)
    EXPECT_GE(s.Sq, 1);
  }
  ASSERT_GT(s.wchunk, 0);
  EXPECT_EQ(s.wchunk % wtile, 0);
  if (W == 0) {
    EXPECT_EQ(s.Sw, 0);
  } else {
    EXPECT_GE(int64_t{s.Sw} * s.wchunk, W);
    EXPECT_LT(int64_t{s.Sw - 1} * s.wchunk, W);
    EXPECT_LE(s.wchunk, std::max(wtile, s.chunk_tokens));  // a window chunk is no longer
  }
}

TEST(SplitPlan, BenchmarkShapeFillsOneWave) {
  // H200: 132 SMs x 4 blocks, batch 8 x 8 KV heads, 32k tokens in 256-token tiles.
  const SplitPlan s = plan_splits(32768, 0, 64, 528, 256, 128);
  EXPECT_EQ(s.Sq, 8);
  EXPECT_EQ(s.chunk_tokens, 4096);
  EXPECT_EQ(s.Sw, 0);
  // One block too many would start a second wave: 9 x 64 = 576 > 528.
  EXPECT_LE(int64_t{s.Sq} * 64, 528);
}

TEST(SplitPlan, MinTilesPerSplit) {
  // Batch 1 (8 pairs) or 8 (64 pairs) x 528 resident blocks, 256-token tiles.
  struct Case { int Tq; int64_t pairs; int min_tiles, Sq, chunk_tiles; const char* what; };
  const Case cases[] = {
      {32768, 8, 1, 64, 2, "one wave: 66 splits wanted, 64 of 2 tiles"},
      {32768, 8, 4, 32, 4, "at least 4 tiles per split"},
      {32768, 64, 4, 8, 16, "the wave still bounds it: batch 8 keeps 8 splits of 16"},
      {700, 8, 8, 1, 3, "fewer tiles than the minimum: one split holding them all"},
      {32768, 8, 0, 32, 4, "kAutoMinTiles: 64 splits of 2 tiles halved"},
      {32768, 8, -3, 32, 4, "below kAutoMinTiles: the same"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const SplitPlan s = plan_splits(c.Tq, 0, c.pairs, 528, 256, 128, c.min_tiles);
    EXPECT_EQ(s.Sq, c.Sq);
    EXPECT_EQ(s.chunk_tokens, c.chunk_tiles * 256);
  }
  // Every token in exactly one split, no empty split, at least min_tiles tiles in all but the last.
  for (int mt : {2, 3, 5, 16}) {
    for (int Tq : {1, 255, 256, 4096, 5000, 32768, 131072}) {
      const SplitPlan s = plan_splits(Tq, 0, 8, 528, 256, 128, mt);
      const int tiles = (Tq + 255) / 256;
      SCOPED_TRACE(::testing::Message() << "Tq=" << Tq << " min_tiles=" << mt);
      EXPECT_GE(int64_t{s.Sq} * s.chunk_tokens, Tq);
      EXPECT_LT(int64_t{s.Sq - 1} * s.chunk_tokens, Tq);
      EXPECT_GE(s.chunk_tokens / 256, std::min(mt, tiles));
      EXPECT_LE(s.Sq, 66);
    }
  }
}

TEST(SplitPlan, AutoMinTilesHalvesShortFullWaves) {
  // H100 / H200: 132 SMs x 4 blocks = 528; KV heads 8 (gpu_decode_batch.json's shapes).
  struct Case { int batch, Tq, Sq, chunk_tiles; };
  const Case cases[] = {
      {1, 16384, 32, 2},   // full wave: 64 splits of 1 tile -> 32 of 2
      {1, 32768, 32, 4},   // 64 of 2 -> 32 of 4
      {4, 4096, 8, 2},     // 16 of 1 (512 blocks) -> 8 of 2
      {2, 16384, 16, 4},   // 32 of 2 -> 16 of 4
      {8, 4096, 4, 4},     // 8 of 2 -> 4 of 4
      {1, 4096, 16, 1},    // 16 of 1 = 128 blocks, not more than half the wave: kept
      {2, 4096, 16, 1},    // 256 blocks: kept
      {2, 32768, 32, 4},   // 4 tiles per split: kept
      {8, 32768, 8, 16},   // the benchmark shape: kept
      {1, 131072, 64, 8},  // kept
      {1, 100, 1, 1},      // one partial tile
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "batch=" << c.batch << " Tq=" << c.Tq);
    const SplitPlan s = plan_splits(c.Tq, 0, 8 * c.batch, 528, 256, 128, headq::kAutoMinTiles);
    EXPECT_EQ(s.Sq, c.Sq);
    EXPECT_EQ(s.chunk_tokens, c.chunk_tiles * 256);
  }
  // Forcing 1 tile keeps the full wave (what HEADQ_SPLIT_MIN_TILES=1 runs).
  EXPECT_EQ(plan_splits(16384, 0, 8, 528, 256, 128, 1).Sq, 64);
  // The window's chunks follow the (longer) quantised chunk: 300 tokens in one 384-token chunk
  // instead of two of 256.
  const SplitPlan w = plan_splits(16384, 300, 8, 528, 256, 128, headq::kAutoMinTiles);
  EXPECT_EQ(w.wchunk, 384);
  EXPECT_EQ(w.Sw, 1);
  const SplitPlan w1 = plan_splits(16384, 300, 8, 528, 256, 128, 1);
  EXPECT_EQ(w1.wchunk, 256);
  EXPECT_EQ(w1.Sw, 2);
  // The general properties hold under the rule too.
  std::mt19937 rng(11);
  for (int i = 0; i < 2000; ++i) {
    const int Tq = static_cast<int>(rng() % 200000);
    const int64_t pairs = 1 + rng() % 300;
    const SplitPlan s = plan_splits(Tq, 0, pairs, 528, 256, 128, headq::kAutoMinTiles);
    const int tiles = (Tq + 255) / 256;
    SCOPED_TRACE(::testing::Message() << "Tq=" << Tq << " pairs=" << pairs);
    if (Tq == 0) {
      EXPECT_EQ(s.Sq, 0);
      continue;
    }
    EXPECT_GE(int64_t{s.Sq} * s.chunk_tokens, Tq);
    EXPECT_LT(int64_t{s.Sq - 1} * s.chunk_tokens, Tq);
    EXPECT_LE(s.Sq, std::max<int64_t>(1, 528 / pairs));
    EXPECT_LE(s.Sq, tiles);
  }
}

TEST(SplitPlan, ShortSequencesAndWindows) {
  const SplitPlan a = plan_splits(100, 0, 1, 1000, 128, 128);  // one partial tile
  EXPECT_EQ(a.Sq, 1);
  EXPECT_EQ(a.chunk_tokens, 128);
  const SplitPlan b = plan_splits(0, 300, 4, 100, 256, 128);   // window only
  EXPECT_EQ(b.Sq, 0);
  EXPECT_EQ(b.wchunk, 256);  // capped by the (one-tile) chunk of an empty region
  EXPECT_EQ(b.Sw, 2);
  const SplitPlan c = plan_splits(1 << 20, 64, 4096, 528, 128, 128);  // more pairs than blocks
  EXPECT_EQ(c.Sq, 1);
  EXPECT_EQ(c.chunk_tokens, 1 << 20);
  EXPECT_EQ(c.Sw, 1);
}

TEST(SplitPlan, PropertiesOnRandomShapes) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> tq(0, 1 << 20), w(0, 2000), pr(1, 8192), res(1, 4096);
  for (int i = 0; i < 20000; ++i) {
    const int tile = (i & 1) ? 256 : 128;
    check_plan(i % 7 == 0 ? 0 : tq(rng), i % 5 == 0 ? 0 : w(rng), pr(rng), res(rng), tile, 128);
  }
}

// split_range: the per-sequence ranges the kernels use (tiles of the length, not the capacity).
void check_ranges(int Tq, int nq, int64_t pairs, int64_t resident, int tile) {
  const SplitPlan s = plan_splits(Tq, 0, pairs, resident, tile, 128);
  SCOPED_TRACE(::testing::Message() << "Tq=" << Tq << " nq=" << nq << " Sq=" << s.Sq
                                    << " tile=" << tile);
  int next = 0, busy = 0, longest = 0;
  for (int i = 0; i < s.Sq; ++i) {
    int s0 = -1, s1 = -1;
    split_range(i, s.Sq, nq, tile, &s0, &s1);
    ASSERT_LE(s0, s1);
    if (s0 == s1) {  // an empty split: everything after it is empty too
      EXPECT_EQ(s0, nq);
      continue;
    }
    EXPECT_EQ(s0, next);  // contiguous, in order, no token twice
    EXPECT_EQ(s0 % tile, 0);
    if (s1 < nq) {
      EXPECT_EQ(s1 % tile, 0);
    }
    next = s1;
    ++busy;
    longest = std::max(longest, s1 - s0);
  }
  EXPECT_EQ(next, nq);  // every token of the length is in a split
  if (nq > 0) {
    // the work is spread: no split longer than the even share rounded up to a tile
    const int tiles = (nq + tile - 1) / tile;
    const int share = (tiles + s.Sq - 1) / s.Sq;  // tiles per split, rounded up
    EXPECT_LE(longest, share * tile);
    EXPECT_EQ(busy, (tiles + share - 1) / share);  // only the tail splits can be empty
  }
  if (nq == Tq) {  // at full capacity the ranges are the plan's chunks
    for (int i = 0; i < s.Sq; ++i) {
      int s0, s1;
      split_range(i, s.Sq, nq, tile, &s0, &s1);
      EXPECT_EQ(s0, std::min(i * s.chunk_tokens, Tq));
      EXPECT_EQ(s1, std::min((i + 1) * s.chunk_tokens, Tq));
    }
  }
}

TEST(SplitRange, HalfFullCapacityUsesEverySplit) {
  // The benchmark shape with the capacity doubled (a grown cache): 8 splits of the 64k
  // capacity, 32k tokens. Ranges over the capacity would leave splits 4..7 empty and give
  // splits 0..3 8k tokens each; over the length each split gets 4k.
  const SplitPlan s = plan_splits(65536, 0, 64, 528, 256, 128);
  ASSERT_EQ(s.Sq, 8);
  for (int i = 0; i < 8; ++i) {
    int s0, s1;
    split_range(i, s.Sq, 32768, 256, &s0, &s1);
    EXPECT_EQ(s0, i * 4096);
    EXPECT_EQ(s1, (i + 1) * 4096);
  }
}

TEST(SplitRange, PropertiesOnRandomLengths) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> tq(1, 1 << 20), pr(1, 8192), res(1, 4096);
  for (int i = 0; i < 20000; ++i) {
    const int tile = (i & 1) ? 256 : 128;
    const int Tq = tq(rng);
    const int nq = (i % 3 == 0) ? Tq : std::uniform_int_distribution<int>(0, Tq)(rng);
    check_ranges(Tq, nq, pr(rng), res(rng), tile);
  }
}

TEST(HeavyPlan, EverySlotInExactlyOneChunk) {
  EXPECT_EQ(plan_heavy(0).Sh, 0);
  EXPECT_EQ(plan_heavy(1).Sh, 1);
  EXPECT_EQ(plan_heavy(983).hchunk, 64);  // 3% of 32k tokens: 16 splits of 64
  EXPECT_EQ(plan_heavy(983).Sh, 16);
  EXPECT_EQ(plan_heavy(3932).hchunk, 128);  // 3% of 128k: 31 splits of 128
  EXPECT_EQ(plan_heavy(3932).Sh, 31);
  // Short contexts: chunks of 32 while rows x chunks fit the resident blocks (132 SMs x 4).
  EXPECT_EQ(plan_heavy(122, 64, 528).hchunk, 32);  // 3% of 4k at batch 8 x 8 KV heads
  EXPECT_EQ(plan_heavy(122, 64, 528).Sh, 4);
  EXPECT_EQ(plan_heavy(983, 64, 528).hchunk, 64);   // 31 x 64 blocks do not fit
  EXPECT_EQ(plan_heavy(3932, 64, 528).hchunk, 128);
  EXPECT_EQ(plan_heavy(264, 16, 528).hchunk, 32);   // 9 x 16 = 144 blocks
  EXPECT_EQ(plan_heavy(1057, 16, 528).hchunk, 64);  // 34 chunks of 32: more than 32
  EXPECT_EQ(plan_heavy(1000, 1, 528).hchunk, 32);
  EXPECT_EQ(plan_heavy(983, 16, 528).hchunk, 32);   // 31 x 16 = 496 blocks
  EXPECT_EQ(plan_heavy(983, 32, 528).hchunk, 64);   // 31 x 32 = 992 do not fit
  for (int K = 0; K <= 20000; ++K) {
    const HeavyPlan h = plan_heavy(K), s = plan_heavy(K, 16, 528);
    ASSERT_TRUE(h.hchunk == 64 || h.hchunk == kMaxHeavyChunk) << K;
    if (h.hchunk == 64) {
      ASSERT_LE(h.Sh, 32) << K;  // few partials at 64 slots a chunk
    }
    ASSERT_TRUE(s.hchunk == 32 || s.hchunk == h.hchunk) << K;
    if (s.hchunk == 32) {
      ASSERT_LE(int64_t{16} * s.Sh, 528) << K;  // one wave
      ASSERT_LE(s.Sh, 32) << K;                  // few partials
    }
    for (const HeavyPlan& q : {h, s}) {
      ASSERT_GE(int64_t{q.Sh} * q.hchunk, K) << K;  // every slot is in a split
      if (K > 0) {
        ASSERT_LT(int64_t{q.Sh - 1} * q.hchunk, K) << K;  // no empty split
      }
    }
  }
}

// The heavy kernel's stage: 64 slots while the launch's blocks fit at once at the 64-slot
// stage's residency, 32 beyond (the H200 bench shapes: 5 blocks per SM at 64 slots).
TEST(HeavyStage, LargeWhileOneWave) {
  const int64_t resident64 = 5 * 132;
  EXPECT_EQ(heavy_stage_slots(4 * 64, resident64), 64);   // 4k: 4 chunks of 32 x 64 rows
  EXPECT_EQ(heavy_stage_slots(8 * 64, resident64), 64);   // 16k: 8 chunks of 64
  EXPECT_EQ(heavy_stage_slots(16 * 64, resident64), 32);  // 32k: 16 chunks of 64
  EXPECT_EQ(heavy_stage_slots(31 * 64, resident64), 32);  // 128k: 31 chunks of 128
  EXPECT_EQ(heavy_stage_slots(resident64, resident64), 64);
  EXPECT_EQ(heavy_stage_slots(resident64 + 1, resident64), 32);
  EXPECT_EQ(heavy_stage_slots(1, 0), 32);  // no residency known: the small stage
}

}  // namespace
