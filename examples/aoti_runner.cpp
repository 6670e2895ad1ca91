// Runs a polar-compile `aoti` export artifact from C++ (no Python): the dense prefill of a left-padded batch, then
// greedy decode steps with the polar decode step, the KV cache in tensors this program owns and the packages write
// into in place. Prints the tokens and tokens/s.
//
// Export first (Python), e.g. `python examples/deploy.py --format aoti --out art/`, or
// `polar-compile export --format aoti ...`. A package with sparse-MLP sites calls polar::mlp_route through
// PyTorch's dispatcher, which needs Python and polar_compile: run those from Python (examples/deploy.py).
// Attention-only packages (the routed attention is compiled into the package) run here.
//
// Build (not built in CI; g++ >= 9 and the torch that exported the artifact):
//   TORCH=$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
//   g++ -std=c++20 -O2 examples/aoti_runner.cpp -o aoti_runner -I$TORCH/include \
//       -I$TORCH/include/torch/csrc/api/include -L$TORCH/lib -Wl,-rpath,$TORCH/lib -ltorch -ltorch_cpu -lc10 \
//       -D_GLIBCXX_USE_CXX11_ABI=1      # add -ltorch_cuda -lc10_cuda for a CUDA artifact
// Run (the sizes are the artifact's polar_export.json: batch_size, max_cache_len, prefill_len, num_layers and
// cache_shape[1], cache_shape[3]; dtype float32 on CPU, see --dtype below for others):
//   ./aoti_runner art/ 3 16 6 3 2 8 [new_tokens] [cpu|cuda] [float32|bfloat16|float16]
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr, "usage: %s ARTIFACT_DIR B L PREFILL_LEN LAYERS KV_HEADS HEAD_DIM [NEW_TOKENS] [DEVICE] [DTYPE]\n",
                 argv[0]);
    return 2;
  }
  const std::string folder = argv[1];
  const int64_t batch = std::stoll(argv[2]), cache_len = std::stoll(argv[3]), prefill_len = std::stoll(argv[4]);
  const int64_t layers = std::stoll(argv[5]), kv_heads = std::stoll(argv[6]), head_dim = std::stoll(argv[7]);
  const int64_t new_tokens = argc > 8 ? std::stoll(argv[8]) : 8;
  const torch::Device device(argc > 9 ? argv[9] : "cpu");
  const std::string dtype_name = argc > 10 ? argv[10] : "float32";
  const auto dtype = dtype_name == "bfloat16" ? torch::kBFloat16 : dtype_name == "float16" ? torch::kFloat16
                                                                                            : torch::kFloat32;
  if (prefill_len + new_tokens > cache_len) {
    std::fprintf(stderr, "prefill_len + new_tokens must fit in the cache (%lld slots)\n", (long long)cache_len);
    return 2;
  }
  torch::NoGradGuard no_grad;
  torch::inductor::AOTIModelPackageLoader prefill(folder + "/prefill.pt2");
  torch::inductor::AOTIModelPackageLoader decode(folder + "/decode.pt2");
  const auto ints = torch::TensorOptions().dtype(torch::kLong).device(device);

  // The cache: key_0, value_0, key_1, ... each [B, Hkv, L, D], written in place by both packages.
  std::vector<at::Tensor> cache;
  for (int64_t i = 0; i < 2 * layers; ++i) {
    cache.push_back(torch::zeros({batch, kv_heads, cache_len, head_dim}, torch::TensorOptions().dtype(dtype).device(device)));
  }
  // Left padding: row r has r pad tokens (at most half the prompt) before its prompt; mask over the whole cache.
  auto mask = torch::ones({batch, cache_len}, ints);
  for (int64_t row = 0; row < batch; ++row) {
    mask.index_put_({row, torch::indexing::Slice(0, std::min(row, prefill_len / 2))}, 0);
  }
  auto positions = (mask.cumsum(-1) - 1).clamp_min(0);  // each row's own positions
  auto prompts = torch::randint(1, 90, {batch, prefill_len}, ints);  // stand-in token ids

  auto step = [&](torch::inductor::AOTIModelPackageLoader& program, const at::Tensor& ids, int64_t first_slot) {
    const int64_t tokens = ids.size(1);
    std::vector<at::Tensor> inputs = {
        ids.contiguous(),  // the packages read inputs with the export's (contiguous) strides
        positions.index({torch::indexing::Slice(), torch::indexing::Slice(first_slot, first_slot + tokens)}).contiguous(),
        mask, torch::arange(first_slot, first_slot + tokens, ints)};
    inputs.insert(inputs.end(), cache.begin(), cache.end());
    return program.run(inputs)[0];  // logits [B, 1, V]
  };

  auto token = step(prefill, prompts, 0).argmax(-1);  // [B, 1]
  std::vector<at::Tensor> generated = {token};
  const auto start = std::chrono::steady_clock::now();
  for (int64_t slot = prefill_len; slot < prefill_len + new_tokens - 1; ++slot) {
    token = step(decode, token, slot).argmax(-1);
    generated.push_back(token);
  }
  if (device.is_cuda()) torch::cuda::synchronize();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("tokens per row:\n");
  std::cout << torch::cat(generated, 1) << std::endl;
  std::printf("%lld decode steps, %.1f tokens/s (batch %lld)\n", (long long)(new_tokens - 1),
              (new_tokens - 1) * batch / seconds, (long long)batch);
  return 0;
}
