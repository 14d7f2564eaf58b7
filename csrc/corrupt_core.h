// Fused normalise + corrupt: the per-element core shared by the CUDA kernel (corrupt_kernel.cu)
// and the host loop (corrupt_host.cpp). Pure C++/CUDA, no libtorch.
//
// It reproduces fastebm/corrupt/reference.py bit for bit:
//  * Philox4x32-10 with key (seed lo, seed hi) and counter (index, sample_id, offset, purpose);
//  * Box-Muller with log/sin/cos written as fixed sequences of correctly rounded float32
//    + - * / (device: __fadd_rn & co, which are never contracted into FMAs; host: plain
//    operators compiled with -ffp-contract=off), so no libm difference can creep in;
//  * the same summation order for sr block means and for the BT.601 luma.
//
// Work is split into "units", one thread each (the unit depends on the sample's task):
//  * mim, sort, colorize: one pixel (all channels)         -> H*W units
//  * sr:                  one factor x factor block         -> ceil(H/f)*ceil(W/f) units
//  * denoise:             four consecutive elements c,h,w   -> ceil(C*H*W/4) units (one Philox call)
// Every unit reads its input pixels once (sort: from the source patch) and writes the normalised
// clean value, the corrupted value and the loss weight of the pixels it owns: one pass over memory.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FEBM_HD __host__ __device__ __forceinline__
#else
#define FEBM_HD inline
#endif

// float32 constants, hexadecimal and exact; must equal philox.FLOAT_CONSTANTS (a test compares).
#define FEBM_C_ONE 0x1p+0f
#define FEBM_C_HALF 0x1p-1f
#define FEBM_C_TWO 0x1p+1f
#define FEBM_C_NEG_TWO -0x1p+1f
#define FEBM_C_SQRT2 0x1.6a09e6p+0f
#define FEBM_C_LN2_HI 0x1.62e4p-1f
#define FEBM_C_LN2_LO 0x1.7f7d1cp-20f
#define FEBM_C_L3 0x1.555556p-2f
#define FEBM_C_L5 0x1.99999ap-3f
#define FEBM_C_L7 0x1.24924ap-3f
#define FEBM_C_L9 0x1.c71c72p-4f
#define FEBM_C_L11 0x1.745d18p-4f
#define FEBM_C_ANGLE 0x1.921fb6p-22f
#define FEBM_C_S3 -0x1.555556p-3f
#define FEBM_C_S5 0x1.111112p-7f
#define FEBM_C_S7 -0x1.a01a02p-13f
#define FEBM_C_S9 0x1.71de3ap-19f
#define FEBM_C_C2 -0x1p-1f
#define FEBM_C_C4 0x1.555556p-5f
#define FEBM_C_C6 -0x1.6c16c2p-10f
#define FEBM_C_C8 0x1.a01a02p-16f
#define FEBM_C_C10 -0x1.27e4fcp-22f

namespace fastebm {

// Task ids: index into fastebm.corrupt.SAMPLE_TASKS.
enum Task : int32_t { kMim = 0, kSort = 1, kSr = 2, kDenoise = 3, kColorize = 4 };
enum Purpose : uint32_t { kPurposeNoise = 0, kPurposePatchKeys = 1, kPurposeTaskChoice = 2 };

struct CorruptArgs {
  const void* images;        // (B, C, H, W) uint8 (0..255) or float32 ([0, 1]), contiguous
  int images_uint8;          // 1: uint8, 0: float32
  float* clean;              // (B, C, H, W) out: (pixel - mean_c) / std_c
  float* corrupted;          // (B, C, H, W) out
  float* weight;             // (B, 1, H, W) out
  const int32_t* task_ids;   // (B,)
  const int32_t* patch_src;  // (B, P): source patch of each patch (sort), -1 = masked (mim)
  const int64_t* sample_ids; // (B,) global sample index, Philox counter word 1
  const float* mean;         // (C,)
  const float* std;          // (C,)
  const float* noise_scale;  // (C,) noise std in normalised units (sigma / std_c)
  int64_t batch, channels, height, width;
  int64_t patch_size, num_patches, sr_factor;
  uint32_t key0, key1, offset;
};

// ---- correctly rounded float32 operations, never fused ---------------------------------------
FEBM_HD float f_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FEBM_HD float f_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FEBM_HD float f_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FEBM_HD float f_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FEBM_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}
FEBM_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ---- Philox4x32-10 ------------------------------------------------------------------------------
struct U32x4 {
  uint32_t v[4];
};

FEBM_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = (uint64_t)0xD2511F53u * c0;
    const uint64_t p1 = (uint64_t)0xCD9E8D57u * c2;
    const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1;
    c3 = (uint32_t)p0;
    c0 = n0;
    c2 = n2;
  }
  U32x4 out = {{c0, c1, c2, c3}};
  return out;
}

// Word i of a sample's stream (philox.philox_uint32): word i % 4 of counter (i / 4, sample, offset, purpose).
FEBM_HD uint32_t philox_word(uint32_t sample_id, int64_t i, uint32_t offset, uint32_t purpose, uint32_t k0, uint32_t k1) {
  const U32x4 r = philox4x32_10((uint32_t)(i >> 2), sample_id, offset, purpose, k0, k1);
  const int j = (int)(i & 3);  // selected without indexing, so r stays in registers
  return j == 0 ? r.v[0] : j == 1 ? r.v[1] : j == 2 ? r.v[2] : r.v[3];
}

// ---- square root: bit-trick guess + 3 Heron steps (as philox._sqrt_heron; not sqrtf, whose
// torch CPU counterpart is not always correctly rounded) ---------------------------------------
FEBM_HD float sqrt_heron(float y) {
  float g = bits_float((float_bits(y) >> 1) + 0x1FBD1DF5u);
  for (int i = 0; i < 3; ++i) g = f_mul(f_add(g, f_div(y, g)), FEBM_C_HALF);
  return y > 0.0f ? g : 0.0f;
}

// ---- Box-Muller (same operation sequence as philox.box_muller) --------------------------------
FEBM_HD void box_muller(uint32_t xa, uint32_t xb, float* z_cos, float* z_sin) {
  // log(u), u = ((xa >> 8) + 1) / 2^24 = m * 2^(e - 24), m in [sqrt(1/2), sqrt(2))
  const float k = (float)((xa >> 8) + 1u);  // exact: at most 2^24
  const uint32_t bits = float_bits(k);
  int32_t e = (int32_t)(bits >> 23) - 127;
  float m = bits_float((bits & 0x7FFFFFu) | 0x3F800000u);
  if (m > FEBM_C_SQRT2) {
    m = f_mul(m, FEBM_C_HALF);
    e += 1;
  }
  const float ef = (float)(e - 24);
  const float s = f_div(f_sub(m, FEBM_C_ONE), f_add(m, FEBM_C_ONE));
  const float s2 = f_mul(s, s);
  float p = FEBM_C_L11;
  p = f_add(f_mul(p, s2), FEBM_C_L9);
  p = f_add(f_mul(p, s2), FEBM_C_L7);
  p = f_add(f_mul(p, s2), FEBM_C_L5);
  p = f_add(f_mul(p, s2), FEBM_C_L3);
  p = f_mul(p, s2);
  const float log_m = f_mul(f_add(s, f_mul(s, p)), FEBM_C_TWO);
  const float log_u = f_add(f_mul(ef, FEBM_C_LN2_HI), f_add(log_m, f_mul(ef, FEBM_C_LN2_LO)));
  const float radius = sqrt_heron(f_mul(log_u, FEBM_C_NEG_TWO));

  // angle 2 pi j / 2^24: quadrant from the integer, |a| <= pi/4 left for the polynomials
  const int32_t j = (int32_t)(xb >> 8);
  const int32_t turns = (j + (1 << 21)) >> 22;
  const int32_t quadrant = turns & 3;
  const float a = f_mul((float)(j - (turns << 22)), FEBM_C_ANGLE);
  const float a2 = f_mul(a, a);
  float sp = FEBM_C_S9;
  sp = f_add(f_mul(sp, a2), FEBM_C_S7);
  sp = f_add(f_mul(sp, a2), FEBM_C_S5);
  sp = f_add(f_mul(sp, a2), FEBM_C_S3);
  const float sin_a = f_add(a, f_mul(f_mul(a, a2), sp));
  float cp = FEBM_C_C10;
  cp = f_add(f_mul(cp, a2), FEBM_C_C8);
  cp = f_add(f_mul(cp, a2), FEBM_C_C6);
  cp = f_add(f_mul(cp, a2), FEBM_C_C4);
  cp = f_add(f_mul(cp, a2), FEBM_C_C2);
  const float cos_a = f_add(FEBM_C_ONE, f_mul(a2, cp));
  float cos_t, sin_t;
  switch (quadrant) {
    case 0: cos_t = cos_a; sin_t = sin_a; break;
    case 1: cos_t = -sin_a; sin_t = cos_a; break;
    case 2: cos_t = -cos_a; sin_t = -sin_a; break;
    default: cos_t = sin_a; sin_t = -cos_a; break;
  }
  *z_cos = f_mul(radius, cos_t);
  *z_sin = f_mul(radius, sin_t);
}

// ---- pixels -------------------------------------------------------------------------------------
FEBM_HD float load_pixel(const CorruptArgs& a, int64_t i) {
  if (a.images_uint8) return f_div((float)static_cast<const uint8_t*>(a.images)[i], 255.0f);
  return static_cast<const float*>(a.images)[i];
}
FEBM_HD float normalise(const CorruptArgs& a, float p, int64_t c) { return f_div(f_sub(p, a.mean[c]), a.std[c]); }

// Index arithmetic inside one sample is 32-bit (callers guarantee C*H*W < 2^31): 64-bit integer
// division costs several times more on the GPU. Only sample base offsets are 64-bit.
typedef uint32_t idx_t;

// Number of units (threads) a sample with this task needs.
FEBM_HD idx_t num_units(const CorruptArgs& a, int32_t task) {
  const idx_t H = (idx_t)a.height, W = (idx_t)a.width;
  if (task == kDenoise) return ((idx_t)a.channels * H * W + 3u) / 4u;
  if (task == kSr) {
    const idx_t f = (idx_t)a.sr_factor;
    return ((H + f - 1u) / f) * ((W + f - 1u) / f);
  }
  return H * W;
}

// The most units any task needs: the width of the launch grid.
FEBM_HD int64_t max_units(const CorruptArgs& a) {
  const int64_t pix = a.height * a.width;
  const int64_t groups = (a.channels * pix + 3) / 4;
  return pix > groups ? pix : groups;
}

// mim / sort / colorize (and any unknown id: identity): unit = one pixel.
FEBM_HD void process_pixel(const CorruptArgs& a, int64_t b, int32_t task, idx_t pix) {
  const idx_t W = (idx_t)a.width, hw = (idx_t)a.height * W, C = (idx_t)a.channels;
  const idx_t h = pix / W, w = pix - h * W;
  const int64_t base = b * (int64_t)C * hw;
  bool masked = false;
  idx_t src_pix = pix;
  const bool patches = (task == kMim || task == kSort) && a.num_patches > 0;
  if (patches) {
    const idx_t ps = (idx_t)a.patch_size, wp = W / ps;
    const idx_t ph = h / ps, pw = w / ps;
    const int32_t src = a.patch_src[b * a.num_patches + (ph * wp + pw)];
    if (task == kMim) {
      masked = src < 0;
    } else if (src >= 0 && src < a.num_patches) {  // out-of-range sources leave the pixel in place
      const idx_t sh = (idx_t)src / wp, sw = (idx_t)src - sh * wp;
      src_pix = (sh * ps + (h - ph * ps)) * W + sw * ps + (w - pw * ps);
    }
  }
  float grey = 0.0f;
  const bool grey_ok = task == kColorize && C == 3u;  // other channel counts: identity
  if (grey_ok) {  // BT.601 luma of the pixel values: (0.299 R + 0.587 G) + 0.114 B
    const float r = load_pixel(a, base + pix), g = load_pixel(a, base + hw + pix), bl = load_pixel(a, base + 2 * hw + pix);
    grey = f_add(f_add(f_mul(r, 0.299f), f_mul(g, 0.587f)), f_mul(bl, 0.114f));
  }
  for (idx_t c = 0; c < C; ++c) {
    const int64_t i = base + (c * hw + pix);
    const float clean = normalise(a, load_pixel(a, i), c);
    a.clean[i] = clean;
    float out = clean;
    if (task == kMim) {
      out = masked ? 0.0f : clean;
    } else if (task == kSort && patches) {
      out = normalise(a, load_pixel(a, base + (c * hw + src_pix)), c);
    } else if (grey_ok) {
      out = normalise(a, grey, c);
    }
    a.corrupted[i] = out;
  }
  a.weight[b * (int64_t)hw + pix] = (task == kMim && patches) ? (masked ? 1.0f : 0.0f) : 1.0f;
}

// sr: unit = one factor x factor block; every pixel gets the block mean (sum row by row from 0).
FEBM_HD void process_sr_block(const CorruptArgs& a, int64_t b, idx_t unit) {
  const idx_t f = (idx_t)a.sr_factor, H = (idx_t)a.height, W = (idx_t)a.width, C = (idx_t)a.channels;
  const idx_t hw = H * W, wb = (W + f - 1u) / f;
  const idx_t bh = unit / wb;
  const idx_t h0 = bh * f, w0 = (unit - bh * wb) * f;
  const idx_t h1 = h0 + f < H ? h0 + f : H;
  const idx_t w1 = w0 + f < W ? w0 + f : W;
  const float count = (float)((h1 - h0) * (w1 - w0));
  const int64_t base = b * (int64_t)C * hw;
  for (idx_t c = 0; c < C; ++c) {
    float total = 0.0f;
    for (idx_t h = h0; h < h1; ++h) {
      for (idx_t w = w0; w < w1; ++w) {
        const int64_t i = base + (c * hw + h * W + w);
        const float clean = normalise(a, load_pixel(a, i), c);
        a.clean[i] = clean;
        total = f_add(total, clean);
      }
    }
    const float mean = f_div(total, count);
    for (idx_t h = h0; h < h1; ++h)
      for (idx_t w = w0; w < w1; ++w) a.corrupted[base + (c * hw + h * W + w)] = mean;
  }
  for (idx_t h = h0; h < h1; ++h)
    for (idx_t w = w0; w < w1; ++w) a.weight[b * (int64_t)hw + (h * W + w)] = 1.0f;
}

// denoise: unit = elements 4g .. 4g+3 of the sample (order c, h, w) = one Philox call.
FEBM_HD void process_noise_group(const CorruptArgs& a, int64_t b, idx_t g) {
  const idx_t hw = (idx_t)a.height * (idx_t)a.width, n = (idx_t)a.channels * hw;
  const U32x4 x = philox4x32_10(g, (uint32_t)a.sample_ids[b], a.offset, kPurposeNoise, a.key0, a.key1);
  float z[4];
  box_muller(x.v[0], x.v[1], &z[0], &z[1]);
  box_muller(x.v[2], x.v[3], &z[2], &z[3]);
  const idx_t e0 = 4u * g;
  idx_t c = e0 / hw, pos = e0 - c * hw;  // channel and pixel of element e0, advanced without division
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int l = 0; l < 4; ++l) {  // fully unrolled on the device, so z[] stays in registers
    if (e0 + (idx_t)l < n) {
      const int64_t i = b * (int64_t)n + (e0 + (idx_t)l);
      const float clean = normalise(a, load_pixel(a, i), c);
      a.clean[i] = clean;
      a.corrupted[i] = f_add(clean, f_mul(z[l], a.noise_scale[c]));
      if (c == 0) a.weight[b * (int64_t)hw + pos] = 1.0f;
      if (++pos == hw) {
        pos = 0;
        ++c;
      }
    }
  }
}

// One unit of sample b (callers guarantee unit < num_units(a, task_ids[b])).
FEBM_HD void process_unit(const CorruptArgs& a, int64_t b, idx_t unit) {
  const int32_t task = a.task_ids[b];
  if (task == kDenoise) {
    process_noise_group(a, b, unit);
  } else if (task == kSr) {
    process_sr_block(a, b, unit);
  } else {
    process_pixel(a, b, task, unit);
  }
}

}  // namespace fastebm
