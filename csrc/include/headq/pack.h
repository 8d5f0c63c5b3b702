// Bit-stream packing of a row of b-bit unsigned codes (docs/LAYOUT.md, "Bit packing").
//
// Code i occupies bits [i*b, (i+1)*b) of a little-endian stream: it starts at byte (i*b) >> 3,
// bit (i*b) & 7, and for b = 3 may straddle two bytes. A row of n codes takes n*b/8 bytes
// (n*b must be a multiple of 8). Works for any b in 1..8; headq uses 2, 3, 4, 8.
#pragma once

#include "headq/common.h"

namespace headq {

// Bytes of a packed row of n codes of `bits` bits.
HEADQ_HD HEADQ_INLINE int64_t packed_row_bytes(int64_t n, int bits) { return n * bits / 8; }

// Code i of a packed row.
HEADQ_HD HEADQ_INLINE uint32_t get_code(const uint8_t* row,  // [n*bits/8]
                                        int64_t i, int bits) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int off = static_cast<int>(bit & 7);
  uint32_t v = static_cast<uint32_t>(row[byte]) >> off;
  if (off + bits > 8) v |= static_cast<uint32_t>(row[byte + 1]) << (8 - off);
  return v & ((1u << bits) - 1u);
}

// OR code i into a packed row whose bits for code i are zero (rows are cleared first).
HEADQ_HD HEADQ_INLINE void put_code(uint8_t* row,  // [n*bits/8]
                                    int64_t i, int bits, uint32_t code) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int off = static_cast<int>(bit & 7);
  code &= (1u << bits) - 1u;
  row[byte] = static_cast<uint8_t>(row[byte] | ((code << off) & 0xffu));
  if (off + bits > 8) row[byte + 1] = static_cast<uint8_t>(row[byte + 1] | (code >> (8 - off)));
}

// Pack n codes (each < 2^bits) into n*bits/8 bytes.
HEADQ_HD HEADQ_INLINE void pack_row(const uint8_t* codes,  // [n]
                                    int64_t n, int bits,
                                    uint8_t* out) {  // [n*bits/8]
  const int64_t nbytes = packed_row_bytes(n, bits);
  for (int64_t j = 0; j < nbytes; ++j) out[j] = 0;
  for (int64_t i = 0; i < n; ++i) put_code(out, i, bits, codes[i]);
}

// Unpack n codes from n*bits/8 bytes.
HEADQ_HD HEADQ_INLINE void unpack_row(const uint8_t* packed,  // [n*bits/8]
                                      int64_t n, int bits,
                                      uint8_t* codes) {  // [n]
  for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<uint8_t>(get_code(packed, i, bits));
}

}  // namespace headq
