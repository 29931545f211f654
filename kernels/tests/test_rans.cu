// ctest: GPU rANS encode/decode and tables against a host reference of the same integer coder.
// Exits 77 (reported as skipped) where no CUDA device is present. Also compiled as host C++
// against the CPU emulation of kernels/host (test_rans_host), where it always runs.
// Arguments select parts: rans, tables, api, steps, split (default: all).
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
// `stride` 0: one row for every symbol.
std::vector<uint32_t> host_encode_rows(const int32_t* symbols, size_t n, const uint32_t* rows, uint32_t k,
                                       uint64_t stride = ~0ull) {
  if (stride == ~0ull) stride = k + 1ull;
  std::vector<uint32_t> out;
  uint64_t head = 0;
  for (size_t i = n; i-- > 0;) {
    const uint32_t* cdf = rows + i * stride;
    uint32_t cum = cdf[symbols[i]], freq = cdf[symbols[i] + 1] - cum;
    if ((head >> 40) >= freq) { out.push_back(static_cast<uint32_t>(head)); head >>= 32; }
    head = ((head / freq) << 24) | (head % freq + cum);
  }
  out.push_back(static_cast<uint32_t>(head));
  out.push_back(static_cast<uint32_t>(head >> 32));
  while (!out.empty() && out.back() == 0) out.pop_back();
  return out;
}

// The decoder of docs/entropy-coding.md with the kernels' status rule, one cdf row per symbol.
std::vector<int32_t> host_decode_rows(const std::vector<uint32_t>& words, const uint32_t* rows, uint32_t k, size_t n,
                                      int32_t* status, uint64_t stride) {
  std::vector<int32_t> out(n, 0);
  if (!words.empty() && words.back() == 0) {
    *status = PERCO_STREAM_CORRUPT;
    return out;
  }
  uint64_t head = 0;
  size_t pos = 0;
  if (words.size() == 1) head = words[0];
  if (words.size() >= 2) {
    head = (static_cast<uint64_t>(words.back()) << 32) | words[words.size() - 2];
    pos = words.size() - 2;
  }
  for (size_t i = 0; i < n; ++i) {
    const uint32_t* cdf = rows + i * stride;
    const uint32_t q = static_cast<uint32_t>(head & 0xFFFFFF);
    const uint32_t s = static_cast<uint32_t>(std::upper_bound(cdf, cdf + k + 1, q) - cdf - 1);
    head = static_cast<uint64_t>(cdf[s + 1] - cdf[s]) * (head >> 24) + q - cdf[s];
    if (head < (1ull << 32) && pos > 0) head = (head << 32) | words[--pos];
    out[i] = static_cast<int32_t>(s);
  }
  *status = pos > 0 ? PERCO_STREAM_CORRUPT : head != 0 ? PERCO_STREAM_TRUNCATED : PERCO_STREAM_OK;
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
    // split streams and the resumable decoder: P >= 1, N P < 2^32, N P + 1 word offsets checked
    std::vector<uint64_t> split_woff = {0, 1, 1, 2, 2}, bad_split_woff = {0, 1, 0, 2, 2};
    std::vector<int32_t> split_status(4);
    CHECK(perco_rans_decode_split_host(per_symbol, cdf.size(), 0, words.data(), split_woff.data(), soff.data(), 2, 0,
                                       out.data(), split_status.data()) == invalid, "zero splits");
    CHECK(perco_rans_decode_split_host(per_symbol, cdf.size(), 0, words.data(), split_woff.data(), soff.data(), 2,
                                       0x80000000u, out.data(), split_status.data()) == invalid, "N P >= 2^32");
    CHECK(perco_rans_decode_split_host(per_symbol, cdf.size(), 0, words.data(), bad_split_woff.data(), soff.data(), 2,
                                       2, out.data(), split_status.data()) == invalid, "decreasing split word offsets");
    CHECK(perco_rans_encode_split_host(per_symbol, cdf.size(), 0, symbols.data(), soff.data(), 2, 0, enc.data(),
                                       counts.data(), status.data()) == invalid, "zero splits");
    int dummy = 0;
    perco_decoder* decoder = reinterpret_cast<perco_decoder*>(&dummy);  // must be cleared on failure
    CHECK(perco_decoder_create_host(words.data(), bad_split_woff.data(), 2, 2, 0, &decoder) == invalid &&
          decoder == nullptr, "decoder with decreasing word offsets");
    CHECK(perco_decoder_create_host(words.data(), split_woff.data(), 2, 2, 0, &decoder) == PERCO_OK && decoder,
          "decoder_create");
    std::vector<int64_t> steps(4 * 3, 0);
    CHECK(perco_decoder_decode_steps(decoder, steps.data(), 0, 1, nullptr, 2, out.data(), nullptr) == invalid,
          "decode_steps with K = 1");
    CHECK(perco_decoder_decode_host(decoder, per_symbol, 2 * (k + 1), 0, nullptr, 2, out.data(), nullptr) == invalid,
          "decode_host: 4 chunk symbols, 2 table rows");
    CHECK(perco_decoder_finish_host(decoder, split_status.data()) == PERCO_OK &&
          split_status == std::vector<int32_t>({PERCO_STREAM_TRUNCATED, PERCO_STREAM_OK, PERCO_STREAM_TRUNCATED,
                                                PERCO_STREAM_OK}), "finish with nothing decoded");
    perco_decoder_destroy(decoder);
    perco_decoder_destroy(nullptr);
  }
}

// --- tables from integer steps, and the hybrid-mode draw --------------------------------------

// The integer normalisation of docs/entropy-coding.md (as reference_cdf's tail).
std::vector<uint32_t> normalize_reference(const std::vector<uint64_t>& w) {
  const uint32_t k = static_cast<uint32_t>(w.size());
  uint64_t total = 0, sum = 0;
  for (uint64_t v : w) total += v;
  const uint64_t budget = (1ull << 24) - k;
  std::vector<uint64_t> f(k);
  for (uint32_t i = 0; i < k; ++i) sum += (f[i] = 1 + w[i] * budget / total);
  f[std::max_element(w.begin(), w.end()) - w.begin()] += (1ull << 24) - sum;
  std::vector<uint32_t> cdf(k + 1, 0);
  for (uint32_t i = 0; i < k; ++i) cdf[i + 1] = cdf[i] + static_cast<uint32_t>(f[i]);
  return cdf;
}

// numpy's tables_from_steps (engine/entropy/tables.py), the row shifted by its minimum.
std::vector<uint32_t> reference_steps_cdf(const int64_t* x, uint32_t k) {
  const int64_t m = *std::min_element(x, x + k);
  const ExpTables& e = exp_tables();
  std::vector<uint64_t> w(k);
  for (uint32_t i = 0; i < k; ++i) {
    uint64_t n = std::min<uint64_t>(static_cast<uint64_t>(x[i]) - static_cast<uint64_t>(m), kLogitMaxSteps);
    w[i] = (n >> 6) < e.hi.size() ? (e.hi[n >> 6] * e.lo[n & 63]) >> 31 : 0;
  }
  return normalize_reference(w);
}

// Row `pattern` of a steps batch: what the entropy model produces, and the edge cases.
void fill_steps(int64_t* v, uint32_t k, int pattern, std::mt19937_64& rng) {
  std::uniform_int_distribution<int64_t> small(0, 40000), any(0, (1ll << 21));
  for (uint32_t i = 0; i < k; ++i) {
    int64_t x = 0;
    switch (pattern) {
      case 0: x = small(rng); break;                                   // a few nats: ordinary rows
      case 1: x = i == k / 3 ? 0 : any(rng); break;                    // around and beyond the cap 2^20 - 1
      case 2: x = 7; break;                                            // all equal (minimum not 0)
      case 3: x = 1000 + small(rng) / 64; break;                       // minimum far from 0
      case 4: x = i % 2 ? (1ll << 62) : (1ll << 62) - static_cast<int64_t>(i); break;  // huge values
      case 5: x = static_cast<int64_t>(rng() % 73000) - 36000; break;  // negative: shifted (numpy refuses)
      case 6: x = i == k - 1 ? 0 : (1 << 20) - 1; break;               // one-hot at the end
      default: x = static_cast<int64_t>(i % 64) * 63 + (i / 64) % 2; break;  // hi / lo boundaries
    }
    v[i] = x;
  }
}
constexpr int kStepPatterns = 8;

void steps_match_reference(uint32_t k, uint32_t rows, uint64_t seed, cudaStream_t stream) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> steps(static_cast<size_t>(rows) * k);
  for (uint32_t r = 0; r < rows; ++r) fill_steps(steps.data() + static_cast<size_t>(r) * k, k, r % kStepPatterns, rng);
  int64_t* d_steps = to_device(steps);
  uint32_t* d_cdf;
  cudaMalloc(&d_cdf, static_cast<size_t>(rows) * (k + 1) * 4);
  CHECK(perco_tables_from_steps(d_steps, rows, k, d_cdf, stream) == PERCO_OK, "steps tables k=%u", k);
  cudaStreamSynchronize(stream);
  auto cdf = to_host(d_cdf, static_cast<size_t>(rows) * (k + 1));
  std::vector<uint32_t> all_want;
  for (uint32_t r = 0; r < rows; ++r) {
    auto want = reference_steps_cdf(steps.data() + static_cast<size_t>(r) * k, k);
    auto got = cdf.begin() + static_cast<size_t>(r) * (k + 1);
    auto diff = std::mismatch(want.begin(), want.end(), got);
    CHECK(diff.first == want.end(), "steps tables k=%u row %u (pattern %u): cdf[%td] = %u, reference %u", k, r,
          r % kStepPatterns, diff.first - want.begin(), *diff.second, *diff.first);
    all_want.insert(all_want.end(), want.begin(), want.end());
  }
  // The hybrid draw on these rows against the splitmix64 reference.
  const uint64_t seed_draw = 0x1234567890abcdefull + k, group = 3 + k % 5;
  int32_t* d_draw;
  cudaMalloc(&d_draw, rows * 4);
  CHECK(perco_sample_cdf(d_cdf, rows, k, seed_draw, group, d_draw, stream) == PERCO_OK, "sample k=%u", k);
  cudaStreamSynchronize(stream);
  auto draw = to_host(d_draw, rows);
  for (uint32_t r = 0; r < rows; ++r) {
    uint64_t x = seed_draw + ((group << 32) + r + 1) * 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    const uint32_t u = static_cast<uint32_t>(x >> 40);
    auto row = all_want.begin() + static_cast<size_t>(r) * (k + 1);
    const int32_t want = static_cast<int32_t>(std::upper_bound(row, row + k + 1, u) - row - 1);
    CHECK(draw[r] == want, "sample k=%u row %u: %d, reference %d", k, r, draw[r], want);
  }
  cudaFree(d_draw);
  cudaFree(d_steps);
  cudaFree(d_cdf);
}

void steps_tables(cudaStream_t stream) {
  uint64_t seed = 5000;
  for (uint32_t k : {2u, 3u, 255u, 257u, 1000u}) steps_match_reference(k, kStepPatterns, seed++, stream);
  steps_match_reference(8192, 2, seed++, stream);  // 32 scan tiles per row
}

// --- split streams and the resumable decode ------------------------------------------------------

// A test batch: N sequences of the given lengths coded as P sub-streams each, per-symbol tables
// from steps (the learned model's path), a static table or uniform; some streams damaged.
struct SplitBatch {
  uint32_t k, splits;
  perco_table_kind kind;
  std::vector<uint64_t> soff{0};          // [N + 1]
  std::vector<int32_t> symbols;           // [S]
  std::vector<int64_t> steps;             // PER_SYMBOL: [S * K]
  std::vector<uint32_t> cdf;              // PER_SYMBOL: [S * (K+1)]; STATIC: one row
  std::vector<uint32_t> words;            // every sub-stream, as the CPU coder writes it
  std::vector<uint64_t> woff{0};          // [N P + 1]
  std::vector<std::vector<uint32_t>> expected;  // undamaged words per sub-stream
  std::vector<bool> damaged;              // per sub-stream

  uint32_t n() const { return static_cast<uint32_t>(soff.size() - 1); }
  const uint32_t* row(uint64_t symbol) const {
    return kind == PERCO_TABLE_PER_SYMBOL ? cdf.data() + symbol * (k + 1ull) : cdf.data();
  }
  perco_model host_model() const {
    return perco_model{kind, k, kind == PERCO_TABLE_UNIFORM ? nullptr : cdf.data(), nullptr};
  }
};

SplitBatch make_split_batch(uint32_t k, uint32_t splits, perco_table_kind kind, const std::vector<uint32_t>& lengths,
                            bool damage, std::mt19937_64& rng) {
  SplitBatch b{k, splits, kind};
  for (uint32_t len : lengths) b.soff.push_back(b.soff.back() + len);
  const uint64_t total = b.soff.back();
  if (kind == PERCO_TABLE_PER_SYMBOL) {
    b.steps.resize(total * k);
    for (uint64_t i = 0; i < total; ++i) {
      fill_steps(b.steps.data() + i * k, k, static_cast<int>(i % 4 == 3 ? 1 : i % 2 ? 3 : 0), rng);
      auto row = reference_steps_cdf(b.steps.data() + i * k, k);
      b.cdf.insert(b.cdf.end(), row.begin(), row.end());
    }
  } else {
    b.cdf = kind == PERCO_TABLE_STATIC ? random_cdf(k, rng, 2.0) : uniform_cdf(k);
  }
  b.symbols.resize(total);
  for (uint64_t i = 0; i < total; ++i) {  // sampled from each symbol's own table
    const uint32_t* row = b.row(i);
    const uint32_t q = static_cast<uint32_t>(rng() % (1u << 24));
    b.symbols[i] = static_cast<int32_t>(std::upper_bound(row, row + k + 1, q) - row - 1);
  }
  for (uint32_t q = 0; q < b.n(); ++q) {
    const uint64_t n = b.soff[q + 1] - b.soff[q];
    for (uint32_t j = 0; j < splits; ++j) {
      std::vector<int32_t> part;
      std::vector<uint32_t> rows;  // PER_SYMBOL: the sub-stream's rows; else its one table
      for (uint64_t t = j; t < n; t += splits) {
        part.push_back(b.symbols[b.soff[q] + t]);
        const uint32_t* row = b.row(b.soff[q] + t);
        if (kind == PERCO_TABLE_PER_SYMBOL) rows.insert(rows.end(), row, row + k + 1);
      }
      const bool per_symbol = kind == PERCO_TABLE_PER_SYMBOL;
      auto words = host_encode_rows(part.data(), part.size(), per_symbol ? rows.data() : b.cdf.data(), k,
                                    per_symbol ? k + 1 : 0);
      b.expected.push_back(words);
      // damage every third sub-stream: a flipped bulk word, a lost top word, a word left over, a
      // zero last word, or a lost bulk (only the state)
      bool damaged = false;
      if (damage && (q * splits + j) % 3 == 1) {
        switch ((q + j) % 5) {
          case 0: if (words.size() > 2) { words[words.size() / 2 - 1] ^= 0x00F0F00Fu; damaged = true; } break;
          case 1: if (!words.empty()) { words.pop_back(); damaged = true; } break;
          case 2: words.insert(words.begin(), 0x9999u); damaged = true; break;
          case 3: words.push_back(0); damaged = true; break;
          default: if (words.size() > 2) { words.erase(words.begin(), words.end() - 2); damaged = true; } break;
        }
      }
      b.damaged.push_back(damaged);
      b.words.insert(b.words.end(), words.begin(), words.end());
      b.woff.push_back(b.words.size());
    }
  }
  return b;
}

struct DeviceBatch {
  perco_model model;
  uint32_t* words;
  uint64_t *woff, *soff;
  explicit DeviceBatch(const SplitBatch& b)
      : model{b.kind, b.k, b.kind == PERCO_TABLE_UNIFORM ? nullptr : to_device(b.cdf), nullptr},
        words(to_device(b.words)), woff(to_device(b.woff)), soff(to_device(b.soff)) {}
  ~DeviceBatch() {
    if (model.cdf) cudaFree(const_cast<uint32_t*>(model.cdf));
    cudaFree(words);
    cudaFree(woff);
    cudaFree(soff);
  }
};

// One-shot split decode on the device.
void decode_split_once(const SplitBatch& b, const DeviceBatch& d, std::vector<int32_t>* symbols,
                       std::vector<int32_t>* status, cudaStream_t stream) {
  const size_t streams = static_cast<size_t>(b.n()) * b.splits;
  int32_t *d_out, *d_status;
  cudaMalloc(&d_out, std::max<size_t>(1, b.symbols.size()) * 4);
  cudaMalloc(&d_status, std::max<size_t>(1, streams) * 4);
  CHECK(perco_rans_decode_split(d.model, d.words, d.woff, d.soff, b.n(), b.splits, d_out, d_status, stream) ==
        PERCO_OK, "decode_split");
  cudaStreamSynchronize(stream);
  *symbols = to_host(d_out, b.symbols.size());
  *status = to_host(d_status, streams);
  cudaFree(d_out);
  cudaFree(d_status);
}

// Encode split on the device: the words of each sub-stream are the CPU coder's; decode inverts it
// and reports OK exactly for the undamaged sub-streams (a damaged one may decode to other symbols).
void split_round_trip(uint32_t k, uint32_t splits, perco_table_kind kind, const std::vector<uint32_t>& lengths,
                      uint64_t seed, cudaStream_t stream) {
  std::mt19937_64 rng(seed);
  SplitBatch b = make_split_batch(k, splits, kind, lengths, true, rng);
  DeviceBatch d(b);
  const uint32_t n = b.n();
  const size_t streams = static_cast<size_t>(n) * splits;
  int32_t* d_symbols = to_device(b.symbols);
  uint32_t *d_words, *d_counts;
  int32_t* d_status;
  const size_t capacity = b.symbols.size() + 2 * streams;
  cudaMalloc(&d_words, std::max<size_t>(1, capacity) * 4);
  cudaMalloc(&d_counts, std::max<size_t>(1, streams) * 4);
  cudaMalloc(&d_status, std::max<size_t>(1, streams) * 4);
  CHECK(perco_rans_encode_split(d.model, d_symbols, d.soff, n, splits, d_words, d_counts, d_status, stream) ==
        PERCO_OK, "encode_split");
  cudaStreamSynchronize(stream);
  auto words = to_host(d_words, capacity);
  auto counts = to_host(d_counts, streams);
  auto status = to_host(d_status, streams);
  for (uint32_t q = 0; q < n; ++q) {
    const uint64_t len = b.soff[q + 1] - b.soff[q];
    uint64_t at = b.soff[q] + 2ull * q * splits;  // the documented layout: the regions follow each other
    for (uint32_t j = 0; j < splits; ++j) {
      const size_t s = static_cast<size_t>(q) * splits + j;
      const uint64_t symbols_j = j < len ? (len - j + splits - 1) / splits : 0;
      std::vector<uint32_t> got(words.begin() + at, words.begin() + at + counts[s]);
      CHECK(status[s] == PERCO_STREAM_OK && got == b.expected[s], "encode_split k=%u P=%u kind %d seq %u sub %u", k,
            splits, kind, q, j);
      at += symbols_j + 2;
    }
  }
  std::vector<int32_t> decoded, decode_status;
  decode_split_once(b, d, &decoded, &decode_status, stream);
  for (uint32_t q = 0; q < n; ++q)
    for (uint32_t j = 0; j < splits; ++j) {
      const size_t s = static_cast<size_t>(q) * splits + j;
      std::vector<uint32_t> rows;
      std::vector<int32_t> got, original;
      const bool per_symbol = kind == PERCO_TABLE_PER_SYMBOL;
      for (uint64_t t = j; t < b.soff[q + 1] - b.soff[q]; t += splits) {
        const uint32_t* row = b.row(b.soff[q] + t);
        if (per_symbol) rows.insert(rows.end(), row, row + k + 1);
        got.push_back(decoded[b.soff[q] + t]);
        original.push_back(b.symbols[b.soff[q] + t]);
      }
      std::vector<uint32_t> stream_words(b.words.begin() + b.woff[s], b.words.begin() + b.woff[s + 1]);
      int32_t want_status;
      auto want = host_decode_rows(stream_words, per_symbol ? rows.data() : b.cdf.data(), k, got.size(), &want_status,
                                   per_symbol ? k + 1 : 0);
      CHECK(decode_status[s] == want_status && got == want,
            "decode_split k=%u P=%u kind %d seq %u sub %u: status %d, reference %d%s", k, splits, kind, q, j,
            decode_status[s], want_status, got == want ? "" : ", symbols differ");
      if (!b.damaged[s]) CHECK(want_status == PERCO_STREAM_OK && got == original, "undamaged sub-stream not OK");
      if (!stream_words.empty() && stream_words.back() == 0) CHECK(want_status == PERCO_STREAM_CORRUPT, "zero word");
    }
  cudaFree(d_symbols);
  cudaFree(d_words);
  cudaFree(d_counts);
  cudaFree(d_status);
}

// Random chunkings of every sequence into `chunks` calls (empty chunks included); chunk c of
// sequence q has counts[c][q] symbols.
std::vector<std::vector<uint64_t>> random_chunking(const SplitBatch& b, uint32_t chunks, std::mt19937_64& rng) {
  std::vector<std::vector<uint64_t>> counts(chunks, std::vector<uint64_t>(b.n(), 0));
  for (uint32_t q = 0; q < b.n(); ++q) {
    const uint64_t len = b.soff[q + 1] - b.soff[q];
    std::vector<uint64_t> cuts{0, len};
    for (uint32_t c = 1; c < chunks; ++c) cuts.push_back(len ? rng() % (len + 1) : 0);
    std::sort(cuts.begin(), cuts.end());
    for (uint32_t c = 0; c < chunks; ++c) counts[c][q] = cuts[c + 1] - cuts[c];
  }
  return counts;
}

// The chunk's tables: a row per chunk symbol (sequence by sequence), gathered from the batch's rows.
std::vector<uint32_t> chunk_rows(const SplitBatch& b, const std::vector<uint64_t>& done,
                                 const std::vector<uint64_t>& counts) {
  std::vector<uint32_t> rows;
  for (uint32_t q = 0; q < b.n(); ++q)
    for (uint64_t t = 0; t < counts[q]; ++t) {
      const uint32_t* row = b.row(b.soff[q] + done[q] + t);
      rows.insert(rows.end(), row, row + b.k + 1);
    }
  return rows;
}

std::vector<int64_t> chunk_steps(const SplitBatch& b, const std::vector<uint64_t>& done,
                                 const std::vector<uint64_t>& counts) {
  std::vector<int64_t> steps;
  for (uint32_t q = 0; q < b.n(); ++q) {
    auto first = b.steps.begin() + static_cast<size_t>(b.soff[q] + done[q]) * b.k;
    steps.insert(steps.end(), first, first + static_cast<size_t>(counts[q]) * b.k);
  }
  return steps;
}

// Chunk symbols (sequence by sequence) back into the batch layout.
void scatter_chunk(const SplitBatch& b, const std::vector<int32_t>& chunk, std::vector<uint64_t>& done,
                   const std::vector<uint64_t>& counts, std::vector<int32_t>& out) {
  size_t at = 0;
  for (uint32_t q = 0; q < b.n(); ++q) {
    for (uint64_t t = 0; t < counts[q]; ++t) out[b.soff[q] + done[q] + t] = chunk[at++];
    done[q] += counts[q];
  }
}

// Resumable decode (device API, then both host-helper paths) against the one-shot split decode:
// the same symbols and final statuses for every chunking.
// Path 2 (tables made from steps by the tables kernel) only where `steps_path`: in the emulation
// each table row costs a block's barriers (~1.5 ms each under ASan), so it gets few rows.
void resume_matches_one_shot(uint32_t k, uint32_t splits, perco_table_kind kind, const std::vector<uint32_t>& lengths,
                             uint32_t chunkings, bool steps_path, uint64_t seed, cudaStream_t stream) {
  std::mt19937_64 rng(seed);
  SplitBatch b = make_split_batch(k, splits, kind, lengths, true, rng);
  DeviceBatch d(b);
  const uint32_t n = b.n();
  const size_t streams = static_cast<size_t>(n) * splits;
  std::vector<int32_t> want, want_status;
  decode_split_once(b, d, &want, &want_status, stream);
  bool equal_lengths = true;
  for (uint32_t q = 1; q < n; ++q) equal_lengths = equal_lengths && lengths[q] == lengths[0];
  perco_stream_state* d_states;
  cudaMalloc(&d_states, std::max<size_t>(1, streams) * sizeof(perco_stream_state));
  for (uint32_t trial = 0; trial < chunkings; ++trial) {
    // the last trial: many chunks, mostly empty or of one symbol (where the lengths allow it)
    const uint32_t chunks = 1 + trial % 6 + (trial == chunkings - 1 && chunkings > 4 ? 40 : 0);
    auto counts = random_chunking(b, chunks, rng);
    // uniform chunks (chunk_offsets NULL) where every sequence has the same length
    const int paths = steps_path ? 3 : 2;
    const bool uniform = equal_lengths && (trial / paths) % 2 == 1;
    if (uniform)
      for (uint32_t c = 0; c < chunks; ++c) std::fill(counts[c].begin(), counts[c].end(), counts[c][0]);
    const int path = trial % paths;  // 0: device API; 1: perco_decoder with host tables; 2: from steps
    if (path == 2 && kind != PERCO_TABLE_PER_SYMBOL) continue;
    std::vector<int32_t> got(b.symbols.size(), -1), got_status(streams, -1);
    std::vector<uint64_t> done(n, 0);
    perco_decoder* decoder = nullptr;
    if (path == 0) {
      CHECK(perco_rans_decode_begin(d.words, d.woff, n, splits, d_states, stream) == PERCO_OK, "begin");
    } else {
      CHECK(perco_decoder_create_host(b.words.data(), b.woff.data(), n, splits, stream, &decoder) == PERCO_OK &&
            decoder, "decoder_create");
      if (!decoder) break;
    }
    for (uint32_t c = 0; c < chunks; ++c) {
      uint64_t total = 0;
      std::vector<uint64_t> offsets{0};
      for (uint64_t v : counts[c]) offsets.push_back(total += v);
      std::vector<int32_t> chunk(std::max<uint64_t>(1, total), -1);
      auto rows = kind == PERCO_TABLE_PER_SYMBOL ? chunk_rows(b, done, counts[c]) : std::vector<uint32_t>();
      perco_model host = b.host_model();
      if (kind == PERCO_TABLE_PER_SYMBOL) host.cdf = rows.data();
      const size_t cdf_len = kind == PERCO_TABLE_PER_SYMBOL ? rows.size() : b.cdf.size();
      if (path == 0) {
        perco_model model = d.model;
        uint32_t* d_rows = nullptr;
        if (kind == PERCO_TABLE_PER_SYMBOL) model.cdf = d_rows = to_device(rows);
        uint64_t* d_offsets = uniform ? nullptr : to_device(offsets);
        int32_t* d_chunk;
        cudaMalloc(&d_chunk, chunk.size() * 4);
        CHECK(perco_rans_decode_continue(model, d.words, d.woff, d_offsets, uniform ? counts[c][0] : 0, n, splits,
                                         d_states, d_chunk, stream) == PERCO_OK, "continue");
        cudaStreamSynchronize(stream);
        chunk = to_host(d_chunk, chunk.size());
        for (void* p : {static_cast<void*>(d_rows), static_cast<void*>(d_offsets), static_cast<void*>(d_chunk)})
          if (p) cudaFree(p);
      } else if (path == 1) {
        CHECK(perco_decoder_decode_host(decoder, host, cdf_len, 0, uniform ? nullptr : counts[c].data(),
                                        uniform ? counts[c][0] : 0, chunk.data(), nullptr) == PERCO_OK,
              "decoder_decode_host");
      } else {
        auto steps = chunk_steps(b, done, counts[c]);
        const uint64_t* chunk_counts = uniform ? nullptr : counts[c].data();
        const uint64_t count = uniform ? counts[c][0] : 0;
        if (c % 2 == 0) {  // device steps; the symbols left on the device too
          int64_t* d_steps = to_device(steps);
          int32_t* d_chunk;
          cudaMalloc(&d_chunk, chunk.size() * 4);
          CHECK(perco_decoder_decode_steps(decoder, d_steps, 1, k, chunk_counts, count, chunk.data(), d_chunk) ==
                PERCO_OK, "decoder_decode_steps (device steps)");
          CHECK(to_host(d_chunk, total) == std::vector<int32_t>(chunk.begin(), chunk.begin() + total),
                "decode_steps: device and host symbols differ");
          cudaFree(d_steps);
          cudaFree(d_chunk);
        } else {  // host steps
          CHECK(perco_decoder_decode_steps(decoder, steps.data(), 0, k, chunk_counts, count, chunk.data(), nullptr) ==
                PERCO_OK, "decoder_decode_steps (host steps)");
        }
      }
      chunk.resize(total);
      scatter_chunk(b, chunk, done, counts[c], got);
    }
    if (path == 0) {
      int32_t* d_status;
      cudaMalloc(&d_status, std::max<size_t>(1, streams) * 4);
      CHECK(perco_rans_decode_end(d_states, static_cast<uint32_t>(streams), d_status, stream) == PERCO_OK, "end");
      cudaStreamSynchronize(stream);
      got_status = to_host(d_status, streams);
      cudaFree(d_status);
    } else {
      CHECK(perco_decoder_finish_host(decoder, got_status.data()) == PERCO_OK, "decoder_finish");
      perco_decoder_destroy(decoder);
    }
    CHECK(got == want && got_status == want_status, "resumable k=%u P=%u kind %d path %d, %u chunks%s: differs", k,
          splits, kind, path, chunks, uniform ? " (uniform)" : "");
  }
  cudaFree(d_states);
}

// PERCO_TEST_QUICK=1 (the TSan ctest): P in {1, 3, 33} and none of the large cases.
void split_and_resume(cudaStream_t stream) {
  const char* quick_env = std::getenv("PERCO_TEST_QUICK");
  const bool quick = quick_env && std::strcmp(quick_env, "1") == 0;
  uint64_t seed = 9000;
  const std::vector<uint32_t> lengths = {0, 1, 2, 3, 5, 8, 13, 64, 100, 7};
  for (perco_table_kind kind : {PERCO_TABLE_UNIFORM, PERCO_TABLE_STATIC, PERCO_TABLE_PER_SYMBOL})
    for (uint32_t splits : {1u, 2u, 3u, 8u, 33u}) {
      if (quick && (splits == 2 || splits == 8)) continue;
      const uint32_t k = kind == PERCO_TABLE_PER_SYMBOL ? 40 : 256;
      split_round_trip(k, splits, kind, lengths, seed++, stream);
      // each chunk is a kernel launch, ~ms in the emulation: few chunkings, a long one for P = 3
      resume_matches_one_shot(k, splits, kind, lengths, splits == 3 ? 7 : 3, false, seed++, stream);
    }
  // equal lengths: the uniform-count chunks (chunk_offsets NULL) too
  resume_matches_one_shot(300, 4, PERCO_TABLE_PER_SYMBOL, {60, 60, 60}, quick ? 4 : 8, false, seed++, stream);
  if (quick) {
    resume_matches_one_shot(40, 3, PERCO_TABLE_PER_SYMBOL, {0, 1, 2, 5}, 3, true, seed++, stream);
    return;
  }
  resume_matches_one_shot(65536, 5, PERCO_TABLE_UNIFORM, {500, 500}, 6, false, seed++, stream);
  // tables made on the device from steps (perco_decoder_decode_steps, device and host steps)
  resume_matches_one_shot(40, 3, PERCO_TABLE_PER_SYMBOL, {0, 1, 2, 5, 9, 4}, 6, true, seed++, stream);
  resume_matches_one_shot(40, 1, PERCO_TABLE_PER_SYMBOL, {6, 6}, 3, true, seed++, stream);
  // K = 8192 per-symbol tables: longer sequences from host tables, a few rows from steps
  resume_matches_one_shot(8192, 1, PERCO_TABLE_PER_SYMBOL, {100, 3}, 4, false, seed++, stream);
  resume_matches_one_shot(8192, 16, PERCO_TABLE_PER_SYMBOL, {100, 3}, 4, false, seed++, stream);
  resume_matches_one_shot(8192, 4, PERCO_TABLE_PER_SYMBOL, {5, 2}, 3, true, seed++, stream);
  // many sequences, more than one block of threads
  split_round_trip(1000, 7, PERCO_TABLE_STATIC, std::vector<uint32_t>(60, 50), seed++, stream);
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
  if (wanted("steps")) steps_tables(stream);
  if (wanted("split")) split_and_resume(stream);
  cudaStreamDestroy(stream);
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures.load());
  return failures ? 1 : 0;
}
