// ctest: GPU rANS encode/decode and tables against a host reference of the same integer coder.
// Exits 77 (reported as skipped) where no CUDA device is present. Also compiled as host C++
// against the CPU emulation of kernels/host (test_rans_host), where it always runs.
// Arguments select parts: rans, tables, api (default: all three).
#include "perco/rans.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

std::atomic<int> failures{0};  // CHECK runs on several host threads in tables()
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

// --- tables: a host reference of docs/entropy-coding.md, "From probabilities or logits" ------

constexpr uint64_t kOne = 1ull << 31;
constexpr uint32_t kLogitMaxSteps = (1u << 20) - 1;

struct ExpTables {
  std::vector<uint64_t> hi, lo;
};

const ExpTables& exp_tables() {
  static const ExpTables tables = [] {
    ExpTables e;
    e.lo.push_back(kOne);
    for (int i = 1; i < 64; ++i) e.lo.push_back((e.lo.back() * 2146959424ull) >> 31);
    e.hi.push_back(kOne);
    while (e.hi.back() != 0) e.hi.push_back((e.hi.back() * 2114190000ull) >> 31);
    return e;
  }();
  return tables;
}

std::vector<uint32_t> reference_cdf(const float* x, uint32_t k, bool from_logits) {
  float m = -INFINITY;  // the row maximum, NaN ignored
  for (uint32_t i = 0; i < k; ++i)
    if (!std::isnan(x[i]) && x[i] > m) m = x[i];
  const bool valid = std::isfinite(m) && (from_logits || m > 0.0f);
  const ExpTables& e = exp_tables();
  std::vector<uint64_t> w(k, kOne);
  if (valid)
    for (uint32_t i = 0; i < k; ++i) {
      if (from_logits) {
        float t = (m - x[i]) * 4096.0f;
        uint32_t n = std::isnan(t) || t >= static_cast<float>(kLogitMaxSteps) ? kLogitMaxSteps
                     : t < 0.0f                                             ? 0u
                                                                            : static_cast<uint32_t>(t);
        w[i] = (n >> 6) < e.hi.size() ? (e.hi[n >> 6] * e.lo[n & 63]) >> 31 : 0;
      } else {
        float r = x[i] / m;
        w[i] = std::isnan(r) || r < 0.0f ? 0 : static_cast<uint64_t>(static_cast<double>(r) * static_cast<double>(kOne));
      }
    }
  uint64_t total = 0, sum = 0;
  for (uint64_t v : w) total += v;
  const uint64_t budget = (1ull << 24) - k;
  std::vector<uint64_t> f(k);
  for (uint32_t i = 0; i < k; ++i) sum += (f[i] = 1 + w[i] * budget / total);
  f[std::max_element(w.begin(), w.end()) - w.begin()] += (1ull << 24) - sum;  // the first maximum
  std::vector<uint32_t> cdf(k + 1, 0);
  for (uint32_t i = 0; i < k; ++i) cdf[i + 1] = cdf[i] + static_cast<uint32_t>(f[i]);
  return cdf;
}

constexpr int kRowPatterns = 9;

// Row `pattern` of a test batch: ordinary rows, and the degenerate ones the procedure defines.
void fill_row(float* v, uint32_t k, int pattern, bool logits, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (uint32_t i = 0; i < k; ++i) {
    float g = normal(rng), u = uniform(rng);
    float x = 0.0f;
    if (logits) {
      switch (pattern) {
        case 0: x = g * 0.1f; break;
        case 1: x = g * 3.0f; break;
        case 2: x = i < k / 3 ? -inf : g * 40.0f; break;          // -inf: frequency 1
        case 3: x = 5.0f; break;                                   // all equal
        case 4: x = i % 7 == 3 ? nan : g * 2.0f; break;            // NaN: frequency 1
        case 5: x = nan; break;                                    // no maximum: flat
        case 6: x = i == k / 2 ? inf : g; break;                   // +inf maximum: flat
        case 7: x = (u - 0.5f) * 2e6f; break;                      // far below the cap
        default: x = i % 2 ? -inf : g * 1e-3f; break;              // tiny differences
      }
    } else {
      switch (pattern) {
        case 0: x = u; break;
        case 1: x = std::pow(u, 8.0f); break;                      // skewed
        case 2: x = i % 3 == 0 ? 0.0f : i % 3 == 1 ? -u : u; break;  // zeros and negatives: frequency 1
        case 3: x = i % 5 == 2 ? nan : u * 7.0f; break;            // NaN: frequency 1, any scale
        case 4: x = 0.0f; break;                                   // maximum 0: flat
        case 5: x = u * 1e-40f; break;                             // subnormal, still valid
        case 6: x = i == 1 ? inf : u; break;                       // +inf maximum: flat
        case 7: x = u * 3e38f; break;                              // near FLT_MAX
        default: x = i == k - 1 ? 1.0f : 0.0f; break;              // one-hot
      }
    }
    v[i] = x;
  }
}

// Rows use patterns first_pattern, first_pattern + 1, ... (mod kRowPatterns).
void tables_match_reference(uint32_t k, bool from_logits, uint32_t rows, uint64_t seed, cudaStream_t stream,
                            int first_pattern = 0) {
  std::mt19937_64 rng(seed);
  std::vector<float> values(static_cast<size_t>(rows) * k);
  auto pattern = [&](uint32_t r) { return static_cast<int>((first_pattern + r) % kRowPatterns); };
  for (uint32_t r = 0; r < rows; ++r) fill_row(values.data() + static_cast<size_t>(r) * k, k, pattern(r), from_logits, rng);
  float* d_values = to_device(values);
  uint32_t* d_cdf;
  uint64_t* d_scratch;
  cudaMalloc(&d_cdf, static_cast<size_t>(rows) * (k + 1) * 4);
  cudaMalloc(&d_scratch, static_cast<size_t>(rows) * k * 8);
  CHECK(perco_tables_from_values(d_values, rows, k, from_logits, d_cdf, d_scratch, stream) == PERCO_OK, "tables k=%u", k);
  cudaStreamSynchronize(stream);
  auto cdf = to_host(d_cdf, static_cast<size_t>(rows) * (k + 1));
  for (uint32_t r = 0; r < rows; ++r) {
    auto want = reference_cdf(values.data() + static_cast<size_t>(r) * k, k, from_logits);
    auto got = cdf.begin() + static_cast<size_t>(r) * (k + 1);
    auto diff = std::mismatch(want.begin(), want.end(), got);
    CHECK(diff.first == want.end(), "tables k=%u %s row %u (pattern %d): cdf[%td] = %u, reference %u", k,
          from_logits ? "logits" : "probabilities", r, pattern(r), diff.first - want.begin(),
          *diff.second, *diff.first);
  }
  cudaFree(d_values);
  cudaFree(d_cdf);
  cudaFree(d_scratch);
}

void tables(cudaStream_t stream) {
  uint64_t seed = 1000;
  for (uint32_t k : {2u, 3u, 255u, 256u, 257u, 1000u, 4097u})
    for (bool logits : {true, false}) tables_match_reference(k, logits, kRowPatterns, seed++, stream);
  // K = 65536: 256 scan tiles per row (one row each: the emulation pays ~1 ms per barrier)
  tables_match_reference(65536, true, 1, seed++, 0, 2);
  tables_match_reference(65536, false, 1, seed++, 0, 1);
  // Two host threads, each on its own stream: the entry point is called concurrently.
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([t] {
      cudaStream_t own;
      cudaStreamCreateWithFlags(&own, cudaStreamNonBlocking);
      tables_match_reference(300, t == 0, 4, 77 + t, own);
      cudaStreamDestroy(own);
    });
  for (auto& thread : threads) thread.join();
}

// --- the *_host helpers and their argument checks ---------------------------------------------

// constriction's coder with one cdf row per symbol (row i for symbol i), as host_encode.
std::vector<uint32_t> host_encode_rows(const int32_t* symbols, size_t n, const uint32_t* rows, uint32_t k) {
  std::vector<uint32_t> out;
  uint64_t head = 0;
  for (size_t i = n; i-- > 0;) {
    const uint32_t* cdf = rows + i * (k + 1ull);
    uint32_t cum = cdf[symbols[i]], freq = cdf[symbols[i] + 1] - cum;
    if ((head >> 40) >= freq) { out.push_back(static_cast<uint32_t>(head)); head >>= 32; }
    head = ((head / freq) << 24) | (head % freq + cum);
  }
  out.push_back(static_cast<uint32_t>(head));
  out.push_back(static_cast<uint32_t>(head >> 32));
  while (!out.empty() && out.back() == 0) out.pop_back();
  return out;
}

// Encode then decode `lengths` streams through the host helpers; `rows_for(stream, symbol)` names
// the cdf row each symbol is coded with.
template <typename RowFor>
void host_round_trip(perco_model model, const std::vector<uint32_t>& cdf, const std::vector<uint32_t>& table_index,
                     const std::vector<uint32_t>& lengths, RowFor rows_for, std::mt19937_64& rng) {
  const uint32_t k = model.num_symbols, n = static_cast<uint32_t>(lengths.size());
  std::vector<uint64_t> soff{0};
  for (uint32_t len : lengths) soff.push_back(soff.back() + len);
  std::vector<int32_t> symbols(soff.back());
  for (auto& s : symbols) s = static_cast<int32_t>(rng() % k);
  std::vector<uint32_t> words(soff.back() + 2ull * n), counts(n);
  std::vector<int32_t> status(n, -1);
  CHECK(perco_rans_encode_host(model, cdf.size(), table_index.size(), symbols.data(), soff.data(), n, words.data(),
                               counts.data(), status.data()) == PERCO_OK, "encode_host kind %d", model.kind);
  std::vector<uint32_t> packed;
  std::vector<uint64_t> woff{0};
  for (uint32_t s = 0; s < n; ++s) {
    std::vector<uint32_t> rows((k + 1ull) * lengths[s]);
    for (uint64_t i = 0; i < lengths[s]; ++i) {
      const uint32_t* row = cdf.data() + rows_for(s, soff[s] + i) * (k + 1ull);
      std::copy(row, row + k + 1, rows.begin() + i * (k + 1));
    }
    auto want = host_encode_rows(symbols.data() + soff[s], lengths[s], rows.data(), k);
    std::vector<uint32_t> got(words.begin() + soff[s] + 2ull * s, words.begin() + soff[s] + 2ull * s + counts[s]);
    CHECK(status[s] == PERCO_STREAM_OK && got == want, "encode_host kind %d stream %u", model.kind, s);
    packed.insert(packed.end(), got.begin(), got.end());
    woff.push_back(packed.size());
  }
  std::vector<int32_t> decoded(std::max<size_t>(1, symbols.size()));
  CHECK(perco_rans_decode_host(model, cdf.size(), table_index.size(), packed.data(), woff.data(), soff.data(), n,
                               decoded.data(), status.data()) == PERCO_OK, "decode_host kind %d", model.kind);
  decoded.resize(symbols.size());
  CHECK(decoded == symbols, "decode_host kind %d mismatch", model.kind);
  for (int32_t st : status) CHECK(st == PERCO_STREAM_OK, "decode_host kind %d status %d", model.kind, st);
}

void host_helpers() {
  std::mt19937_64 rng(4242);
  const uint32_t k = 40;
  // A per-symbol batch with no symbols at all: streams of no words (OK) and a lone state word
  // (TRUNCATED), as the CPU path; the helpers used to refuse it (a 0-word table upload left a
  // null device table, which perco_rans_decode refuses).
  {
    uint32_t none = 0;  // any pointer: the batch's table array is empty
    perco_model model{PERCO_TABLE_PER_SYMBOL, k, &none, nullptr};
    std::vector<uint64_t> soff = {0, 0, 0}, woff = {0, 0, 1};
    std::vector<uint32_t> words = {5};
    std::vector<int32_t> out(1, -1), status(2, -1);
    perco_result r = perco_rans_decode_host(model, 0, 0, words.data(), woff.data(), soff.data(), 2, out.data(), status.data());
    CHECK(r == PERCO_OK && status[0] == PERCO_STREAM_OK && status[1] == PERCO_STREAM_TRUNCATED,
          "empty per-symbol decode: result %d, statuses %d %d", r, status[0], status[1]);
    int32_t no_symbols = 0;
    std::vector<uint32_t> enc(4, 7), counts(2, 99);
    r = perco_rans_encode_host(model, 0, 0, &no_symbols, soff.data(), 2, enc.data(), counts.data(), status.data());
    CHECK(r == PERCO_OK && counts[0] == 0 && counts[1] == 0 && status[0] == PERCO_STREAM_OK && status[1] == PERCO_STREAM_OK,
          "empty per-symbol encode: result %d, counts %u %u", r, counts[0], counts[1]);
  }
  // Round trips: per-symbol tables; static tables chosen per stream by table_index.
  {
    std::vector<uint32_t> lengths = {0, 3, 1, 50, 0, 17};
    uint32_t total = 0;
    for (uint32_t len : lengths) total += len;
    std::vector<uint32_t> cdf;
    for (uint32_t i = 0; i < total; ++i) {
      auto row = random_cdf(k, rng, i % 4);
      cdf.insert(cdf.end(), row.begin(), row.end());
    }
    host_round_trip(perco_model{PERCO_TABLE_PER_SYMBOL, k, cdf.data(), nullptr}, cdf, {}, lengths,
                    [](uint32_t, uint64_t symbol) { return symbol; }, rng);
    std::vector<uint32_t> tables;
    for (int t = 0; t < 3; ++t) {
      auto row = random_cdf(k, rng, 2.0 * t);
      tables.insert(tables.end(), row.begin(), row.end());
    }
    std::vector<uint32_t> index = {2, 0, 1, 1, 2, 0};
    host_round_trip(perco_model{PERCO_TABLE_STATIC, k, tables.data(), index.data()}, tables, index, lengths,
                    [&](uint32_t stream, uint64_t) { return index[stream]; }, rng);
  }
  // Sizes the helpers can check on the host before anything reaches the device (each of these
  // made the kernels read or write outside a buffer).
  {
    auto row = uniform_cdf(k);
    std::vector<uint32_t> cdf;
    for (int i = 0; i < 4; ++i) cdf.insert(cdf.end(), row.begin(), row.end());
    std::vector<uint64_t> soff = {0, 2, 4}, woff = {0, 1, 2}, bad_soff = {0, 3, 2}, bad_woff = {0, 2, 1};
    std::vector<uint32_t> words = {1, 1}, enc(8), counts(2);
    std::vector<int32_t> symbols = {1, 2, 3, 4}, out(4), status(2);
    std::vector<uint32_t> index = {0, 4}, short_index = {0};
    perco_model per_symbol{PERCO_TABLE_PER_SYMBOL, k, cdf.data(), nullptr};
    perco_model indexed{PERCO_TABLE_STATIC, k, cdf.data(), index.data()};
    perco_model short_indexed{PERCO_TABLE_STATIC, k, cdf.data(), short_index.data()};
    const perco_result invalid = PERCO_ERR_INVALID_ARGUMENT;
    CHECK(perco_rans_decode_host(per_symbol, cdf.size() - 1, 0, words.data(), woff.data(), soff.data(), 2, out.data(),
                                 status.data()) == invalid, "per-symbol cdf shorter than S * (K + 1)");
    CHECK(perco_rans_encode_host(per_symbol, cdf.size() - 1, 0, symbols.data(), soff.data(), 2, enc.data(),
                                 counts.data(), status.data()) == invalid, "per-symbol cdf shorter than S * (K + 1)");
    CHECK(perco_rans_decode_host(indexed, cdf.size(), index.size(), words.data(), woff.data(), soff.data(), 2,
                                 out.data(), status.data()) == invalid, "table_index past the tables");
    CHECK(perco_rans_encode_host(short_indexed, cdf.size(), short_index.size(), symbols.data(), soff.data(), 2,
                                 enc.data(), counts.data(), status.data()) == invalid, "table_index shorter than N");
    CHECK(perco_rans_decode_host(per_symbol, cdf.size(), 0, words.data(), woff.data(), bad_soff.data(), 2, out.data(),
                                 status.data()) == invalid, "decreasing symbol offsets");
    CHECK(perco_rans_decode_host(per_symbol, cdf.size(), 0, words.data(), bad_woff.data(), soff.data(), 2, out.data(),
                                 status.data()) == invalid, "decreasing word offsets");
    CHECK(perco_rans_encode_host(per_symbol, cdf.size(), 0, symbols.data(), bad_soff.data(), 2, enc.data(),
                                 counts.data(), status.data()) == invalid, "decreasing symbol offsets");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (perco_cuda_device_count() == 0) {
    std::printf("no CUDA device: GPU tests skipped\n");
    return 77;
  }
  auto wanted = [&](const char* part) {
    if (argc < 2) return true;
    for (int i = 1; i < argc; ++i)
      if (std::strcmp(argv[i], part) == 0) return true;
    return false;
  };
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);  // a non-default stream
  if (wanted("rans")) {
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
  }
  if (wanted("tables")) tables(stream);
  if (wanted("api")) host_helpers();
  cudaStreamDestroy(stream);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures.load());
  return failures ? 1 : 0;
}
