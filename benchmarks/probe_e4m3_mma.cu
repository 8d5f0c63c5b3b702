// Probe: does the fp8 tensor-core MMA (mma.sync.m16n8k32 e4m3 x e4m3 -> f32, sm_89+) compute
// exactly what the key path would need? docs/PERF.md ("What would be needed next") proposes
// 2-bit key codes as e4m3 bytes below 16 (exactly c * 2^-9: subnormals and the first binade),
// times a query split into 4-significant-bit e4m3 pieces. That is exact only if the tensor core
// keeps e4m3 subnormals exact and accumulates without dropping bits. This program measures it
// against an fp64 reference and prints one JSON object.
//
//   nvcc -std=c++17 -O2 -arch=sm_90 benchmarks/probe_e4m3_mma.cu -o /tmp/probe && /tmp/probe
//
// Cases (each many random 16x32 by 32x8 products, one warp each):
//   layout         small integers (exact in any arithmetic): a mismatch is a fragment-layout bug
//                  in this probe, not a precision finding;
//   codes_by_query A = codes 0..15 as e4m3 bytes 0x00..0x0F, B = random finite e4m3 of both signs
//                  over the whole range, C = 0: is every 32-term dot product exact?
//   chained        the same, accumulated over 8 MMAs (256 channels) through C, as a kernel would;
//   accum_bits     C = 2^max(0, j - 18), one product C * 2^-j: the largest j for which
//                  C (1 + 2^-j) comes out exactly (an fp32 accumulator keeps j = 23);
//   subnormal_b    both operands subnormal (2^-18 scale products).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#define CHECK(x)                                                                      \
  do {                                                                                \
    cudaError_t e_ = (x);                                                             \
    if (e_ != cudaSuccess) {                                                          \
      std::printf("{\"error\": \"%s at line %d\"}\n", cudaGetErrorString(e_), __LINE__); \
      return 1;                                                                       \
    }                                                                                 \
  } while (0)

// e4m3 (bias 7, no infinities, 0x7F / 0xFF NaN) to double.
double e4m3_value(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 0xF, m = b & 7;
  const double mag = e == 0 ? std::ldexp(m, -9) : std::ldexp(8 + m, e - 10);
  return s ? -mag : mag;
}
bool e4m3_nan(uint8_t b) { return (b & 0x7F) == 0x7F; }

// One warp per problem: A [16][32] row-major bytes, B [32][8] (k-major: B[k][n]) bytes,
// C / D [16][8] floats, `chain` MMAs accumulated in sequence (problem i's chain uses the
// consecutive A / B blocks i*chain .. i*chain+chain-1).
__global__ void mma_e4m3(const uint8_t* A, const uint8_t* B, const float* C, float* D, int chain) {
  const int p = blockIdx.x, lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    d[i] = C[p * 128 + row * 8 + col];
  }
  for (int c = 0; c < chain; ++c) {
    const uint8_t* a = A + (static_cast<int64_t>(p) * chain + c) * 512;
    const uint8_t* b = B + (static_cast<int64_t>(p) * chain + c) * 256;
    uint32_t ar[4], br[2];
    for (int i = 0; i < 4; ++i) {  // a0: (g, 4t..4t+3), a1: (g+8, ..), a2: (g, 16+4t..), a3: (g+8, 16+..)
      const int row = g + ((i & 1) ? 8 : 0), col = 4 * t + ((i & 2) ? 16 : 0);
      uint32_t w = 0;
      for (int j = 0; j < 4; ++j) w |= static_cast<uint32_t>(a[row * 32 + col + j]) << (8 * j);
      ar[i] = w;
    }
    for (int i = 0; i < 2; ++i) {  // b0: k = 4t..4t+3, b1: k = 16+4t.., column g
      uint32_t w = 0;
      for (int j = 0; j < 4; ++j) w |= static_cast<uint32_t>(b[(4 * t + 16 * i + j) * 8 + g]) << (8 * j);
      br[i] = w;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(ar[0]), "r"(ar[1]), "r"(ar[2]), "r"(ar[3]), "r"(br[0]), "r"(br[1]));
#endif
  }
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    D[p * 128 + row * 8 + col] = d[i];
  }
}

struct Result {
  long outputs = 0, inexact = 0;
  double max_abs_err = 0, max_rel_err = 0;
};

// Runs n problems of `chain` MMAs with operand bytes from fa / fb and C from fc; compares with
// the fp64 sum (exact here: every product and partial sum fits in 53 bits).
template <typename FA, typename FB, typename FC>
int run_case(int n, int chain, FA fa, FB fb, FC fc, Result& r) {
  std::vector<uint8_t> A(static_cast<size_t>(n) * chain * 512), B(static_cast<size_t>(n) * chain * 256);
  std::vector<float> C(static_cast<size_t>(n) * 128), D(C.size());
  for (auto& x : A) x = fa();
  for (auto& x : B) x = fb();
  for (auto& x : C) x = fc();
  uint8_t *dA, *dB;
  float *dC, *dD;
  CHECK(cudaMalloc(&dA, A.size()));
  CHECK(cudaMalloc(&dB, B.size()));
  CHECK(cudaMalloc(&dC, C.size() * 4));
  CHECK(cudaMalloc(&dD, D.size() * 4));
  CHECK(cudaMemcpy(dA, A.data(), A.size(), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dB, B.data(), B.size(), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dC, C.data(), C.size() * 4, cudaMemcpyHostToDevice));
  mma_e4m3<<<n, 32>>>(dA, dB, dC, dD, chain);
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(D.data(), dD, D.size() * 4, cudaMemcpyDeviceToHost));
  cudaFree(dA);
  cudaFree(dB);
  cudaFree(dC);
  cudaFree(dD);
  for (int p = 0; p < n; ++p)
    for (int m = 0; m < 16; ++m)
      for (int col = 0; col < 8; ++col) {
        double ref = C[p * 128 + m * 8 + col];
        for (int c = 0; c < chain; ++c) {
          const uint8_t* a = &A[(static_cast<size_t>(p) * chain + c) * 512];
          const uint8_t* b = &B[(static_cast<size_t>(p) * chain + c) * 256];
          for (int k = 0; k < 32; ++k) ref += e4m3_value(a[m * 32 + k]) * e4m3_value(b[k * 8 + col]);
        }
        const double got = D[p * 128 + m * 8 + col], err = std::fabs(got - ref);
        ++r.outputs;
        if (got != ref) ++r.inexact;
        r.max_abs_err = std::max(r.max_abs_err, err);
        if (ref != 0) r.max_rel_err = std::max(r.max_rel_err, err / std::fabs(ref));
      }
  return 0;
}

void print_result(const char* name, const Result& r, bool last = false) {
  std::printf("  \"%s\": {\"outputs\": %ld, \"inexact\": %ld, \"max_abs_err\": %.6g, "
              "\"max_rel_err\": %.6g}%s\n",
              name, r.outputs, r.inexact, r.max_abs_err, r.max_rel_err, last ? "" : ",");
}

int main() {
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  if (prop.major * 10 + prop.minor < 89) {
    std::printf("{\"error\": \"needs sm_89+, found sm_%d%d\"}\n", prop.major, prop.minor);
    return 1;
  }
  std::mt19937 rng(1234);
  auto any_finite = [&]() {
    for (;;) {
      const uint8_t b = static_cast<uint8_t>(rng() & 0xFF);
      if (!e4m3_nan(b)) return b;
    }
  };
  auto code = [&]() { return static_cast<uint8_t>(rng() & 0x0F); };  // c * 2^-9, c in 0..15
  // Small integers 0..4 as e4m3: 0x00, 0x38 (1), 0x40 (2), 0x44 (3), 0x48 (4).
  const uint8_t ints[5] = {0x00, 0x38, 0x40, 0x44, 0x48};
  auto small_int = [&]() { return ints[rng() % 5]; };
  auto zero = [&]() { return 0.0f; };
  const int n = 4096;

  std::printf("{\n  \"device\": \"%s\", \"sm\": %d,\n", prop.name, prop.major * 10 + prop.minor);
  Result layout, codes, chained, subn;
  if (run_case(n, 1, small_int, small_int, zero, layout)) return 1;
  print_result("layout", layout);
  if (run_case(n, 1, code, any_finite, zero, codes)) return 1;
  print_result("codes_by_query", codes);
  if (run_case(n / 8, 8, code, any_finite, zero, chained)) return 1;
  print_result("chained", chained);
  auto subnormal = [&]() { return static_cast<uint8_t>((rng() & 0x80) | (rng() & 0x07)); };
  if (run_case(n, 1, subnormal, subnormal, zero, subn)) return 1;
  print_result("subnormal_b", subn);

  // accum_bits: C = 2^cs, A has one nonzero (row 0, k = 0), B (k = 0, col 0) another, their
  // product 2^(cs - j): the largest j for which D[0][0] = C (1 + 2^-j) exactly.
  int exact_to = 0;
  auto pow2 = [](int e) -> uint8_t {  // 2^-e as e4m3, 0 <= e <= 9
    return e <= 6 ? static_cast<uint8_t>((7 - e) << 3) : static_cast<uint8_t>(1 << (9 - e));
  };
  for (int j = 1; j <= 24; ++j) {
    const int cs = std::max(0, j - 18), jp = j - cs;  // product 2^-jp, jp <= 18
    const int ja = std::min(jp, 9), jb = jp - ja;
    const uint8_t av = pow2(ja), bv = pow2(jb);
    int calls = 0, callsb = 0;
    auto fa = [&]() { return static_cast<uint8_t>((calls++ % 512) == 0 ? av : 0); };
    auto fb = [&]() { return static_cast<uint8_t>((callsb++ % 256) == 0 ? bv : 0); };
    auto c = [&]() { return std::ldexp(1.0f, cs); };
    Result r;
    if (run_case(1, 1, fa, fb, c, r)) return 1;
    if (r.inexact != 0) break;
    exact_to = j;
  }
  std::printf("  \"accum_bits\": {\"c_one_plus_2^-j_exact_up_to_j\": %d, \"fp32_would_be\": 23}\n}\n",
              exact_to);
  return 0;
}
