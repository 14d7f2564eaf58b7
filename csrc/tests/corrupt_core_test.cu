// Standalone check of the fused corruption kernel (no libtorch): random uint8 and float batches
// with every task are corrupted on the GPU and by the host loop; the outputs must be bitwise equal.
// Without a CUDA device it prints a notice and exits 0 (the build itself is the check there).
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "corrupt_launch.h"

#define CHECK_CUDA(x)                                                                   \
  do {                                                                                  \
    cudaError_t err_ = (x);                                                             \
    if (err_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(err_));            \
      return 1;                                                                         \
    }                                                                                   \
  } while (0)

template <typename T>
static T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  if (cudaMalloc(&d, v.size() * sizeof(T) + 1) != cudaSuccess) return nullptr;
  cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

static int run_case(bool uint8_input, std::mt19937& rng) {
  const int64_t B = 10, C = 3, H = 48, W = 40, ps = 8, P = (H / ps) * (W / ps), f = 3;
  const int64_t n = B * C * H * W, npix = B * H * W;
  std::vector<uint8_t> img8(n);
  std::vector<float> imgf(n);
  for (int64_t i = 0; i < n; ++i) {
    img8[i] = (uint8_t)(rng() & 255);
    imgf[i] = (float)(rng() % 100000) / 100000.0f;
  }
  std::vector<int32_t> tasks(B), src(B * P);
  std::vector<int64_t> sids(B);
  for (int64_t b = 0; b < B; ++b) {
    tasks[b] = (int32_t)(b % 5);
    sids[b] = 1000 + 7 * b;
    for (int64_t p = 0; p < P; ++p) src[b * P + p] = (int32_t)p;
    for (int64_t k = 0; k < P / 3; ++k) {  // some masked (mim) / swapped (sort) patches
      const int64_t p = rng() % P, q = rng() % P;
      if (tasks[b] == fastebm::kMim) src[b * P + p] = -1;
      if (tasks[b] == fastebm::kSort) std::swap(src[b * P + p], src[b * P + q]);
    }
  }
  std::vector<float> mean = {0.485f, 0.456f, 0.406f}, stdv = {0.229f, 0.224f, 0.225f};
  std::vector<float> noise = {0.2f / 0.229f, 0.2f / 0.224f, 0.2f / 0.225f};

  fastebm::CorruptArgs h;
  std::memset(&h, 0, sizeof(h));
  h.images = uint8_input ? (const void*)img8.data() : (const void*)imgf.data();
  h.images_uint8 = uint8_input;
  std::vector<float> clean(n), corr(n), wgt(npix);
  h.clean = clean.data();
  h.corrupted = corr.data();
  h.weight = wgt.data();
  h.task_ids = tasks.data();
  h.patch_src = src.data();
  h.sample_ids = sids.data();
  h.mean = mean.data();
  h.std = stdv.data();
  h.noise_scale = noise.data();
  h.batch = B; h.channels = C; h.height = H; h.width = W;
  h.patch_size = ps; h.num_patches = P; h.sr_factor = f;
  h.key0 = 12345u; h.key1 = 678u; h.offset = 42u;
  fastebm::fused_corrupt_host(h);

  fastebm::CorruptArgs d = h;
  d.images = uint8_input ? (const void*)to_device(img8) : (const void*)to_device(imgf);
  d.task_ids = to_device(tasks);
  d.patch_src = to_device(src);
  d.sample_ids = to_device(sids);
  d.mean = to_device(mean);
  d.std = to_device(stdv);
  d.noise_scale = to_device(noise);
  std::vector<float> poison(n, 1e30f), poison_w(npix, 1e30f);  // poison outputs before the kernel runs
  d.clean = to_device(poison);
  d.corrupted = to_device(poison);
  d.weight = to_device(poison_w);
  CHECK_CUDA(fastebm::launch_fused_corrupt(d, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> dclean(n), dcorr(n), dwgt(npix);
  CHECK_CUDA(cudaMemcpy(dclean.data(), d.clean, n * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(dcorr.data(), d.corrupted, n * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(dwgt.data(), d.weight, npix * 4, cudaMemcpyDeviceToHost));
  int bad = 0;
  bad += std::memcmp(dclean.data(), clean.data(), n * 4) != 0;
  bad += std::memcmp(dcorr.data(), corr.data(), n * 4) != 0;
  bad += std::memcmp(dwgt.data(), wgt.data(), npix * 4) != 0;
  std::printf("%s input: %s\n", uint8_input ? "uint8" : "float32", bad ? "MISMATCH" : "bitwise equal");
  return bad;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("corrupt_core_test: no CUDA device; built only (kernel not run)\n");
    return 0;
  }
  std::mt19937 rng(2024);
  int bad = run_case(true, rng) + run_case(false, rng);
  return bad ? 1 : 0;
}
