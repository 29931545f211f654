// ctest: GPU rANS encode/decode and tables against a host reference of the same integer coder.
// Exits 77 (reported as skipped) where no CUDA device is present.
#include "perco/rans.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

int failures = 0;
#define CHECK(cond, ...)                              \
  do {                                                \
    if (!(cond)) {                                    \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);              \
      std::fprintf(stderr, "\n");                     \
      ++failures;                                     \
    }                                                 \
  } while (0)

std::vector<uint32_t> uniform_cdf(uint32_t k) {
  std::vector<uint32_t> cdf(k + 1);
  uint32_t base = (1u << 24) / k;
  for (uint32_t i = 0; i < k; ++i) cdf[i] = i * base;
  cdf[k] = 1u << 24;
  return cdf;
}

std::vector<uint32_t> random_cdf(uint32_t k, std::mt19937_64& rng, double skew) {
  std::vector<double> w(k);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  double total = 0;
  for (auto& v : w) total += (v = std::pow(u(rng), 1.0 + skew));
  std::vector<uint64_t> f(k);
  uint64_t sum = 0, budget = (1ull << 24) - k;
  for (uint32_t i = 0; i < k; ++i) sum += (f[i] = 1 + static_cast<uint64_t>(w[i] / total * budget));
  f[0] += (1ull << 24) - sum;
  std::vector<uint32_t> cdf(k + 1, 0);
  for (uint32_t i = 0; i < k; ++i) cdf[i + 1] = cdf[i] + static_cast<uint32_t>(f[i]);
  return cdf;
}

// Host reference: constriction's AnsCoder (head starts at 0; words in push order; head last).
std::vector<uint32_t> host_encode(const std::vector<int32_t>& symbols, const std::vector<uint32_t>& cdf) {
  std::vector<uint32_t> out;
  uint64_t head = 0;
  for (size_t i = symbols.size(); i-- > 0;) {
    uint32_t cum = cdf[symbols[i]], freq = cdf[symbols[i] + 1] - cum;
    if ((head >> 40) >= freq) { out.push_back(static_cast<uint32_t>(head)); head >>= 32; }
    head = ((head / freq) << 24) | (head % freq + cum);
  }
  out.push_back(static_cast<uint32_t>(head));
  out.push_back(static_cast<uint32_t>(head >> 32));
  while (!out.empty() && out.back() == 0) out.pop_back();
  return out;
}

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  cudaMalloc(&p, std::max<size_t>(1, v.size()) * sizeof(T));
  if (!v.empty()) cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return p;
}

template <typename T>
std::vector<T> to_host(const T* p, size_t n) {
  std::vector<T> v(n);
  if (n) cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

void round_trip(uint32_t k, uint32_t streams, uint32_t max_len, double skew, bool uniform, uint64_t seed,
                cudaStream_t stream) {
  std::mt19937_64 rng(seed);
  std::vector<uint32_t> cdf = uniform ? uniform_cdf(k) : random_cdf(k, rng, skew);
  std::vector<uint64_t> soff{0}, woff{0};
  std::vector<int32_t> symbols;
  std::vector<uint32_t> words;
  std::vector<std::vector<uint32_t>> expected;
  for (uint32_t s = 0; s < streams; ++s) {
    uint32_t n = max_len == 0 ? 0 : static_cast<uint32_t>(rng() % (max_len + 1));
    std::vector<int32_t> part(n);
    for (auto& v : part) {  // sample from the table
      uint32_t q = static_cast<uint32_t>(rng() % (1u << 24));
      v = static_cast<int32_t>(std::upper_bound(cdf.begin(), cdf.end(), q) - cdf.begin() - 1);
    }
    symbols.insert(symbols.end(), part.begin(), part.end());
    soff.push_back(symbols.size());
    expected.push_back(host_encode(part, cdf));
    words.insert(words.end(), expected.back().begin(), expected.back().end());
    woff.push_back(words.size());
  }
  perco_model model{uniform ? PERCO_TABLE_UNIFORM : PERCO_TABLE_STATIC, k, uniform ? nullptr : to_device(cdf), nullptr};
  uint64_t* d_soff = to_device(soff);
  uint64_t* d_woff = to_device(woff);
  uint32_t* d_words = to_device(words);
  int32_t* d_symbols = to_device(symbols);
  int32_t *d_out, *d_status;
  uint32_t *d_enc, *d_counts;
  cudaMalloc(&d_out, std::max<size_t>(1, symbols.size()) * 4);
  cudaMalloc(&d_status, streams * 4);
  cudaMalloc(&d_enc, (symbols.size() + 2ull * streams) * 4);
  cudaMalloc(&d_counts, streams * 4);

  CHECK(perco_rans_decode(model, d_words, d_woff, d_soff, streams, d_out, d_status, stream) == PERCO_OK, "decode");
  cudaStreamSynchronize(stream);
  CHECK(to_host(d_out, symbols.size()) == symbols, "decode mismatch k=%u streams=%u", k, streams);
  for (int32_t st : to_host(d_status, streams)) CHECK(st == PERCO_STREAM_OK, "decode status %d", st);

  CHECK(perco_rans_encode(model, d_symbols, d_soff, streams, d_enc, d_counts, d_status, stream) == PERCO_OK, "enc");
  cudaStreamSynchronize(stream);
  auto enc = to_host(d_enc, symbols.size() + 2ull * streams);
  auto counts = to_host(d_counts, streams);
  auto status = to_host(d_status, streams);
  for (uint32_t s = 0; s < streams; ++s) {
    std::vector<uint32_t> got(enc.begin() + soff[s] + 2ull * s, enc.begin() + soff[s] + 2ull * s + counts[s]);
    CHECK(status[s] == PERCO_STREAM_OK && got == expected[s], "encode mismatch k=%u stream %u", k, s);
  }
  for (void* p : {static_cast<void*>(model.cdf ? const_cast<uint32_t*>(model.cdf) : nullptr),
                  static_cast<void*>(d_soff), static_cast<void*>(d_woff), static_cast<void*>(d_words),
                  static_cast<void*>(d_symbols), static_cast<void*>(d_out), static_cast<void*>(d_status),
                  static_cast<void*>(d_enc), static_cast<void*>(d_counts)})
    if (p) cudaFree(p);
}

void corrupt_streams(cudaStream_t stream) {
  // stream 0 ends in a zero word; stream 1 has a word left over; stream 2 lost its bulk words
  std::vector<int32_t> part(300, 5);
  std::vector<uint32_t> cdf = uniform_cdf(256), good = host_encode(part, cdf);
  std::vector<uint32_t> words = {7, 0};
  std::vector<uint64_t> woff = {0, 2};
  words.insert(words.end(), good.begin(), good.end());
  words.push_back(12345);  // leftover: decoding 300 symbols leaves this word
  woff.push_back(words.size());
  words.insert(words.end(), good.end() - 2, good.end());  // only the state, no bulk
  woff.push_back(words.size());
  std::vector<uint64_t> soff = {0, 1, 301, 601};
  perco_model model{PERCO_TABLE_UNIFORM, 256, nullptr, nullptr};
  uint32_t* d_words = to_device(words);
  uint64_t *d_woff = to_device(woff), *d_soff = to_device(soff);
  int32_t *d_out, *d_status;
  cudaMalloc(&d_out, 601 * 4);
  cudaMalloc(&d_status, 3 * 4);
  CHECK(perco_rans_decode(model, d_words, d_woff, d_soff, 3, d_out, d_status, stream) == PERCO_OK, "decode");
  cudaStreamSynchronize(stream);
  auto status = to_host(d_status, 3);
  CHECK(status[0] == PERCO_STREAM_CORRUPT, "zero word: %d", status[0]);
  CHECK(status[1] != PERCO_STREAM_OK, "leftover: %d", status[1]);
  CHECK(status[2] != PERCO_STREAM_OK, "truncated: %d", status[2]);
  for (void* p : {static_cast<void*>(d_words), static_cast<void*>(d_woff), static_cast<void*>(d_soff),
                  static_cast<void*>(d_out), static_cast<void*>(d_status)})
    cudaFree(p);
}

}  // namespace

int main() {
  if (perco_cuda_device_count() == 0) {
    std::printf("no CUDA device: GPU tests skipped\n");
    return 77;
  }
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);  // a non-default stream
  uint64_t seed = 1;
  for (uint32_t k : {2u, 3u, 256u, 1000u, 8192u, 65536u})
    for (uint32_t streams : {1u, 7u, 1000u})
      for (uint32_t len : {0u, 1u, 17u, 1000u}) {
        round_trip(k, streams, len, 0.0, true, seed++, stream);
        round_trip(k, streams, len, 3.0, false, seed++, stream);
      }
  round_trip(256, 10000, 64, 1.0, false, seed++, 0);     // default stream, many streams
  round_trip(1024, 2, 1000000, 0.5, false, seed++, stream);  // long streams
  corrupt_streams(stream);
  cudaStreamDestroy(stream);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}
