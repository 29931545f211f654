// Batched rANS decode/encode in constriction's AnsCoder format, and integer tables from
// logits/probabilities. See include/perco/rans.h for the contracts, docs/entropy-coding.md for
// the format and the table procedure.
#include "perco/rans.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

namespace perco_internal {

// RAII device buffer for the host helpers (a named namespace: perco_decoder holds some).
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  bool alloc(size_t n) {
    if (n == 0) return true;
    if (cudaMalloc(&ptr, n) != cudaSuccess) return false;
    bytes = n;
    return true;
  }
  // At least n bytes, keeping the buffer when it is large enough (contents are not kept).
  bool reserve(size_t n) {
    if (n <= bytes) return true;
    release();
    return alloc(n);
  }
  void release() {
    if (ptr) cudaFree(ptr);
    ptr = nullptr;
    bytes = 0;
  }
  ~DeviceBuffer() { release(); }
};

}  // namespace perco_internal
using perco_internal::DeviceBuffer;

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

// Global (not constant) memory: a row's entries index the tables all over, and the constant cache
// serializes a warp's distinct addresses where the L1 cache serves them per line. Initialized at
// load, never written at run time (an upload per call raced with kernels of other streams).
__device__ ExpTables g_exp = kExpTables;

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

// `table` is the STATIC table_index entry's owner (the sequence), `symbol_index` the PER_SYMBOL row.
__device__ __forceinline__ Row row_for(const perco_model& m, uint32_t table, uint64_t symbol_index) {
  Row row{nullptr, m.num_symbols, static_cast<uint32_t>(kProbTotal / m.num_symbols)};
  if (m.kind == PERCO_TABLE_STATIC) {
    uint64_t index = m.table_index ? m.table_index[table] : 0;
    row.cdf = m.cdf + index * (m.num_symbols + 1);
  } else if (m.kind == PERCO_TABLE_PER_SYMBOL) {
    row.cdf = m.cdf + symbol_index * (m.num_symbols + 1);
  }
  return row;
}

// --- decode: one thread per (sub-)stream; the state may live in registers or in device memory --

// The symbols of sequence position t in [position, position + n) with t = j (mod splits): the
// first one's offset from `position`, and how many there are.
__device__ __forceinline__ void interleave(uint64_t position, uint64_t n, uint32_t j, uint32_t splits,
                                           uint64_t* first, uint64_t* count) {
  const uint64_t d = (j + splits - position % splits) % splits;
  *first = d;
  *count = d < n ? (n - d + splits - 1) / splits : 0;
}

__device__ __forceinline__ void stream_begin(const uint32_t* w, uint64_t n, perco_stream_state* st) {
  st->head = 0;
  st->unread = 0;
  st->position = 0;
  st->reserved = 0;
  st->status = PERCO_STREAM_OK;
  if (n > 0 && w[n - 1] == 0) {  // constriction never ends a stream in a zero word
    st->status = PERCO_STREAM_CORRUPT;
  } else if (n == 1) {
    st->head = w[0];
  } else if (n >= 2) {
    st->head = (static_cast<uint64_t>(w[n - 1]) << 32) | w[n - 2];
    st->unread = n - 2;
  }
}

// Pops `count` symbols into symbols[first], symbols[first + stride], ...; the PER_SYMBOL row of a
// symbol is its index in `symbols`. A CORRUPT stream yields zeros.
__device__ __forceinline__ void stream_run(const perco_model& model, uint32_t table, const uint32_t* w,
                                           perco_stream_state* st, uint64_t first, uint64_t stride, uint64_t count,
                                           int32_t* symbols) {
  if (st->status != PERCO_STREAM_OK) {
    for (uint64_t t = 0, i = first; t < count; ++t, i += stride) symbols[i] = 0;
    return;
  }
  uint64_t head = st->head, pos = st->unread;  // words[0 .. pos) is the bulk still to read (from the top)
  const uint64_t mask = kProbTotal - 1;
  for (uint64_t t = 0, i = first; t < count; ++t, i += stride) {
    Row row = row_for(model, table, i);
    uint32_t quantile = static_cast<uint32_t>(head & mask);
    uint32_t s = find(row, quantile);
    uint32_t cum, freq;
    lookup(row, s, &cum, &freq);
    head = static_cast<uint64_t>(freq) * (head >> kProbBits) + (quantile - cum);
    if (head < (1ull << 32) && pos > 0) head = (head << 32) | w[--pos];
    symbols[i] = static_cast<int32_t>(s);
  }
  st->head = head;
  st->unread = pos;
}

__device__ __forceinline__ int32_t stream_status(const perco_stream_state& st) {
  if (st.status != PERCO_STREAM_OK) return st.status;
  return st.unread > 0 ? PERCO_STREAM_CORRUPT : st.head != 0 ? PERCO_STREAM_TRUNCATED : PERCO_STREAM_OK;
}

// One shot: thread q * splits + j decodes sub-stream j of sequence q (splits = 1: plain streams).
__global__ void decode_kernel(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                              const uint64_t* symbol_offsets, uint32_t num_sequences, uint32_t splits,
                              int32_t* symbols, int32_t* status) {
  const uint64_t stream = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (stream >= static_cast<uint64_t>(num_sequences) * splits) return;
  const uint32_t q = static_cast<uint32_t>(stream / splits), j = static_cast<uint32_t>(stream % splits);
  const uint64_t w0 = word_offsets[stream], w1 = word_offsets[stream + 1];
  const uint64_t s0 = symbol_offsets[q], s1 = symbol_offsets[q + 1];
  perco_stream_state st;
  stream_begin(words + w0, w1 > w0 ? w1 - w0 : 0, &st);
  uint64_t first, count;
  interleave(0, s1 > s0 ? s1 - s0 : 0, j, splits, &first, &count);
  stream_run(model, q, words + w0, &st, s0 + first, splits, count, symbols);
  status[stream] = stream_status(st);
}

__global__ void begin_kernel(const uint32_t* words, const uint64_t* word_offsets, uint32_t num_streams,
                             perco_stream_state* states) {
  const uint32_t stream = blockIdx.x * blockDim.x + threadIdx.x;
  if (stream >= num_streams) return;
  const uint64_t w0 = word_offsets[stream], w1 = word_offsets[stream + 1];
  perco_stream_state st;
  stream_begin(words + w0, w1 > w0 ? w1 - w0 : 0, &st);
  states[stream] = st;
}

__global__ void continue_kernel(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                                const uint64_t* chunk_offsets, uint64_t chunk_count, uint32_t num_sequences,
                                uint32_t splits, perco_stream_state* states, int32_t* symbols) {
  const uint64_t stream = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (stream >= static_cast<uint64_t>(num_sequences) * splits) return;
  const uint32_t q = static_cast<uint32_t>(stream / splits), j = static_cast<uint32_t>(stream % splits);
  uint64_t c0 = q * chunk_count, n = chunk_count;
  if (chunk_offsets) {
    c0 = chunk_offsets[q];
    n = chunk_offsets[q + 1] > c0 ? chunk_offsets[q + 1] - c0 : 0;
  }
  perco_stream_state st = states[stream];
  uint64_t first, count;
  interleave(st.position, n, j, splits, &first, &count);
  stream_run(model, q, words + word_offsets[stream], &st, c0 + first, splits, count, symbols);
  st.position += n;
  states[stream] = st;
}

__global__ void end_kernel(const perco_stream_state* states, uint32_t num_streams, int32_t* status) {
  const uint32_t stream = blockIdx.x * blockDim.x + threadIdx.x;
  if (stream < num_streams) status[stream] = stream_status(states[stream]);
}

// --- encode: one thread per (sub-)stream, symbols in reverse (ANS is a stack) ----------------

__global__ void encode_kernel(perco_model model, const int32_t* symbols, const uint64_t* symbol_offsets,
                              uint32_t num_sequences, uint32_t splits, uint32_t* words, uint32_t* word_counts,
                              int32_t* status) {
  const uint64_t stream = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (stream >= static_cast<uint64_t>(num_sequences) * splits) return;
  const uint32_t q = static_cast<uint32_t>(stream / splits), j = static_cast<uint32_t>(stream % splits);
  const uint64_t s0 = symbol_offsets[q], s1 = symbol_offsets[q + 1];
  const uint64_t n = s1 > s0 ? s1 - s0 : 0;
  uint64_t first, count;
  interleave(0, n, j, splits, &first, &count);
  // capacity count + 2 words, after the regions of the sub-streams before it (j floor(n/P) + min(j, n mod P)
  // symbols and 2 words each)
  const uint64_t before = static_cast<uint64_t>(j) * (n / splits) + (j < n % splits ? j : n % splits);
  uint32_t* out = words + s0 + 2 * stream + before;
  uint64_t written = 0, head = 0;
  int32_t result = PERCO_STREAM_OK;
  for (uint64_t t = count; t > 0; --t) {
    const uint64_t i = s0 + first + (t - 1) * splits;
    int32_t symbol = symbols[i];
    if (symbol < 0 || static_cast<uint32_t>(symbol) >= model.num_symbols) {
      result = PERCO_STREAM_CORRUPT;
      break;
    }
    Row row = row_for(model, q, i);
    uint32_t cum, freq;
    lookup(row, static_cast<uint32_t>(symbol), &cum, &freq);
    if ((head >> (64 - kProbBits)) >= freq) {
      out[written++] = static_cast<uint32_t>(head);
      head >>= 32;
    }
    head = ((head / freq) << kProbBits) | (head % freq + cum);
  }
  if (result == PERCO_STREAM_OK) {
    out[written++] = static_cast<uint32_t>(head);
    out[written++] = static_cast<uint32_t>(head >> 32);
    while (written > 0 && out[written - 1] == 0) --written;
  } else {
    written = 0;
  }
  word_counts[stream] = static_cast<uint32_t>(written);
  status[stream] = result;
}

// --- hybrid-mode draws: one thread per row ------------------------------------------------------

__global__ void sample_kernel(const uint32_t* cdf, uint32_t rows, uint32_t k, uint64_t seed, uint64_t group,
                              int32_t* symbols) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  uint64_t x = seed + ((group << 32) + i + 1) * 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  Row row{cdf + static_cast<uint64_t>(i) * (k + 1), k, 0};
  symbols[i] = static_cast<int32_t>(find(row, static_cast<uint32_t>(x >> (64 - kProbBits))));
}

// --- integer tables: one block per row ---------------------------------------------------------

// 2^31 exp(-n / 4096) for n in [0, 2^20): (hi[n >> 6] * lo[n & 63]) >> 31, 0 past the end of hi.
__device__ __forceinline__ uint64_t weight_of_steps(uint32_t n) {
  uint32_t hi = n >> 6;
  return hi < g_exp.hi_len ? (g_exp.hi[hi] * g_exp.lo[n & 63]) >> 31 : 0;
}

__device__ __forceinline__ uint64_t weight_from_logit(float x, float m) {
  float t = (m - x) * 4096.0f;  // exact scaling of a correctly rounded difference
  uint32_t n;
  if (!(t < static_cast<float>(kLogitMaxSteps))) n = kLogitMaxSteps;  // also NaN
  else if (t < 0.0f) n = 0;
  else n = static_cast<uint32_t>(t);
  return weight_of_steps(n);
}

__device__ __forceinline__ uint64_t weight_from_probability(float p, float s) {
  float r = __fdiv_rn(p, s);
  if (!(r >= 0.0f)) return 0;  // negative or NaN
  return static_cast<uint64_t>(static_cast<double>(r) * static_cast<double>(kOne));
}

// A step x of a row whose minimum is m: (x - m) capped at 2^20 - 1, as tables_from_steps. The
// difference of two int64 is exact in uint64 (it is below 2^64).
__device__ __forceinline__ uint64_t weight_from_step(int64_t x, int64_t m) {
  const uint64_t d = static_cast<uint64_t>(x) - static_cast<uint64_t>(m);
  return weight_of_steps(d < kLogitMaxSteps ? static_cast<uint32_t>(d) : kLogitMaxSteps);
}

// floor(num / d), exactly, for num < 2^55 and a quotient below 2^24 (num = w budget, d = W >= w):
// a double estimate is within 2^-27 of the quotient, so its truncation is off by at most one, and
// one integer correction makes it exact. Replaces a 64-bit integer division (slow on the GPU).
__device__ __forceinline__ uint64_t divide(uint64_t num, uint64_t d, double inverse) {
  uint64_t q = static_cast<uint64_t>(static_cast<double>(num) * inverse);
  const int64_t r = static_cast<int64_t>(num - q * d);
  if (r < 0) --q;
  else if (static_cast<uint64_t>(r) >= d) ++q;
  return q;
}

using ReduceF = cub::BlockReduce<float, kThreads>;
using ReduceU = cub::BlockReduce<unsigned long long, kThreads>;
using ReduceI = cub::BlockReduce<long long, kThreads>;
using ScanU = cub::BlockScan<unsigned long long, kThreads>;
union TableTemp {
  ReduceF::TempStorage f;
  ReduceU::TempStorage u;
  ReduceI::TempStorage i;
  ScanU::TempStorage scan;
};

// The block reductions' operators, as libcu++'s cuda::minimum / cuda::maximum define them, written here
// because CUDA 11's toolkit (JetPack 5, Jetson Xavier) has no cuda/functional.
struct Min {
  template <typename T>
  __host__ __device__ __forceinline__ T operator()(const T& a, const T& b) const { return a < b ? a : b; }
};
struct Max {
  template <typename T>
  __host__ __device__ __forceinline__ T operator()(const T& a, const T& b) const { return a < b ? b : a; }
};

// The integer normalisation of one row (docs/entropy-coding.md), shared by both table kernels.
// `weight(i)` gives w[i]; each thread passes the partial sum of its weights and the least index
// of its entries whose weight is the row maximum 2^31 (k if none). Writes the cdf row c [k + 1].
template <typename Weight>
__device__ __forceinline__ void normalize_row(TableTemp& temp, const Weight& weight, uint32_t k,
                                              unsigned long long total, unsigned long long first, uint32_t* c) {
  __shared__ unsigned long long s_total, s_first, s_sum, s_carry;
  __syncthreads();
  total = ReduceU(temp.u).Sum(total);
  __syncthreads();
  first = ReduceU(temp.u).Reduce(first, Min{});
  if (threadIdx.x == 0) { s_total = total; s_first = first; }
  __syncthreads();

  const unsigned long long budget = kProbTotal - k, row_total = s_total;
  const double inverse = 1.0 / static_cast<double>(row_total);
  unsigned long long sum = 0;
  for (uint32_t i = threadIdx.x; i < k; i += kThreads) sum += 1 + divide(weight(i) * budget, row_total, inverse);
  __syncthreads();
  sum = ReduceU(temp.u).Sum(sum);
  if (threadIdx.x == 0) { s_sum = sum; s_carry = 0; }
  __syncthreads();

  // exclusive scan of f in tiles of kThreads; cdf[0] = 0, cdf[k] = 2^24
  for (uint32_t base = 0; base < k; base += kThreads) {
    uint32_t i = base + threadIdx.x;
    unsigned long long f = 0;
    if (i < k) {
      f = 1 + divide(weight(i) * budget, row_total, inverse);
      if (i == s_first) f += kProbTotal - s_sum;
    }
    unsigned long long prefix, tile_total;
    ScanU(temp.scan).ExclusiveSum(f, prefix, tile_total);
    if (i < k) c[i] = static_cast<uint32_t>(s_carry + prefix);
    __syncthreads();
    if (threadIdx.x == 0) s_carry += tile_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) c[k] = static_cast<uint32_t>(kProbTotal);
}

__global__ void tables_kernel(const float* values, uint32_t k, int from_logits, uint32_t* cdf, uint64_t* scratch) {
  __shared__ TableTemp temp;
  __shared__ float s_max;
  const float* x = values + static_cast<uint64_t>(blockIdx.x) * k;
  uint64_t* w = scratch + static_cast<uint64_t>(blockIdx.x) * k;
  uint32_t* c = cdf + static_cast<uint64_t>(blockIdx.x) * (k + 1);

  float local = -INFINITY;  // fmaxf ignores NaN
  for (uint32_t i = threadIdx.x; i < k; i += kThreads) local = fmaxf(local, x[i]);
  float m = ReduceF(temp.f).Reduce(local, Max{});
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
  normalize_row(temp, [w](uint32_t i) { return w[i]; }, k, total, first, c);
}

// No scratch: the weights are recomputed from the steps in each pass (the row is re-read from the
// caches, not from memory, in a block's short life).
__global__ void steps_tables_kernel(const int64_t* steps, uint32_t k, uint32_t* cdf) {
  __shared__ TableTemp temp;
  __shared__ long long s_min;
  const int64_t* x = steps + static_cast<uint64_t>(blockIdx.x) * k;
  uint32_t* c = cdf + static_cast<uint64_t>(blockIdx.x) * (k + 1);

  long long local = x[0];
  for (uint32_t i = threadIdx.x; i < k; i += kThreads) local = x[i] < local ? x[i] : local;
  long long m = ReduceI(temp.i).Reduce(local, Min{});
  if (threadIdx.x == 0) s_min = m;
  __syncthreads();
  m = s_min;

  unsigned long long total = 0, first = k;
  for (uint32_t i = threadIdx.x; i < k; i += kThreads) {
    uint64_t wi = weight_from_step(x[i], m);
    total += wi;
    if (wi == kOne && i < first) first = i;  // the minimum's weight, and no other, is 2^31
  }
  normalize_row(temp, [x, m](uint32_t i) { return weight_from_step(x[i], m); }, k, total, first, c);
}

bool valid_model(const perco_model& m) {
  if (m.num_symbols < 2 || m.num_symbols > 65536) return false;
  return m.kind == PERCO_TABLE_UNIFORM || m.cdf != nullptr;
}

// splits >= 1 and N * splits < 2^32 (a thread index per sub-stream).
bool valid_split(uint32_t num_sequences, uint32_t splits) {
  return splits >= 1 && static_cast<uint64_t>(num_sequences) * splits <= 0xFFFFFFFFull;
}

unsigned blocks_for(uint64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

perco_result launched() { return cudaGetLastError() == cudaSuccess ? PERCO_OK : PERCO_ERR_CUDA; }

bool copy_in(DeviceBuffer& buffer, const void* host, size_t bytes, cudaStream_t stream) {
  return buffer.alloc(bytes) &&
         (bytes == 0 || cudaMemcpyAsync(buffer.ptr, host, bytes, cudaMemcpyHostToDevice, stream) == cudaSuccess);
}

bool copy_out(void* host, const void* device, size_t bytes, cudaStream_t stream) {
  return bytes == 0 || cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream) == cudaSuccess;
}

// A private non-blocking stream for a host helper, destroyed at scope exit.
struct OwnStream {
  cudaStream_t stream = nullptr;
  bool ok = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess;
  ~OwnStream() { if (ok) cudaStreamDestroy(stream); }
};

}  // namespace

extern "C" {

perco_result perco_rans_decode_split(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                                     const uint64_t* symbol_offsets, uint32_t num_sequences, uint32_t splits,
                                     int32_t* symbols, int32_t* status, cudaStream_t stream) {
  if (!valid_model(model) || !valid_split(num_sequences, splits) || !word_offsets || !symbol_offsets || !status)
    return PERCO_ERR_INVALID_ARGUMENT;
  if (num_sequences == 0) return PERCO_OK;
  const uint64_t streams = static_cast<uint64_t>(num_sequences) * splits;
  decode_kernel<<<blocks_for(streams), kThreads, 0, stream>>>(model, words, word_offsets, symbol_offsets,
                                                             num_sequences, splits, symbols, status);
  return launched();
}

perco_result perco_rans_decode(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                               const uint64_t* symbol_offsets, uint32_t num_streams, int32_t* symbols,
                               int32_t* status, cudaStream_t stream) {
  return perco_rans_decode_split(model, words, word_offsets, symbol_offsets, num_streams, 1, symbols, status, stream);
}

perco_result perco_rans_encode_split(perco_model model, const int32_t* symbols, const uint64_t* symbol_offsets,
                                     uint32_t num_sequences, uint32_t splits, uint32_t* words,
                                     uint32_t* word_counts, int32_t* status, cudaStream_t stream) {
  if (!valid_model(model) || !valid_split(num_sequences, splits) || !symbol_offsets || !words || !word_counts ||
      !status)
    return PERCO_ERR_INVALID_ARGUMENT;
  if (num_sequences == 0) return PERCO_OK;
  const uint64_t streams = static_cast<uint64_t>(num_sequences) * splits;
  encode_kernel<<<blocks_for(streams), kThreads, 0, stream>>>(model, symbols, symbol_offsets, num_sequences, splits,
                                                             words, word_counts, status);
  return launched();
}

perco_result perco_rans_encode(perco_model model, const int32_t* symbols, const uint64_t* symbol_offsets,
                               uint32_t num_streams, uint32_t* words, uint32_t* word_counts, int32_t* status,
                               cudaStream_t stream) {
  return perco_rans_encode_split(model, symbols, symbol_offsets, num_streams, 1, words, word_counts, status, stream);
}

perco_result perco_rans_decode_begin(const uint32_t* words, const uint64_t* word_offsets, uint32_t num_sequences,
                                     uint32_t splits, perco_stream_state* states, cudaStream_t stream) {
  if (!valid_split(num_sequences, splits) || !word_offsets || !states) return PERCO_ERR_INVALID_ARGUMENT;
  if (num_sequences == 0) return PERCO_OK;
  const uint32_t streams = num_sequences * splits;
  begin_kernel<<<blocks_for(streams), kThreads, 0, stream>>>(words, word_offsets, streams, states);
  return launched();
}

perco_result perco_rans_decode_continue(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                                        const uint64_t* chunk_offsets, uint64_t chunk_count, uint32_t num_sequences,
                                        uint32_t splits, perco_stream_state* states, int32_t* symbols,
                                        cudaStream_t stream) {
  if (!valid_model(model) || !valid_split(num_sequences, splits) || !word_offsets || !states)
    return PERCO_ERR_INVALID_ARGUMENT;
  if (num_sequences == 0) return PERCO_OK;
  const uint64_t streams = static_cast<uint64_t>(num_sequences) * splits;
  continue_kernel<<<blocks_for(streams), kThreads, 0, stream>>>(model, words, word_offsets, chunk_offsets,
                                                               chunk_count, num_sequences, splits, states, symbols);
  return launched();
}

perco_result perco_rans_decode_end(const perco_stream_state* states, uint32_t num_streams, int32_t* status,
                                   cudaStream_t stream) {
  if (!states || !status) return PERCO_ERR_INVALID_ARGUMENT;
  if (num_streams == 0) return PERCO_OK;
  end_kernel<<<blocks_for(num_streams), kThreads, 0, stream>>>(states, num_streams, status);
  return launched();
}

perco_result perco_tables_from_values(const float* values, uint32_t rows, uint32_t num_symbols, int from_logits,
                                      uint32_t* cdf, uint64_t* scratch, cudaStream_t stream) {
  if (num_symbols < 2 || num_symbols > 65536 || !values || !cdf || !scratch) return PERCO_ERR_INVALID_ARGUMENT;
  if (rows == 0) return PERCO_OK;
  tables_kernel<<<rows, kThreads, 0, stream>>>(values, num_symbols, from_logits, cdf, scratch);
  return launched();
}

perco_result perco_tables_from_steps(const int64_t* steps, uint32_t rows, uint32_t num_symbols, uint32_t* cdf,
                                     cudaStream_t stream) {
  if (num_symbols < 2 || num_symbols > 65536 || !steps || !cdf) return PERCO_ERR_INVALID_ARGUMENT;
  if (rows == 0) return PERCO_OK;
  steps_tables_kernel<<<rows, kThreads, 0, stream>>>(steps, num_symbols, cdf);
  return launched();
}

perco_result perco_sample_cdf(const uint32_t* cdf, uint32_t rows, uint32_t num_symbols, uint64_t seed,
                              uint64_t group, int32_t* symbols, cudaStream_t stream) {
  if (num_symbols < 2 || num_symbols > 65536 || !cdf || !symbols) return PERCO_ERR_INVALID_ARGUMENT;
  if (rows == 0) return PERCO_OK;
  sample_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(cdf, rows, num_symbols, seed, group, symbols);
  return launched();
}

int perco_cuda_device_count(void) {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

// What the host helpers can check before anything reaches the device: offsets that never
// decrease (the buffers are sized by the last one), a table array covering every row the kernels
// read, a table_index covering every sequence and naming an existing row.
static bool non_decreasing(const uint64_t* offsets, uint64_t count) {
  for (uint64_t i = 0; i < count; ++i)
    if (offsets[i] > offsets[i + 1]) return false;
  return true;
}

// valid_model, but a PER_SYMBOL model with no rows (cdf_len = 0) may have a null table pointer.
static bool valid_host_kind(const perco_model& m, size_t cdf_len) {
  if (m.kind == PERCO_TABLE_PER_SYMBOL && cdf_len == 0 && m.num_symbols >= 2 && m.num_symbols <= 65536) return true;
  return valid_model(m);
}

static bool valid_host_model(const perco_model& m, size_t cdf_len, size_t table_index_len, uint32_t num_sequences,
                             uint64_t total_symbols) {
  const uint64_t rows = cdf_len / (m.num_symbols + 1ull);
  if (m.kind == PERCO_TABLE_PER_SYMBOL) return rows >= total_symbols;
  if (m.kind == PERCO_TABLE_STATIC) {
    if (rows == 0) return false;
    if (m.table_index) {
      if (table_index_len < num_sequences) return false;
      for (uint32_t i = 0; i < num_sequences; ++i)
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

perco_result perco_rans_decode_split_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                          const uint32_t* words_host, const uint64_t* word_offsets_host,
                                          const uint64_t* symbol_offsets_host, uint32_t num_sequences,
                                          uint32_t splits, int32_t* symbols_host, int32_t* status_host) {
  if (!valid_host_kind(model_host, cdf_len) || !valid_split(num_sequences, splits)) return PERCO_ERR_INVALID_ARGUMENT;
  if (num_sequences == 0) return PERCO_OK;
  const uint64_t streams = static_cast<uint64_t>(num_sequences) * splits;
  if (!word_offsets_host || !symbol_offsets_host || !status_host || !non_decreasing(word_offsets_host, streams) ||
      !non_decreasing(symbol_offsets_host, num_sequences))
    return PERCO_ERR_INVALID_ARGUMENT;
  const uint64_t total_words = word_offsets_host[streams], total_symbols = symbol_offsets_host[num_sequences];
  if ((total_words && !words_host) || (total_symbols && !symbols_host) ||
      !valid_host_model(model_host, cdf_len, table_index_len, num_sequences, total_symbols))
    return PERCO_ERR_INVALID_ARGUMENT;
  OwnStream own;
  if (!own.ok) return PERCO_ERR_CUDA;
  const cudaStream_t stream = own.stream;
  DeviceBuffer cdf, index, words, woff, soff, symbols, status;
  perco_model model;
  if (upload_model(model_host, cdf_len, table_index_len, cdf, index, &model, stream) != PERCO_OK ||
      !copy_in(words, words_host, total_words * 4, stream) ||
      !copy_in(woff, word_offsets_host, (streams + 1) * 8, stream) ||
      !copy_in(soff, symbol_offsets_host, (num_sequences + 1ull) * 8, stream) || !symbols.alloc(total_symbols * 4) ||
      !status.alloc(streams * 4))
    return PERCO_ERR_CUDA;
  perco_result result = perco_rans_decode_split(
      model, static_cast<uint32_t*>(words.ptr), static_cast<uint64_t*>(woff.ptr), static_cast<uint64_t*>(soff.ptr),
      num_sequences, splits, static_cast<int32_t*>(symbols.ptr), static_cast<int32_t*>(status.ptr), stream);
  if (result == PERCO_OK &&
      (!copy_out(symbols_host, symbols.ptr, total_symbols * 4, stream) ||
       !copy_out(status_host, status.ptr, streams * 4, stream) || cudaStreamSynchronize(stream) != cudaSuccess))
    result = PERCO_ERR_CUDA;
  return result;
}

perco_result perco_rans_decode_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                    const uint32_t* words_host, const uint64_t* word_offsets_host,
                                    const uint64_t* symbol_offsets_host, uint32_t num_streams,
                                    int32_t* symbols_host, int32_t* status_host) {
  return perco_rans_decode_split_host(model_host, cdf_len, table_index_len, words_host, word_offsets_host,
                                      symbol_offsets_host, num_streams, 1, symbols_host, status_host);
}

perco_result perco_rans_encode_split_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                          const int32_t* symbols_host, const uint64_t* symbol_offsets_host,
                                          uint32_t num_sequences, uint32_t splits, uint32_t* words_host,
                                          uint32_t* word_counts_host, int32_t* status_host) {
  if (!valid_host_kind(model_host, cdf_len) || !valid_split(num_sequences, splits)) return PERCO_ERR_INVALID_ARGUMENT;
  if (num_sequences == 0) return PERCO_OK;
  const uint64_t streams = static_cast<uint64_t>(num_sequences) * splits;
  if (!symbol_offsets_host || !words_host || !word_counts_host || !status_host ||
      !non_decreasing(symbol_offsets_host, num_sequences))
    return PERCO_ERR_INVALID_ARGUMENT;
  const uint64_t total_symbols = symbol_offsets_host[num_sequences];
  if ((total_symbols && !symbols_host) ||
      !valid_host_model(model_host, cdf_len, table_index_len, num_sequences, total_symbols))
    return PERCO_ERR_INVALID_ARGUMENT;
  OwnStream own;
  if (!own.ok) return PERCO_ERR_CUDA;
  const cudaStream_t stream = own.stream;
  const uint64_t capacity = total_symbols + 2 * streams;
  DeviceBuffer cdf, index, symbols, soff, words, counts, status;
  perco_model model;
  if (upload_model(model_host, cdf_len, table_index_len, cdf, index, &model, stream) != PERCO_OK ||
      !copy_in(symbols, symbols_host, total_symbols * 4, stream) ||
      !copy_in(soff, symbol_offsets_host, (num_sequences + 1ull) * 8, stream) || !words.alloc(capacity * 4) ||
      !counts.alloc(streams * 4) || !status.alloc(streams * 4))
    return PERCO_ERR_CUDA;
  perco_result result = perco_rans_encode_split(
      model, static_cast<int32_t*>(symbols.ptr), static_cast<uint64_t*>(soff.ptr), num_sequences, splits,
      static_cast<uint32_t*>(words.ptr), static_cast<uint32_t*>(counts.ptr), static_cast<int32_t*>(status.ptr), stream);
  if (result == PERCO_OK &&
      (!copy_out(words_host, words.ptr, capacity * 4, stream) ||
       !copy_out(word_counts_host, counts.ptr, streams * 4, stream) ||
       !copy_out(status_host, status.ptr, streams * 4, stream) || cudaStreamSynchronize(stream) != cudaSuccess))
    result = PERCO_ERR_CUDA;
  return result;
}

perco_result perco_rans_encode_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                    const int32_t* symbols_host, const uint64_t* symbol_offsets_host,
                                    uint32_t num_streams, uint32_t* words_host, uint32_t* word_counts_host,
                                    int32_t* status_host) {
  return perco_rans_encode_split_host(model_host, cdf_len, table_index_len, symbols_host, symbol_offsets_host,
                                      num_streams, 1, words_host, word_counts_host, status_host);
}

// --- the resumable decoder of the host helpers ---------------------------------------------------

}  // extern "C"

struct perco_decoder {
  cudaStream_t stream;
  uint32_t num_sequences, splits;
  DeviceBuffer words, word_offsets, states;
  DeviceBuffer chunk_offsets, cdf, index, steps, symbols, status;  // per chunk, grown as needed
};

namespace {

// The chunk's symbol offsets on the host ([N + 1], from counts or a uniform count) and on the device
// (NULL when uniform: the kernel computes them). Returns the chunk's total symbols through *total.
perco_result chunk_layout(perco_decoder* d, const uint64_t* counts_host, uint64_t count, const uint64_t** device,
                          uint64_t* total) {
  *device = nullptr;
  if (!counts_host) {
    if (count && d->num_sequences > UINT64_MAX / count) return PERCO_ERR_INVALID_ARGUMENT;
    *total = count * d->num_sequences;
    return PERCO_OK;
  }
  std::vector<uint64_t> offsets(d->num_sequences + 1ull, 0);
  for (uint32_t q = 0; q < d->num_sequences; ++q) {
    if (counts_host[q] > UINT64_MAX - offsets[q]) return PERCO_ERR_INVALID_ARGUMENT;
    offsets[q + 1] = offsets[q] + counts_host[q];
  }
  *total = offsets.back();
  const size_t bytes = offsets.size() * sizeof(uint64_t);
  if (!d->chunk_offsets.reserve(bytes) ||
      cudaMemcpyAsync(d->chunk_offsets.ptr, offsets.data(), bytes, cudaMemcpyHostToDevice, d->stream) != cudaSuccess ||
      cudaStreamSynchronize(d->stream) != cudaSuccess)  // the host vector goes out of scope
    return PERCO_ERR_CUDA;
  *device = static_cast<const uint64_t*>(d->chunk_offsets.ptr);
  return PERCO_OK;
}

// Decode the chunk with a device model, deliver the symbols, synchronize.
perco_result decode_chunk(perco_decoder* d, const perco_model& model, const uint64_t* offsets, uint64_t count,
                          uint64_t total, int32_t* symbols_host, int32_t* symbols_device) {
  int32_t* out = symbols_device;
  if (!out) {
    if (!d->symbols.reserve(total * 4)) return PERCO_ERR_CUDA;
    out = static_cast<int32_t*>(d->symbols.ptr);
  }
  perco_result result = perco_rans_decode_continue(
      model, static_cast<const uint32_t*>(d->words.ptr), static_cast<const uint64_t*>(d->word_offsets.ptr), offsets,
      count, d->num_sequences, d->splits, static_cast<perco_stream_state*>(d->states.ptr), out, d->stream);
  if (result == PERCO_OK && ((symbols_host && !copy_out(symbols_host, out, total * 4, d->stream)) ||
                             cudaStreamSynchronize(d->stream) != cudaSuccess))
    result = PERCO_ERR_CUDA;
  return result;
}

// Steps for the device: the caller's device pointer, or a copy of the host array.
const int64_t* device_steps(perco_decoder* d, const int64_t* steps, int on_device, uint64_t entries) {
  if (on_device) return steps;
  if (!d->steps.reserve(entries * 8) ||
      cudaMemcpyAsync(d->steps.ptr, steps, entries * 8, cudaMemcpyHostToDevice, d->stream) != cudaSuccess)
    return nullptr;
  return static_cast<const int64_t*>(d->steps.ptr);
}

}  // namespace

extern "C" {

perco_result perco_decoder_create_host(const uint32_t* words_host, const uint64_t* word_offsets_host,
                                       uint32_t num_sequences, uint32_t splits, cudaStream_t stream,
                                       perco_decoder** decoder) {
  if (!decoder) return PERCO_ERR_INVALID_ARGUMENT;
  *decoder = nullptr;
  if (!valid_split(num_sequences, splits) || !word_offsets_host) return PERCO_ERR_INVALID_ARGUMENT;
  const uint64_t streams = static_cast<uint64_t>(num_sequences) * splits;
  if (!non_decreasing(word_offsets_host, streams) || (word_offsets_host[streams] && !words_host))
    return PERCO_ERR_INVALID_ARGUMENT;
  perco_decoder* d = new perco_decoder{};
  d->stream = stream;
  d->num_sequences = num_sequences;
  d->splits = splits;
  // A 1-word allocation when empty: the kernels' word pointers stay valid device memory.
  const uint64_t total_words = word_offsets_host[streams];
  perco_result result = PERCO_ERR_CUDA;
  if ((total_words ? copy_in(d->words, words_host, total_words * 4, stream) : d->words.alloc(4)) &&
      copy_in(d->word_offsets, word_offsets_host, (streams + 1) * 8, stream) &&
      d->states.alloc(std::max<uint64_t>(streams, 1) * sizeof(perco_stream_state))) {
    result = perco_rans_decode_begin(static_cast<const uint32_t*>(d->words.ptr),
                                     static_cast<const uint64_t*>(d->word_offsets.ptr), num_sequences, splits,
                                     static_cast<perco_stream_state*>(d->states.ptr), stream);
    if (result == PERCO_OK && cudaStreamSynchronize(stream) != cudaSuccess) result = PERCO_ERR_CUDA;
  }
  if (result != PERCO_OK) {
    delete d;
    return result;
  }
  *decoder = d;
  return PERCO_OK;
}

perco_result perco_decoder_decode_host(perco_decoder* decoder, perco_model model_host, size_t cdf_len,
                                       size_t table_index_len, const uint64_t* chunk_counts_host, uint64_t chunk_count,
                                       int32_t* symbols_host, int32_t* symbols_device) {
  if (!decoder || !valid_host_kind(model_host, cdf_len)) return PERCO_ERR_INVALID_ARGUMENT;
  const uint64_t* offsets;
  uint64_t total;
  if (perco_result r = chunk_layout(decoder, chunk_counts_host, chunk_count, &offsets, &total)) return r;
  if (!valid_host_model(model_host, cdf_len, table_index_len, decoder->num_sequences, total))
    return PERCO_ERR_INVALID_ARGUMENT;
  DeviceBuffer cdf, index;
  perco_model model;
  if (upload_model(model_host, cdf_len, table_index_len, cdf, index, &model, decoder->stream) != PERCO_OK)
    return PERCO_ERR_CUDA;
  return decode_chunk(decoder, model, offsets, chunk_count, total, symbols_host, symbols_device);
}

perco_result perco_decoder_decode_steps(perco_decoder* decoder, const int64_t* steps, int steps_on_device,
                                        uint32_t num_symbols, const uint64_t* chunk_counts_host, uint64_t chunk_count,
                                        int32_t* symbols_host, int32_t* symbols_device) {
  if (!decoder || num_symbols < 2 || num_symbols > 65536) return PERCO_ERR_INVALID_ARGUMENT;
  const uint64_t* offsets;
  uint64_t total;
  if (perco_result r = chunk_layout(decoder, chunk_counts_host, chunk_count, &offsets, &total)) return r;
  if (total > 0xFFFFFFFFull || (total && !steps)) return PERCO_ERR_INVALID_ARGUMENT;
  const uint64_t rows = total;
  // A 1-word table array when the chunk is empty: a per-symbol model needs a table pointer.
  if (!decoder->cdf.reserve(std::max<uint64_t>(rows * (num_symbols + 1ull), 1) * 4)) return PERCO_ERR_CUDA;
  uint32_t* cdf = static_cast<uint32_t*>(decoder->cdf.ptr);
  if (rows) {
    const int64_t* device = device_steps(decoder, steps, steps_on_device, rows * num_symbols);
    if (!device) return PERCO_ERR_CUDA;
    perco_result r = perco_tables_from_steps(device, static_cast<uint32_t>(rows), num_symbols, cdf, decoder->stream);
    if (r != PERCO_OK) return r;
  }
  perco_model model{PERCO_TABLE_PER_SYMBOL, num_symbols, cdf, nullptr};
  return decode_chunk(decoder, model, offsets, chunk_count, total, symbols_host, symbols_device);
}

perco_result perco_decoder_finish_host(perco_decoder* decoder, int32_t* status_host) {
  if (!decoder || !status_host) return PERCO_ERR_INVALID_ARGUMENT;
  const uint64_t streams = static_cast<uint64_t>(decoder->num_sequences) * decoder->splits;
  if (streams == 0) return PERCO_OK;
  if (!decoder->status.reserve(streams * 4)) return PERCO_ERR_CUDA;
  perco_result result =
      perco_rans_decode_end(static_cast<const perco_stream_state*>(decoder->states.ptr), static_cast<uint32_t>(streams),
                            static_cast<int32_t*>(decoder->status.ptr), decoder->stream);
  if (result == PERCO_OK && (!copy_out(status_host, decoder->status.ptr, streams * 4, decoder->stream) ||
                             cudaStreamSynchronize(decoder->stream) != cudaSuccess))
    result = PERCO_ERR_CUDA;
  return result;
}

void perco_decoder_destroy(perco_decoder* decoder) { delete decoder; }

// --- tables and draws from steps, device memory, bandwidth --------------------------------------

static perco_result steps_to_cdf(const int64_t* steps, int steps_on_device, uint32_t rows, uint32_t num_symbols,
                                 DeviceBuffer& steps_copy, DeviceBuffer& cdf, cudaStream_t stream) {
  const uint64_t entries = static_cast<uint64_t>(rows) * num_symbols;
  const int64_t* device = steps;
  if (!steps_on_device) {
    if (!copy_in(steps_copy, steps, entries * 8, stream)) return PERCO_ERR_CUDA;
    device = static_cast<const int64_t*>(steps_copy.ptr);
  }
  if (!cdf.alloc(static_cast<uint64_t>(rows) * (num_symbols + 1ull) * 4)) return PERCO_ERR_CUDA;
  return perco_tables_from_steps(device, rows, num_symbols, static_cast<uint32_t*>(cdf.ptr), stream);
}

perco_result perco_tables_from_steps_host(const int64_t* steps, int steps_on_device, uint32_t rows,
                                          uint32_t num_symbols, uint32_t* cdf_host, uint32_t* cdf_device,
                                          cudaStream_t stream) {
  if (num_symbols < 2 || num_symbols > 65536 || (rows && !steps)) return PERCO_ERR_INVALID_ARGUMENT;
  if (rows == 0) return PERCO_OK;
  const uint64_t bytes = static_cast<uint64_t>(rows) * (num_symbols + 1ull) * 4;
  DeviceBuffer steps_copy, cdf;
  perco_result result = steps_to_cdf(steps, steps_on_device, rows, num_symbols, steps_copy, cdf, stream);
  if (result == PERCO_OK &&
      ((cdf_device && cudaMemcpyAsync(cdf_device, cdf.ptr, bytes, cudaMemcpyDeviceToDevice, stream) != cudaSuccess) ||
       (cdf_host && !copy_out(cdf_host, cdf.ptr, bytes, stream)) || cudaStreamSynchronize(stream) != cudaSuccess))
    result = PERCO_ERR_CUDA;
  return result;
}

perco_result perco_sample_steps_host(const int64_t* steps, int steps_on_device, uint32_t rows, uint32_t num_symbols,
                                     uint64_t seed, uint64_t group, int32_t* symbols_host, int32_t* symbols_device,
                                     cudaStream_t stream) {
  if (num_symbols < 2 || num_symbols > 65536 || (rows && !steps)) return PERCO_ERR_INVALID_ARGUMENT;
  if (rows == 0) return PERCO_OK;
  DeviceBuffer steps_copy, cdf, symbols;
  perco_result result = steps_to_cdf(steps, steps_on_device, rows, num_symbols, steps_copy, cdf, stream);
  int32_t* out = symbols_device;
  if (result == PERCO_OK && !out) {
    if (!symbols.alloc(rows * 4ull)) return PERCO_ERR_CUDA;
    out = static_cast<int32_t*>(symbols.ptr);
  }
  if (result == PERCO_OK)
    result = perco_sample_cdf(static_cast<const uint32_t*>(cdf.ptr), rows, num_symbols, seed, group, out, stream);
  if (result == PERCO_OK && ((symbols_host && !copy_out(symbols_host, out, rows * 4ull, stream)) ||
                             cudaStreamSynchronize(stream) != cudaSuccess))
    result = PERCO_ERR_CUDA;
  return result;
}

perco_result perco_device_alloc(size_t bytes, void** ptr) {
  if (!ptr) return PERCO_ERR_INVALID_ARGUMENT;
  *ptr = nullptr;
  if (bytes == 0) return PERCO_OK;
  return cudaMalloc(ptr, bytes) == cudaSuccess ? PERCO_OK : PERCO_ERR_CUDA;
}

perco_result perco_device_free(void* ptr) { return cudaFree(ptr) == cudaSuccess ? PERCO_OK : PERCO_ERR_CUDA; }

perco_result perco_device_copy(void* dst, const void* src, size_t bytes, int kind) {
  if (kind < 1 || kind > 3) return PERCO_ERR_INVALID_ARGUMENT;
  if (bytes == 0) return PERCO_OK;
  if (!dst || !src) return PERCO_ERR_INVALID_ARGUMENT;
  return cudaMemcpy(dst, src, bytes, static_cast<cudaMemcpyKind>(kind)) == cudaSuccess ? PERCO_OK : PERCO_ERR_CUDA;
}

perco_result perco_device_synchronize(void) {
  return cudaDeviceSynchronize() == cudaSuccess ? PERCO_OK : PERCO_ERR_CUDA;
}

perco_result perco_copy_bandwidth_host(size_t bytes, int repeats, double* bytes_per_second) {
  if (!bytes_per_second || bytes == 0 || repeats < 1) return PERCO_ERR_INVALID_ARGUMENT;
  *bytes_per_second = 0;
  OwnStream own;
  if (!own.ok) return PERCO_ERR_CUDA;
  DeviceBuffer a, b;
  if (!a.alloc(bytes) || !b.alloc(bytes) || cudaMemsetAsync(a.ptr, 1, bytes, own.stream) != cudaSuccess ||
      cudaMemcpyAsync(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice, own.stream) != cudaSuccess ||
      cudaStreamSynchronize(own.stream) != cudaSuccess)
    return PERCO_ERR_CUDA;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < repeats; ++i)
    if (cudaMemcpyAsync(i % 2 ? a.ptr : b.ptr, i % 2 ? b.ptr : a.ptr, bytes, cudaMemcpyDeviceToDevice, own.stream) !=
        cudaSuccess)
      return PERCO_ERR_CUDA;
  if (cudaStreamSynchronize(own.stream) != cudaSuccess) return PERCO_ERR_CUDA;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  *bytes_per_second = seconds > 0 ? 2.0 * static_cast<double>(bytes) * repeats / seconds : 0;
  return PERCO_OK;
}

}  // extern "C"
