// Host version of the fused corruption: the same units as the CUDA kernel, run in a loop.
// Compiled with -ffp-contract=off so that no multiply-add is fused (bit-exactness with the
// PyTorch reference). Used by the CPU tests (through the C ABI below) and the CMake test.
#include "corrupt_launch.h"

namespace fastebm {

void fused_corrupt_host(const CorruptArgs& args) {
  for (int64_t b = 0; b < args.batch; ++b) {
    const idx_t n = num_units(args, args.task_ids[b]);
    for (idx_t unit = 0; unit < n; ++unit) process_unit(args, b, unit);
  }
}

}  // namespace fastebm

extern "C" int fastebm_fused_corrupt_host(const void* images, int images_uint8, float* clean, float* corrupted,
                                          float* weight, const int32_t* task_ids, const int32_t* patch_src,
                                          const int64_t* sample_ids, const float* mean, const float* std,
                                          const float* noise_scale, int64_t batch, int64_t channels, int64_t height,
                                          int64_t width, int64_t patch_size, int64_t num_patches, int64_t sr_factor,
                                          uint32_t key0, uint32_t key1, uint32_t offset) {
  if (batch < 0 || channels < 1 || height < 1 || width < 1 || patch_size < 1 || sr_factor < 2 || num_patches < 0 ||
      channels * height * width >= (int64_t(1) << 31))
    return 1;
  if (num_patches && (height % patch_size || width % patch_size ||
                      num_patches != (height / patch_size) * (width / patch_size)))
    return 1;
  fastebm::CorruptArgs a;
  a.images = images;
  a.images_uint8 = images_uint8;
  a.clean = clean;
  a.corrupted = corrupted;
  a.weight = weight;
  a.task_ids = task_ids;
  a.patch_src = patch_src;
  a.sample_ids = sample_ids;
  a.mean = mean;
  a.std = std;
  a.noise_scale = noise_scale;
  a.batch = batch;
  a.channels = channels;
  a.height = height;
  a.width = width;
  a.patch_size = patch_size;
  a.num_patches = num_patches;
  a.sr_factor = sr_factor;
  a.key0 = key0;
  a.key1 = key1;
  a.offset = offset;
  fastebm::fused_corrupt_host(a);
  return 0;
}

extern "C" void fastebm_philox_words_host(const int64_t* sample_ids, int64_t batch, int64_t n, uint32_t key0,
                                          uint32_t key1, uint32_t offset, uint32_t purpose, int64_t* out) {
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < n; ++i)
      out[b * n + i] = (int64_t)fastebm::philox_word((uint32_t)sample_ids[b], i, offset, purpose, key0, key1);
}
