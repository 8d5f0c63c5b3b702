// The one place that turns runtime dtypes and integer knobs into compile-time types/constants.
// Every switch has a default case that throws: an unsupported value never falls through.
//
//   HEADQ_DISPATCH_FLOAT(q.scalar_type(), "decode_attention", [&] { run<scalar_t>(...); });
//   HEADQ_DISPATCH_BITS(bits, "bits", [&] { run<kBits>(...); });
//   HEADQ_DISPATCH_SIDE_BITS(side_bits, "side_bits", [&] { run<kSideBits>(...); });
//
// The CPU kernels take bits as a runtime argument and dispatch only the dtype (three
// instantiations per op); the bits switches are for kernels that specialise on them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// float32 / float16 / bfloat16 -> scalar_t (float, c10::Half, c10::BFloat16).
#define HEADQ_DISPATCH_FLOAT(DTYPE, NAME, ...)                                           \
  do {                                                                                   \
    const ::c10::ScalarType headq_dtype_ = (DTYPE);                                      \
    switch (headq_dtype_) {                                                              \
      case ::c10::ScalarType::Float: {                                                   \
        using scalar_t = float;                                                          \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      case ::c10::ScalarType::Half: {                                                    \
        using scalar_t = ::c10::Half;                                                    \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      case ::c10::ScalarType::BFloat16: {                                                \
        using scalar_t = ::c10::BFloat16;                                                \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      default:                                                                           \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", headq_dtype_,                   \
                    ", expected float32, float16 or bfloat16");                          \
    }                                                                                    \
  } while (0)

// Key/value bits 2, 3, 4, 8 -> constexpr int kBits.
#define HEADQ_DISPATCH_BITS(BITS, NAME, ...)                                             \
  do {                                                                                   \
    const int64_t headq_bits_ = (BITS);                                                  \
    switch (headq_bits_) {                                                               \
      case 2: {                                                                          \
        constexpr int kBits = 2;                                                         \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      case 3: {                                                                          \
        constexpr int kBits = 3;                                                         \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      case 4: {                                                                          \
        constexpr int kBits = 4;                                                         \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      case 8: {                                                                          \
        constexpr int kBits = 8;                                                         \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      default:                                                                           \
        TORCH_CHECK(false, NAME, " must be one of 2, 3, 4, 8, got ", headq_bits_);        \
    }                                                                                    \
  } while (0)

// Side-code bits 4, 8 -> constexpr int kSideBits.
#define HEADQ_DISPATCH_SIDE_BITS(BITS, NAME, ...)                                        \
  do {                                                                                   \
    const int64_t headq_side_bits_ = (BITS);                                             \
    switch (headq_side_bits_) {                                                          \
      case 4: {                                                                          \
        constexpr int kSideBits = 4;                                                     \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      case 8: {                                                                          \
        constexpr int kSideBits = 8;                                                     \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      default:                                                                           \
        TORCH_CHECK(false, NAME, " must be one of 4, 8, got ", headq_side_bits_);        \
    }                                                                                    \
  } while (0)

// Group sizes 32, 64, 128 -> constexpr int kGroup.
#define HEADQ_DISPATCH_GROUP(GROUP, NAME, ...)                                           \
  do {                                                                                   \
    const int64_t headq_group_ = (GROUP);                                                \
    switch (headq_group_) {                                                              \
      case 32: {                                                                         \
        constexpr int kGroup = 32;                                                       \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      case 64: {                                                                         \
        constexpr int kGroup = 64;                                                       \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      case 128: {                                                                        \
        constexpr int kGroup = 128;                                                      \
        __VA_ARGS__();                                                                   \
        break;                                                                           \
      }                                                                                  \
      default:                                                                           \
        TORCH_CHECK(false, NAME, " must be one of 32, 64, 128, got ", headq_group_);     \
    }                                                                                    \
  } while (0)
