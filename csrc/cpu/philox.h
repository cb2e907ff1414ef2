// Counter-based normal noise: Philox4x32-10 (Salmon et al., SC'11) + Box-Muller.
//
// The stream is a pure function of (seed, sample, step, element): counter =
// (element / 4, sample, step, 0), key = seed. Each Philox call yields 4 words, turned into
// 4 normals by two Box-Muller transforms. fastdiff/ops/philox.py computes the same
// integers in torch; the Triton kernel does too. Everything here is branch-free scalar
// code written so that the compiler vectorises the loops that call it.
#pragma once
#include "cpu/bits.h"
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastdiff {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t v[4];
};

inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return {{c0, c1, c2, c3}};
}

#if defined(__AVX512F__)
// Sixteen Philox4x32-10 evaluations at once, counters (c0 + lane, c1, c2, c3). Written by
// hand because compilers widen the 32x32->64 products to 64-bit lanes (vpmullq + packs);
// vpmuludq on even and odd lanes gives the same products in a third of the instructions.
inline void philox4x32_10_x16(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                              uint32_t* r0, uint32_t* r1, uint32_t* r2, uint32_t* r3 /* each (16,) */) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c0)), lanes);
  __m512i x1 = _mm512_set1_epi32(static_cast<int>(c1));
  __m512i x2 = _mm512_set1_epi32(static_cast<int>(c2));
  __m512i x3 = _mm512_set1_epi32(static_cast<int>(c3));
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __mmask16 odd = 0xAAAA;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const __m512i p0_even = _mm512_mul_epu32(x0, m0), p0_odd = _mm512_mul_epu32(_mm512_srli_epi64(x0, 32), m0);
    const __m512i p1_even = _mm512_mul_epu32(x2, m1), p1_odd = _mm512_mul_epu32(_mm512_srli_epi64(x2, 32), m1);
    const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p0_even, 32), p0_odd);
    const __m512i lo0 = _mm512_mask_blend_epi32(odd, p0_even, _mm512_slli_epi64(p0_odd, 32));
    const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p1_even, 32), p1_odd);
    const __m512i lo1 = _mm512_mask_blend_epi32(odd, p1_even, _mm512_slli_epi64(p1_odd, 32));
    // 0x96: three-way xor
    x0 = _mm512_ternarylogic_epi32(hi1, x1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);
    x1 = lo1;
    x2 = _mm512_ternarylogic_epi32(hi0, x3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    x3 = lo0;
  }
  _mm512_storeu_si512(r0, x0);
  _mm512_storeu_si512(r1, x1);
  _mm512_storeu_si512(r2, x2);
  _mm512_storeu_si512(r3, x3);
}
#endif

// 23 random bits -> an odd multiple of 2^-24 in (0, 1): exact in float32, never 0 or 1.
inline float uniform_open01(uint32_t bits) {
  return static_cast<float>(((bits >> 9) << 1) | 1u) * 5.9604644775390625e-8f;  // 2^-24
}

// Natural log for x in (0, 1], |rel err| < 2e-7: Cephes' logf polynomial after splitting
// off the exponent, so it vectorises (no table, no branch).
inline float log_unit(float x) {
  const uint32_t bits = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);  // mantissa in [0.5, 1)
  const bool small = m < 0.70710678118654752f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// sin and cos of 2*pi*u for u in [0, 1]: quadrant from u itself (exact), then Cephes'
// minimax polynomials on [-pi/4, pi/4].
inline void sincos_2pi(float u, float* s_out, float* c_out) {
  const float q = static_cast<float>(static_cast<int32_t>(u * 4.0f + 0.5f));  // nearest quadrant
  const float r = (u - 0.25f * q) * 6.28318530717958648f;                      // in [-pi/4, pi/4]
  const float z = r * r;
  const float s = r + r * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float c = 1.0f - 0.5f * z +
                  z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  const int32_t quadrant = static_cast<int32_t>(q) & 3;
  const float sin_val = quadrant == 0 ? s : quadrant == 1 ? c : quadrant == 2 ? -s : -c;
  const float cos_val = quadrant == 0 ? c : quadrant == 1 ? -s : quadrant == 2 ? -c : s;
  *s_out = sin_val;
  *c_out = cos_val;
}


// 4 * quads normals (quads <= kNoiseQuads) for elements [4 first_quad, 4 (first_quad + quads))
// of one sample.
constexpr int kNoiseQuads = 16;
constexpr int kNoiseBlock = 4 * kNoiseQuads;

void normal_block(uint64_t seed, uint32_t sample, uint32_t step, uint32_t first_quad, int quads,
                  float* out /* (4 * quads,) */);

}  // namespace fastdiff
