// Batched rANS decode/encode in constriction's AnsCoder format, and integer tables from
// logits/probabilities. See include/perco/rans.h for the contracts, docs/entropy-coding.md for
// the format and the table procedure.
#include "perco/rans.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda/functional>

namespace {

constexpr uint32_t kProbBits = PERCO_PROB_BITS;
constexpr uint64_t kProbTotal = 1ull << kProbBits;
constexpr uint64_t kOne = 1ull << 31;          // fixed-point 1.0 of table weights
constexpr uint64_t kExpUnit = 2146959424ull;   // round(2^31 exp(-1/4096))
constexpr uint64_t kExpStep = 2114190000ull;   // round(2^31 exp(-64/4096))
constexpr uint32_t kLogitMaxSteps = (1u << 20) - 1;
constexpr int kExpHiCapacity = 1280;           // the recurrence reaches 0 after 1145 steps
constexpr int kThreads = 256;

// 2^31 exp(-j/64) (hi, until it rounds to 0) and 2^31 exp(-k/4096) (lo, k < 64): the integer
// recurrences of docs/entropy-coding.md, evaluated by the compiler. Initialized constant memory,
// never written at run time (an upload per call raced with kernels of other streams reading it).
struct ExpTables {
  uint64_t hi[kExpHiCapacity];
  uint64_t lo[64];
  uint32_t hi_len;
};

constexpr ExpTables make_exp_tables() {
  ExpTables t{};
  t.lo[0] = kOne;
  for (int i = 1; i < 64; ++i) t.lo[i] = (t.lo[i - 1] * kExpUnit) >> 31;
  t.hi[0] = kOne;
  uint32_t n = 1;
  while (n < kExpHiCapacity && t.hi[n - 1] != 0) {
    t.hi[n] = (t.hi[n - 1] * kExpStep) >> 31;
    ++n;
  }
  t.hi_len = n;
  return t;
}
constexpr ExpTables kExpTables = make_exp_tables();
static_assert(kExpTables.hi_len == 1146 && kExpTables.hi[1145] == 0, "docs/entropy-coding.md: 1146 entries");

__constant__ ExpTables c_exp = kExpTables;

// --- one symbol's (cumulative, frequency) under a model ----------------------------------------

struct Row {
  const uint32_t* cdf;  // nullptr for uniform
  uint32_t k;
  uint32_t base;        // uniform: floor(2^24 / K)
};

__device__ __forceinline__ void lookup(const Row& row, uint32_t symbol, uint32_t* cum, uint32_t* freq) {
  if (row.cdf == nullptr) {
    *cum = symbol * row.base;
    *freq = symbol + 1 == row.k ? static_cast<uint32_t>(kProbTotal) - symbol * row.base : row.base;
  } else {
    *cum = row.cdf[symbol];
    *freq = row.cdf[symbol + 1] - row.cdf[symbol];
  }
}

// The symbol s with cdf[s] <= quantile < cdf[s + 1].
__device__ __forceinline__ uint32_t find(const Row& row, uint32_t quantile) {
  if (row.cdf == nullptr) {
    uint32_t s = quantile / row.base;
    return s < row.k ? s : row.k - 1;
  }
  uint32_t lo = 0, hi = row.k;  // invariant: cdf[lo] <= quantile < cdf[hi]
  while (hi - lo > 1) {
    uint32_t mid = (lo + hi) >> 1;
    if (row.cdf[mid] <= quantile) lo = mid; else hi = mid;
  }
  return lo;
}

__device__ __forceinline__ Row row_for(const perco_model& m, uint32_t stream, uint64_t symbol_index) {
  Row row{nullptr, m.num_symbols, static_cast<uint32_t>(kProbTotal / m.num_symbols)};
  if (m.kind == PERCO_TABLE_STATIC) {
    uint64_t index = m.table_index ? m.table_index[stream] : 0;
    row.cdf = m.cdf + index * (m.num_symbols + 1);
  } else if (m.kind == PERCO_TABLE_PER_SYMBOL) {
    row.cdf = m.cdf + symbol_index * (m.num_symbols + 1);
  }
  return row;
}

// --- decode: one thread per stream ---------------------------------------------------------------

__global__ void decode_kernel(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                              const uint64_t* symbol_offsets, uint32_t num_streams, int32_t* symbols,
                              int32_t* status) {
  uint32_t stream = blockIdx.x * blockDim.x + threadIdx.x;
  if (stream >= num_streams) return;
  const uint64_t w0 = word_offsets[stream], w1 = word_offsets[stream + 1];
  const uint64_t s0 = symbol_offsets[stream], s1 = symbol_offsets[stream + 1];
  const uint64_t n = w1 > w0 ? w1 - w0 : 0;
  const uint32_t* w = words + w0;
  if (n > 0 && w[n - 1] == 0) {  // constriction never ends a stream in a zero word
    for (uint64_t i = s0; i < s1; ++i) symbols[i] = 0;
    status[stream] = PERCO_STREAM_CORRUPT;
    return;
  }
  uint64_t head = 0, pos = 0;  // words[0 .. pos) is the bulk still to read (from the top)
  if (n == 1) {
    head = w[0];
  } else if (n >= 2) {
    head = (static_cast<uint64_t>(w[n - 1]) << 32) | w[n - 2];
    pos = n - 2;
  }
  const uint64_t mask = kProbTotal - 1;
  for (uint64_t i = s0; i < s1; ++i) {
    Row row = row_for(model, stream, i);
    uint32_t quantile = static_cast<uint32_t>(head & mask);
    uint32_t s = find(row, quantile);
    uint32_t cum, freq;
    lookup(row, s, &cum, &freq);
    head = static_cast<uint64_t>(freq) * (head >> kProbBits) + (quantile - cum);
    if (head < (1ull << 32) && pos > 0) head = (head << 32) | w[--pos];
    symbols[i] = static_cast<int32_t>(s);
  }
  status[stream] = pos > 0 ? PERCO_STREAM_CORRUPT : head != 0 ? PERCO_STREAM_TRUNCATED : PERCO_STREAM_OK;
}

// --- encode: one thread per stream, symbols in reverse (ANS is a stack) ----------------------

__global__ void encode_kernel(perco_model model, const int32_t* symbols, const uint64_t* symbol_offsets,
                              uint32_t num_streams, uint32_t* words, uint32_t* word_counts, int32_t* status) {
  uint32_t stream = blockIdx.x * blockDim.x + threadIdx.x;
  if (stream >= num_streams) return;
  const uint64_t s0 = symbol_offsets[stream], s1 = symbol_offsets[stream + 1];
  uint32_t* out = words + s0 + 2ull * stream;  // capacity (s1 - s0) + 2 words
  uint64_t count = 0, head = 0;
  int32_t result = PERCO_STREAM_OK;
  for (uint64_t i = s1; i > s0; --i) {
    int32_t symbol = symbols[i - 1];
    if (symbol < 0 || static_cast<uint32_t>(symbol) >= model.num_symbols) {
      result = PERCO_STREAM_CORRUPT;
      break;
    }
    Row row = row_for(model, stream, i - 1);
    uint32_t cum, freq;
    lookup(row, static_cast<uint32_t>(symbol), &cum, &freq);
    if ((head >> (64 - kProbBits)) >= freq) {
      out[count++] = static_cast<uint32_t>(head);
      head >>= 32;
    }
    head = ((head / freq) << kProbBits) | (head % freq + cum);
  }
  if (result == PERCO_STREAM_OK) {
    out[count++] = static_cast<uint32_t>(head);
    out[count++] = static_cast<uint32_t>(head >> 32);
    while (count > 0 && out[count - 1] == 0) --count;
  } else {
    count = 0;
  }
  word_counts[stream] = static_cast<uint32_t>(count);
  status[stream] = result;
}

// --- tables from logits / probabilities: one block per row -----------------------------------

__device__ __forceinline__ uint64_t weight_from_logit(float x, float m) {
  float t = (m - x) * 4096.0f;  // exact scaling of a correctly rounded difference
  uint32_t n;
  if (!(t < static_cast<float>(kLogitMaxSteps))) n = kLogitMaxSteps;  // also NaN
  else if (t < 0.0f) n = 0;
  else n = static_cast<uint32_t>(t);
  uint32_t hi = n >> 6;
  return hi < c_exp.hi_len ? (c_exp.hi[hi] * c_exp.lo[n & 63]) >> 31 : 0;
}

__device__ __forceinline__ uint64_t weight_from_probability(float p, float s) {
  float r = __fdiv_rn(p, s);
  if (!(r >= 0.0f)) return 0;  // negative or NaN
  return static_cast<uint64_t>(static_cast<double>(r) * static_cast<double>(kOne));
}

__global__ void tables_kernel(const float* values, uint32_t k, int from_logits, uint32_t* cdf, uint64_t* scratch) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  using ReduceU = cub::BlockReduce<unsigned long long, kThreads>;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage f;
    typename ReduceU::TempStorage u;
    typename Scan::TempStorage scan;
  } temp;
  __shared__ float s_max;
  __shared__ unsigned long long s_total, s_first, s_sum, s_carry;
  const float* x = values + static_cast<uint64_t>(blockIdx.x) * k;
  uint64_t* w = scratch + static_cast<uint64_t>(blockIdx.x) * k;
  uint32_t* c = cdf + static_cast<uint64_t>(blockIdx.x) * (k + 1);

  float local = -INFINITY;  // fmaxf ignores NaN
  for (uint32_t i = threadIdx.x; i < k; i += kThreads) local = fmaxf(local, x[i]);
  float m = Reduce(temp.f).Reduce(local, cuda::maximum<>{});
  if (threadIdx.x == 0) s_max = m;
  __syncthreads();
  m = s_max;
  const bool valid = from_logits ? isfinite(m) : (isfinite(m) && m > 0.0f);

  unsigned long long total = 0, first = k;
  for (uint32_t i = threadIdx.x; i < k; i += kThreads) {
    uint64_t wi = !valid ? kOne : from_logits ? weight_from_logit(x[i], m) : weight_from_probability(x[i], m);
    w[i] = wi;
    total += wi;
    if (wi == kOne && i < first) first = i;  // the row maximum is always exactly 2^31
  }
  __syncthreads();
  total = ReduceU(temp.u).Sum(total);
  __syncthreads();
  first = ReduceU(temp.u).Reduce(first, cuda::minimum<>{});
  if (threadIdx.x == 0) { s_total = total; s_first = first; }
  __syncthreads();

  const unsigned long long budget = kProbTotal - k;
  unsigned long long sum = 0;
  for (uint32_t i = threadIdx.x; i < k; i += kThreads) sum += 1 + (w[i] * budget) / s_total;
  __syncthreads();
  sum = ReduceU(temp.u).Sum(sum);
  if (threadIdx.x == 0) { s_sum = sum; s_carry = 0; }
  __syncthreads();

  // exclusive scan of f in tiles of kThreads; cdf[0] = 0, cdf[k] = 2^24
  for (uint32_t base = 0; base < k; base += kThreads) {
    uint32_t i = base + threadIdx.x;
    unsigned long long f = 0;
    if (i < k) {
      f = 1 + (w[i] * budget) / s_total;
      if (i == s_first) f += kProbTotal - s_sum;
    }
    unsigned long long prefix, tile_total;
    Scan(temp.scan).ExclusiveSum(f, prefix, tile_total);
    if (i < k) c[i] = static_cast<uint32_t>(s_carry + prefix);
    __syncthreads();
    if (threadIdx.x == 0) s_carry += tile_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) c[k] = static_cast<uint32_t>(kProbTotal);
}

bool valid_model(const perco_model& m) {
  if (m.num_symbols < 2 || m.num_symbols > 65536) return false;
  return m.kind == PERCO_TABLE_UNIFORM || m.cdf != nullptr;
}

unsigned blocks_for(uint32_t n) { return (n + kThreads - 1) / kThreads; }

// RAII device buffer for the host helpers.
struct DeviceBuffer {
  void* ptr = nullptr;
  bool alloc(size_t bytes) { return bytes == 0 || cudaMalloc(&ptr, bytes) == cudaSuccess; }
  ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
};

bool copy_in(DeviceBuffer& buffer, const void* host, size_t bytes, cudaStream_t stream) {
  return buffer.alloc(bytes) &&
         (bytes == 0 || cudaMemcpyAsync(buffer.ptr, host, bytes, cudaMemcpyHostToDevice, stream) == cudaSuccess);
}

}  // namespace

extern "C" {

perco_result perco_rans_decode(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                               const uint64_t* symbol_offsets, uint32_t num_streams, int32_t* symbols,
                               int32_t* status, cudaStream_t stream) {
  if (!valid_model(model) || !word_offsets || !symbol_offsets || !status) return PERCO_ERR_INVALID_ARGUMENT;
  if (num_streams == 0) return PERCO_OK;
  decode_kernel<<<blocks_for(num_streams), kThreads, 0, stream>>>(model, words, word_offsets, symbol_offsets,
                                                                 num_streams, symbols, status);
  return cudaGetLastError() == cudaSuccess ? PERCO_OK : PERCO_ERR_CUDA;
}

perco_result perco_rans_encode(perco_model model, const int32_t* symbols, const uint64_t* symbol_offsets,
                               uint32_t num_streams, uint32_t* words, uint32_t* word_counts, int32_t* status,
                               cudaStream_t stream) {
  if (!valid_model(model) || !symbol_offsets || !words || !word_counts || !status) return PERCO_ERR_INVALID_ARGUMENT;
  if (num_streams == 0) return PERCO_OK;
  encode_kernel<<<blocks_for(num_streams), kThreads, 0, stream>>>(model, symbols, symbol_offsets, num_streams,
                                                                 words, word_counts, status);
  return cudaGetLastError() == cudaSuccess ? PERCO_OK : PERCO_ERR_CUDA;
}

perco_result perco_tables_from_values(const float* values, uint32_t rows, uint32_t num_symbols, int from_logits,
                                      uint32_t* cdf, uint64_t* scratch, cudaStream_t stream) {
  if (num_symbols < 2 || num_symbols > 65536 || !values || !cdf || !scratch) return PERCO_ERR_INVALID_ARGUMENT;
  if (rows == 0) return PERCO_OK;
  tables_kernel<<<rows, kThreads, 0, stream>>>(values, num_symbols, from_logits, cdf, scratch);
  return cudaGetLastError() == cudaSuccess ? PERCO_OK : PERCO_ERR_CUDA;
}

int perco_cuda_device_count(void) {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

// What the host helpers can check before anything reaches the device: offsets that never
// decrease (the buffers are sized by the last one), a table array covering every row the kernels
// read, a table_index covering every stream and naming an existing row.
static bool non_decreasing(const uint64_t* offsets, uint32_t num_streams) {
  for (uint32_t i = 0; i < num_streams; ++i)
    if (offsets[i] > offsets[i + 1]) return false;
  return true;
}

static bool valid_host_model(const perco_model& m, size_t cdf_len, size_t table_index_len, uint32_t num_streams,
                             uint64_t total_symbols) {
  const uint64_t rows = cdf_len / (m.num_symbols + 1ull);
  if (m.kind == PERCO_TABLE_PER_SYMBOL) return rows >= total_symbols;
  if (m.kind == PERCO_TABLE_STATIC) {
    if (rows == 0) return false;
    if (m.table_index) {
      if (table_index_len < num_streams) return false;
      for (uint32_t i = 0; i < num_streams; ++i)
        if (m.table_index[i] >= rows) return false;
    }
  }
  return true;
}

static perco_result upload_model(perco_model host, size_t cdf_len, size_t table_index_len, DeviceBuffer& cdf,
                                 DeviceBuffer& index, perco_model* device, cudaStream_t stream) {
  *device = host;
  if (host.kind != PERCO_TABLE_UNIFORM) {
    // A per-symbol batch of no symbols has an empty table array: the kernels read no row, but the
    // device model still needs a table pointer (valid_model), so it points at one unused word.
    if (cdf_len == 0 ? !cdf.alloc(sizeof(uint32_t)) : !copy_in(cdf, host.cdf, cdf_len * sizeof(uint32_t), stream))
      return PERCO_ERR_CUDA;
    device->cdf = static_cast<const uint32_t*>(cdf.ptr);
  }
  if (host.table_index) {
    if (!copy_in(index, host.table_index, table_index_len * sizeof(uint32_t), stream)) return PERCO_ERR_CUDA;
    device->table_index = static_cast<const uint32_t*>(index.ptr);
  }
  return PERCO_OK;
}

perco_result perco_rans_decode_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                    const uint32_t* words_host, const uint64_t* word_offsets_host,
                                    const uint64_t* symbol_offsets_host, uint32_t num_streams,
                                    int32_t* symbols_host, int32_t* status_host) {
  if (!valid_model(model_host)) return PERCO_ERR_INVALID_ARGUMENT;
  if (num_streams == 0) return PERCO_OK;
  if (!word_offsets_host || !symbol_offsets_host || !status_host || !non_decreasing(word_offsets_host, num_streams) ||
      !non_decreasing(symbol_offsets_host, num_streams))
    return PERCO_ERR_INVALID_ARGUMENT;
  const uint64_t total_words = word_offsets_host[num_streams], total_symbols = symbol_offsets_host[num_streams];
  if ((total_words && !words_host) || (total_symbols && !symbols_host) ||
      !valid_host_model(model_host, cdf_len, table_index_len, num_streams, total_symbols))
    return PERCO_ERR_INVALID_ARGUMENT;
  cudaStream_t stream;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) return PERCO_ERR_CUDA;
  perco_result result = PERCO_ERR_CUDA;
  {
    DeviceBuffer cdf, index, words, woff, soff, symbols, status;
    perco_model model;
    if (upload_model(model_host, cdf_len, table_index_len, cdf, index, &model, stream) == PERCO_OK &&
        copy_in(words, words_host, total_words * 4, stream) &&
        copy_in(woff, word_offsets_host, (num_streams + 1ull) * 8, stream) &&
        copy_in(soff, symbol_offsets_host, (num_streams + 1ull) * 8, stream) &&
        symbols.alloc(total_symbols * 4) && status.alloc(num_streams * 4ull)) {
      result = perco_rans_decode(model, static_cast<uint32_t*>(words.ptr), static_cast<uint64_t*>(woff.ptr),
                                 static_cast<uint64_t*>(soff.ptr), num_streams, static_cast<int32_t*>(symbols.ptr),
                                 static_cast<int32_t*>(status.ptr), stream);
      if (result == PERCO_OK &&
          (cudaMemcpyAsync(symbols_host, symbols.ptr, total_symbols * 4, cudaMemcpyDeviceToHost, stream) != cudaSuccess ||
           cudaMemcpyAsync(status_host, status.ptr, num_streams * 4ull, cudaMemcpyDeviceToHost, stream) != cudaSuccess ||
           cudaStreamSynchronize(stream) != cudaSuccess))
        result = PERCO_ERR_CUDA;
    }
  }
  cudaStreamDestroy(stream);
  return result;
}

perco_result perco_rans_encode_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                    const int32_t* symbols_host, const uint64_t* symbol_offsets_host,
                                    uint32_t num_streams, uint32_t* words_host, uint32_t* word_counts_host,
                                    int32_t* status_host) {
  if (!valid_model(model_host)) return PERCO_ERR_INVALID_ARGUMENT;
  if (num_streams == 0) return PERCO_OK;
  if (!symbol_offsets_host || !words_host || !word_counts_host || !status_host ||
      !non_decreasing(symbol_offsets_host, num_streams))
    return PERCO_ERR_INVALID_ARGUMENT;
  const uint64_t total_symbols = symbol_offsets_host[num_streams];
  if ((total_symbols && !symbols_host) ||
      !valid_host_model(model_host, cdf_len, table_index_len, num_streams, total_symbols))
    return PERCO_ERR_INVALID_ARGUMENT;
  cudaStream_t stream;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) return PERCO_ERR_CUDA;
  const uint64_t capacity = total_symbols + 2ull * num_streams;
  perco_result result = PERCO_ERR_CUDA;
  {
    DeviceBuffer cdf, index, symbols, soff, words, counts, status;
    perco_model model;
    if (upload_model(model_host, cdf_len, table_index_len, cdf, index, &model, stream) == PERCO_OK &&
        copy_in(symbols, symbols_host, total_symbols * 4, stream) &&
        copy_in(soff, symbol_offsets_host, (num_streams + 1ull) * 8, stream) && words.alloc(capacity * 4) &&
        counts.alloc(num_streams * 4ull) && status.alloc(num_streams * 4ull)) {
      result = perco_rans_encode(model, static_cast<int32_t*>(symbols.ptr), static_cast<uint64_t*>(soff.ptr),
                                 num_streams, static_cast<uint32_t*>(words.ptr), static_cast<uint32_t*>(counts.ptr),
                                 static_cast<int32_t*>(status.ptr), stream);
      if (result == PERCO_OK &&
          (cudaMemcpyAsync(words_host, words.ptr, capacity * 4, cudaMemcpyDeviceToHost, stream) != cudaSuccess ||
           cudaMemcpyAsync(word_counts_host, counts.ptr, num_streams * 4ull, cudaMemcpyDeviceToHost, stream) != cudaSuccess ||
           cudaMemcpyAsync(status_host, status.ptr, num_streams * 4ull, cudaMemcpyDeviceToHost, stream) != cudaSuccess ||
           cudaStreamSynchronize(stream) != cudaSuccess))
        result = PERCO_ERR_CUDA;
    }
  }
  cudaStreamDestroy(stream);
  return result;
}

}  // extern "C"
