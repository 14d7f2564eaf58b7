// torch op binding of the fused corruption kernel: the CUDA implementation of
// torch.ops.fastebm.fused_corrupt. The schema and the fake (meta) implementation are registered in
// Python (fastebm/corrupt/_ext.py), which also validates arguments with clear ValueErrors; the
// TORCH_CHECKs below are a second line of defence for direct callers of the op.
#define FASTEBM_WITH_CUDA_RUNTIME 1
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "corrupt_launch.h"

namespace {

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "fused_corrupt: ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_corrupt: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fused_corrupt: ", name, " must have shape (", n, "), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fused_corrupt: ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_corrupt_cuda(
    const at::Tensor& images, const at::Tensor& task_ids, const at::Tensor& patch_src, const at::Tensor& sample_ids,
    const at::Tensor& mean, const at::Tensor& std, const at::Tensor& noise_scale, int64_t key0, int64_t key1,
    int64_t offset, int64_t patch_size, int64_t sr_factor) {
  TORCH_CHECK(images.is_cuda(), "fused_corrupt: images must be a CUDA tensor");
  TORCH_CHECK(images.dim() == 4, "fused_corrupt: images must be (B, C, H, W), got ", images.sizes());
  TORCH_CHECK(images.scalar_type() == at::kByte || images.scalar_type() == at::kFloat,
              "fused_corrupt: images must be uint8 or float32, got ", images.scalar_type());
  TORCH_CHECK(images.is_contiguous(), "fused_corrupt: images must be contiguous");
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  TORCH_CHECK(C * H * W < (int64_t(1) << 31), "fused_corrupt: one image must have fewer than 2**31 elements");
  const at::Device device = images.device();
  check_vector(task_ids, "task_ids", at::kInt, B, device);
  check_vector(sample_ids, "sample_ids", at::kLong, B, device);
  check_vector(mean, "mean", at::kFloat, C, device);
  check_vector(std, "std", at::kFloat, C, device);
  check_vector(noise_scale, "noise_scale", at::kFloat, C, device);
  TORCH_CHECK(patch_src.device() == device && patch_src.scalar_type() == at::kInt && patch_src.dim() == 2 &&
                  patch_src.size(0) == B && patch_src.is_contiguous(),
              "fused_corrupt: patch_src must be a contiguous int32 (B, P) tensor on ", device);
  TORCH_CHECK(patch_size >= 1 && sr_factor >= 2, "fused_corrupt: need patch_size >= 1 and sr_factor >= 2");
  const int64_t P = patch_src.size(1);
  TORCH_CHECK(P == 0 || (H % patch_size == 0 && W % patch_size == 0 && P == (H / patch_size) * (W / patch_size)),
              "fused_corrupt: patch_src has ", P, " patches per sample, expected ", (H / patch_size) * (W / patch_size),
              " for ", H, "x", W, " images and patch_size ", patch_size);
  TORCH_CHECK(key0 >= 0 && key0 < (int64_t(1) << 32) && key1 >= 0 && key1 < (int64_t(1) << 32) && offset >= 0 &&
                  offset < (int64_t(1) << 32),
              "fused_corrupt: key0, key1 and offset must be in [0, 2**32)");

  const c10::cuda::CUDAGuard guard(device);
  auto opts = images.options().dtype(at::kFloat);
  at::Tensor clean = at::empty({B, C, H, W}, opts);
  at::Tensor corrupted = at::empty({B, C, H, W}, opts);
  at::Tensor weight = at::empty({B, 1, H, W}, opts);

  fastebm::CorruptArgs a;
  a.images = images.data_ptr();
  a.images_uint8 = images.scalar_type() == at::kByte;
  a.clean = clean.data_ptr<float>();
  a.corrupted = corrupted.data_ptr<float>();
  a.weight = weight.data_ptr<float>();
  a.task_ids = task_ids.data_ptr<int32_t>();
  a.patch_src = P ? patch_src.data_ptr<int32_t>() : nullptr;
  a.sample_ids = sample_ids.data_ptr<int64_t>();
  a.mean = mean.data_ptr<float>();
  a.std = std.data_ptr<float>();
  a.noise_scale = noise_scale.data_ptr<float>();
  a.batch = B;
  a.channels = C;
  a.height = H;
  a.width = W;
  a.patch_size = patch_size;
  a.num_patches = P;
  a.sr_factor = sr_factor;
  a.key0 = static_cast<uint32_t>(key0);
  a.key1 = static_cast<uint32_t>(key1);
  a.offset = static_cast<uint32_t>(offset);
  C10_CUDA_CHECK(fastebm::launch_fused_corrupt(a, c10::cuda::getCurrentCUDAStream().stream()));
  return {clean, corrupted, weight};
}

at::Tensor philox_words_cuda(const at::Tensor& sample_ids, int64_t n, int64_t key0, int64_t key1, int64_t offset,
                             int64_t purpose) {
  TORCH_CHECK(sample_ids.is_cuda() && sample_ids.scalar_type() == at::kLong && sample_ids.dim() == 1 &&
                  sample_ids.is_contiguous(),
              "philox_words: sample_ids must be a contiguous 1-D int64 CUDA tensor");
  TORCH_CHECK(n >= 0 && n < (int64_t(1) << 34), "philox_words: need 0 <= n < 2**34");
  for (int64_t v : {key0, key1, offset, purpose})
    TORCH_CHECK(v >= 0 && v < (int64_t(1) << 32), "philox_words: key0, key1, offset and purpose must be in [0, 2**32)");
  const c10::cuda::CUDAGuard guard(sample_ids.device());
  at::Tensor out = at::empty({sample_ids.size(0), n}, sample_ids.options());
  C10_CUDA_CHECK(fastebm::launch_philox_words(sample_ids.data_ptr<int64_t>(), sample_ids.size(0), n,
                                              static_cast<uint32_t>(key0), static_cast<uint32_t>(key1),
                                              static_cast<uint32_t>(offset), static_cast<uint32_t>(purpose),
                                              out.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

}  // namespace

// The schema is defined in Python (torch.library.define in fastebm/corrupt/_ext.py) so that the op
// and its fake implementation exist on machines without this extension.
TORCH_LIBRARY_IMPL(fastebm, CUDA, m) {
  m.impl("fused_corrupt", &fused_corrupt_cuda);
  m.impl("philox_words", &philox_words_cuda);
}
