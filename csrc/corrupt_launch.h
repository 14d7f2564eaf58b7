// Entry points of the fused corruption: the CUDA launch (corrupt_kernel.cu) and the host loop
// (corrupt_host.cpp). Both validate nothing: callers (corrupt_op.cpp, the Python wrapper) do.
#pragma once

#include "corrupt_core.h"

#if defined(__CUDACC__) || defined(FASTEBM_WITH_CUDA_RUNTIME)
#include <cuda_runtime.h>
namespace fastebm {
// Launches the fused kernel on `stream`; returns the launch status.
cudaError_t launch_fused_corrupt(const CorruptArgs& args, cudaStream_t stream);
// out[b * n + i] = philox_word(sample_ids[b], i, ...) as int64 (the plan's random words on the GPU).
cudaError_t launch_philox_words(const int64_t* sample_ids, int64_t batch, int64_t n, uint32_t key0, uint32_t key1,
                                uint32_t offset, uint32_t purpose, int64_t* out, cudaStream_t stream);
}  // namespace fastebm
#endif

namespace fastebm {
// The same computation on the host, unit by unit (for tests and CPU-only builds).
void fused_corrupt_host(const CorruptArgs& args);
}  // namespace fastebm

extern "C" {
// C ABI of fused_corrupt_host for ctypes (tests/test_corrupt_kernels.py). Returns 0, or 1 when
// a shape argument is invalid.
int fastebm_fused_corrupt_host(const void* images, int images_uint8, float* clean, float* corrupted, float* weight,
                               const int32_t* task_ids, const int32_t* patch_src, const int64_t* sample_ids,
                               const float* mean, const float* std, const float* noise_scale, int64_t batch,
                               int64_t channels, int64_t height, int64_t width, int64_t patch_size,
                               int64_t num_patches, int64_t sr_factor, uint32_t key0, uint32_t key1,
                               uint32_t offset);
// Host version of launch_philox_words.
void fastebm_philox_words_host(const int64_t* sample_ids, int64_t batch, int64_t n, uint32_t key0, uint32_t key1,
                               uint32_t offset, uint32_t purpose, int64_t* out);
}
