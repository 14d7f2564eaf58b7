// The fused normalise + corrupt CUDA kernel.
//
// Block-level algorithm: grid (ceil(max_units / 256), min(B, 65535)); blockIdx.y walks the samples
// (grid-stride), threadIdx.x + blockIdx.x * 256 is the unit index inside the sample. A thread
// reads its sample's task id, returns if its unit index is past that task's unit count, and
// otherwise processes one unit (corrupt_core.h: one pixel for mim/sort/colorize, one sr block,
// or four consecutive elements with one Philox call for denoise). Adjacent threads touch adjacent
// pixels, so global loads and stores coalesce; each input byte is read once (sr, sort and
// colorize reread only within their own block/patch/pixel), each output written once.
//
// PyTorch reference beside it: fastebm/corrupt/reference.py (apply_plan) and
// fastebm/corrupt/api.py (prepare_batch_reference).
#include "corrupt_launch.h"

namespace fastebm {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) fused_corrupt_kernel(const CorruptArgs args) {
  const int64_t unit = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (int64_t b = blockIdx.y; b < args.batch; b += gridDim.y) {
    if (unit < (int64_t)num_units(args, args.task_ids[b])) process_unit(args, b, (idx_t)unit);
  }
}

cudaError_t launch_fused_corrupt(const CorruptArgs& args, cudaStream_t stream) {
  if (args.batch == 0) return cudaSuccess;
  const int64_t units = max_units(args);
  const dim3 grid((unsigned)((units + kThreads - 1) / kThreads), (unsigned)(args.batch < 65535 ? args.batch : 65535));
  fused_corrupt_kernel<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// One thread per (sample, word): the random words of a corruption plan (mix task choice, mim/sort
// patch keys) in one launch instead of the ~200 element-wise launches of the PyTorch emulation.
__global__ void __launch_bounds__(kThreads) philox_words_kernel(const int64_t* sample_ids, int64_t batch, int64_t n,
                                                                uint32_t key0, uint32_t key1, uint32_t offset,
                                                                uint32_t purpose, int64_t* out) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= batch * n) return;
  const int64_t b = idx / n, i = idx - b * n;
  out[idx] = (int64_t)philox_word((uint32_t)sample_ids[b], i, offset, purpose, key0, key1);
}

cudaError_t launch_philox_words(const int64_t* sample_ids, int64_t batch, int64_t n, uint32_t key0, uint32_t key1,
                                uint32_t offset, uint32_t purpose, int64_t* out, cudaStream_t stream) {
  const int64_t total = batch * n;
  if (total == 0) return cudaSuccess;
  philox_words_kernel<<<(unsigned)((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      sample_ids, batch, n, key0, key1, offset, purpose, out);
  return cudaGetLastError();
}

}  // namespace fastebm
