// The host emulation runtime behind kernels/host/cuda_shim.h: device memory, streams, errors,
// kernel launches with one std::thread per CUDA thread and real barriers.
#include "cuda_shim.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#ifndef PERCO_SHIM_BROKEN_BARRIER
#define PERCO_SHIM_BROKEN_BARRIER 0  // 0: every barrier works
#endif

namespace perco_shim {

thread_local uint3 threadIdx{0, 0, 0};
thread_local uint3 blockIdx{0, 0, 0};
thread_local dim3 blockDim{1, 1, 1};
thread_local dim3 gridDim{1, 1, 1};

namespace {

constexpr unsigned char kUninitialized = 0xBE;  // cudaMalloc does not clear; neither does the shim
constexpr size_t kAlignment = 256;              // cudaMalloc's alignment guarantee
constexpr unsigned kMaxThreadsPerBlock = 1024;

thread_local cudaError_t last_error = cudaSuccess;

cudaError_t fail(cudaError_t error, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
cudaError_t fail(cudaError_t error, const char* fmt, ...) {
  std::va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "perco_shim: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, " -> %s\n", cudaGetErrorName(error));
  va_end(args);
  last_error = error;
  return error;
}

// --- device memory: exact-size host allocations, registered -----------------------------------

std::mutex memory_mutex;
std::map<uintptr_t, size_t>& allocations() {  // base -> size
  static std::map<uintptr_t, size_t> map;
  return map;
}

// Whether [p, p + bytes) lies in one live allocation. An address inside one (or, with
// `allow_end`, just past its end) fills in base and size even when the range runs past the end.
bool find_allocation(const void* p, size_t bytes, bool allow_end, uintptr_t* base, size_t* size) {
  std::lock_guard<std::mutex> lock(memory_mutex);
  auto& map = allocations();
  auto address = reinterpret_cast<uintptr_t>(p);
  auto it = map.upper_bound(address);
  if (it == map.begin()) return false;
  --it;
  const uintptr_t offset = address - it->first;
  if (offset > it->second || (offset == it->second && !allow_end)) return false;
  if (base) *base = it->first;
  if (size) *size = it->second;
  return bytes <= it->second - offset;
}

// Inside a live allocation (not just past one: another allocation may start there).
bool is_device(const void* p) { return find_allocation(p, 0, false, nullptr, nullptr); }

// Checks one side of a copy: a device range must lie inside one allocation, a host pointer must not
// be device memory (a kind that does not match the pointers is undefined behaviour in CUDA).
cudaError_t check_side(const char* api, const char* side, const void* p, size_t bytes, bool device) {
  if (device) {
    uintptr_t base = 0;
    size_t size = 0;
    if (!find_allocation(p, bytes, false, &base, &size)) {
      if (base)
        return fail(cudaErrorInvalidValue, "%s: %s range [%p, +%zu) runs past its allocation [%p, +%zu)", api, side,
                    p, bytes, reinterpret_cast<void*>(base), size);
      return fail(cudaErrorInvalidValue, "%s: %s %p is not device memory (no live cudaMalloc allocation)", api,
                  side, p);
    }
  } else if (is_device(p)) {
    return fail(cudaErrorInvalidValue, "%s: %s %p is device memory but the copy kind says host", api, side, p);
  }
  return cudaSuccess;
}

// --- streams -----------------------------------------------------------------------------------

std::mutex stream_mutex;
std::set<cudaStream_t>& streams() {
  static std::set<cudaStream_t> set;
  return set;
}

cudaError_t check_stream(const char* api, cudaStream_t stream) {
  if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread) return cudaSuccess;
  std::lock_guard<std::mutex> lock(stream_mutex);
  if (streams().count(stream)) return cudaSuccess;
  return fail(cudaErrorInvalidResourceHandle, "%s: stream %p was never created or is destroyed", api,
              static_cast<void*>(stream));
}

cudaError_t copy(const char* api, void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                 cudaStream_t stream) {
  if (cudaError_t e = check_stream(api, stream)) return e;
  if (bytes == 0) return cudaSuccess;
  bool dst_device, src_device;
  switch (kind) {
    case cudaMemcpyHostToHost: dst_device = false, src_device = false; break;
    case cudaMemcpyHostToDevice: dst_device = true, src_device = false; break;
    case cudaMemcpyDeviceToHost: dst_device = false, src_device = true; break;
    case cudaMemcpyDeviceToDevice: dst_device = true, src_device = true; break;
    case cudaMemcpyDefault: dst_device = is_device(dst), src_device = is_device(src); break;
    default: return fail(cudaErrorInvalidMemcpyDirection, "%s: kind %d", api, static_cast<int>(kind));
  }
  if (cudaError_t e = check_side(api, "destination", dst, bytes, dst_device)) return e;
  if (cudaError_t e = check_side(api, "source", src, bytes, src_device)) return e;
  std::memcpy(dst, src, bytes);  // ASan checks the host side; overlapping ranges are reported too
  return cudaSuccess;
}

// --- barriers and the worker pool ---------------------------------------------------------------
// Waiting is on futexes (Linux), synchronisation on C++ atomics with acquire/release, which is
// what TSan tracks: a thread past a barrier has seen everything the block did before it.

void futex_wait(std::atomic<uint32_t>* word, uint32_t value) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}
void wait_while_equal(std::atomic<uint32_t>& word, uint32_t value) {
  for (int spin = 0; spin < 64; ++spin)
    if (word.load(std::memory_order_acquire) != value) return;
  while (word.load(std::memory_order_acquire) == value) futex_wait(&word, value);
}

// A reusable barrier whose participants can leave (a thread that returns from the kernel): the
// last thread to arrive runs `on_complete` and releases the others.
class Barrier {
 public:
  explicit Barrier(unsigned participants, std::function<void()> on_complete = {})
      : expected_(participants), remaining_(participants), on_complete_(std::move(on_complete)) {}

  void arrive_and_wait() {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1)
      complete(generation);
    else
      wait_while_equal(generation_, generation);
  }

  void arrive_and_drop() {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    expected_.fetch_sub(1, std::memory_order_acq_rel);
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) complete(generation);
  }

  void reset(unsigned participants) {  // only while no thread is at the barrier
    expected_.store(participants, std::memory_order_relaxed);
    remaining_.store(participants, std::memory_order_relaxed);
  }

 private:
  void complete(uint32_t generation) {
    if (on_complete_) on_complete_();
    remaining_.store(expected_.load(std::memory_order_acquire), std::memory_order_relaxed);
    generation_.store(generation + 1, std::memory_order_release);
    futex_wake_all(&generation_);
  }

  std::atomic<uint32_t> generation_{0};
  std::atomic<uint32_t> expected_, remaining_;
  std::function<void()> on_complete_;
};

// The threads that play the CUDA threads: created on first need (as many as the largest block so
// far), reused by every launch. Thread t runs CUDA thread t of each block.
class Pool {
 public:
  ~Pool() {
    if (!threads_.empty() && owner_ != getpid()) {  // a fork() child: the threads are the parent's
      new std::vector<std::thread>(std::move(threads_));  // never joined, never destroyed
      return;
    }
    stop_ = true;
    generation_.fetch_add(1, std::memory_order_release);
    futex_wake_all(&generation_);
    for (auto& thread : threads_) thread.join();
  }

  void run(unsigned n, const std::function<void(unsigned)>& work) {
    if (!threads_.empty() && owner_ != getpid())  // a fork() child has none of the pool's threads
      device_fault("a kernel launched in a process forked after the first launch (CUDA does not allow it either)");
    owner_ = getpid();
    const uint32_t generation = generation_.load(std::memory_order_relaxed);
    while (threads_.size() < n) threads_.emplace_back(&Pool::worker, this, static_cast<unsigned>(threads_.size()), generation);
    work_ = &work;
    n_ = n;
    done_.store(0, std::memory_order_relaxed);
    running_.store(static_cast<uint32_t>(threads_.size()), std::memory_order_relaxed);
    generation_.store(generation + 1, std::memory_order_release);
    futex_wake_all(&generation_);
    wait_while_equal(done_, 0);
  }

 private:
  void worker(unsigned index, uint32_t seen) {
    for (;;) {
      wait_while_equal(generation_, seen);
      seen = generation_.load(std::memory_order_acquire);
      if (stop_) return;
      if (index < n_) (*work_)(index);
      if (running_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        done_.store(1, std::memory_order_release);
        futex_wake_all(&done_);
      }
    }
  }

  std::vector<std::thread> threads_;
  std::atomic<uint32_t> generation_{0}, running_{0}, done_{0};
  const std::function<void(unsigned)>* work_ = nullptr;  // published by the release of generation_
  unsigned n_ = 0;
  bool stop_ = false;
  pid_t owner_ = 0;
};

struct BlockState {
  Barrier* sync = nullptr;
  const char* kernel = nullptr;
  uint64_t syncthreads = 0;  // __syncthreads() reached in this block, by this thread
  uint64_t internal = 0;     // barriers inside CUB primitives, by this thread
};
thread_local BlockState block_state;

std::mutex device_mutex;  // one kernel at a time: __shared__ variables are statics

}  // namespace

void set_last_error(cudaError_t error) { last_error = error; }

void device_fault(const char* fmt, ...) {
  std::va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "perco_shim: device fault in kernel %s, block (%u,%u,%u) thread (%u,%u,%u): ",
               block_state.kernel ? block_state.kernel : "?", blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
               threadIdx.y, threadIdx.z);
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
  std::fflush(stderr);
  std::abort();
}

void syncthreads() {
  if (!block_state.sync) device_fault("__syncthreads() outside a kernel");
  ++block_state.syncthreads;
  if (PERCO_SHIM_BROKEN_BARRIER > 0 && block_state.syncthreads == static_cast<uint64_t>(PERCO_SHIM_BROKEN_BARRIER))
    return;  // the deliberately broken barrier: every thread skips this one
  block_state.sync->arrive_and_wait();
}

void block_internal_sync() {
  if (!block_state.sync) device_fault("a CUB block primitive outside a kernel");
  ++block_state.internal;
  block_state.sync->arrive_and_wait();
}

unsigned linear_thread_rank(unsigned threads, const char* who) {
  const unsigned size = blockDim.x * blockDim.y * blockDim.z;
  if (size != threads) device_fault("%s specialized for %u threads used in a block of %u threads", who, threads, size);
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

bool check_kernel_pointer(const char* kernel, size_t parameter, const void* pointer) {
  if (pointer == nullptr || find_allocation(pointer, 0, true, nullptr, nullptr)) return true;
  std::fprintf(stderr, "perco_shim: kernel %s: parameter %zu is %p, not device memory (no live cudaMalloc allocation)\n",
               kernel, parameter, pointer);
  return false;
}

void run_grid(const char* kernel, const LaunchConfig& config, void (*body)(void*), void* context) {
  const dim3 grid = config.grid, block = config.block;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (check_stream(kernel, config.stream) != cudaSuccess) return;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    fail(cudaErrorInvalidConfiguration, "kernel %s: grid (%u,%u,%u) block (%u,%u,%u)", kernel, grid.x, grid.y, grid.z,
         block.x, block.y, block.z);
    return;
  }
  if (config.shared_bytes != 0) {
    fail(cudaErrorNotSupported, "kernel %s: dynamic shared memory (%zu bytes) is not emulated", kernel,
         config.shared_bytes);
    return;
  }
  const unsigned n = static_cast<unsigned>(threads);
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;

  std::lock_guard<std::mutex> device_lock(device_mutex);
  Barrier sync(n);
  std::vector<uint64_t> counts(2 * n);
  uint64_t current = 0;
  // Between blocks: every thread has finished block `current`; check the barrier counts, then
  // rearm __syncthreads for the next block (the last thread to arrive runs this).
  Barrier between(n, [&] {
    for (unsigned t = 1; t < n; ++t)
      if (counts[2 * t] != counts[0] || counts[2 * t + 1] != counts[1]) {
        std::fprintf(stderr,
                     "perco_shim: kernel %s, block %llu: thread 0 reached %llu __syncthreads() (%llu in CUB "
                     "primitives), thread %u reached %llu (%llu): a barrier not reached by every thread of the "
                     "block is undefined behaviour\n",
                     kernel, static_cast<unsigned long long>(current), static_cast<unsigned long long>(counts[0]),
                     static_cast<unsigned long long>(counts[1]), t, static_cast<unsigned long long>(counts[2 * t]),
                     static_cast<unsigned long long>(counts[2 * t + 1]));
        std::fflush(stderr);
        std::abort();
      }
    ++current;
    sync.reset(n);
  });

  std::function<void(unsigned)> worker = [&](unsigned t) {
    threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    blockDim = block;
    gridDim = grid;
    for (uint64_t b = 0; b < blocks; ++b) {
      blockIdx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                       static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
      block_state = BlockState{&sync, kernel, 0, 0};
      body(context);
      counts[2 * t] = block_state.syncthreads;
      counts[2 * t + 1] = block_state.internal;
      sync.arrive_and_drop();  // returned: later barriers of this block no longer wait for it
      between.arrive_and_wait();
    }
    block_state = BlockState{};
  };
  static Pool pool;  // used under device_mutex only
  pool.run(n, worker);
}

cudaError_t copy_to_symbol(void* symbol, size_t symbol_bytes, const char* api, const void* src, size_t bytes,
                           size_t offset, cudaMemcpyKind kind, cudaStream_t stream) {
  if (cudaError_t e = check_stream(api, stream)) return e;
  if (offset > symbol_bytes || bytes > symbol_bytes - offset)
    return fail(cudaErrorInvalidValue, "%s: %zu bytes at offset %zu into a %zu-byte symbol", api, bytes, offset,
                symbol_bytes);
  if (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyDeviceToDevice && kind != cudaMemcpyDefault)
    return fail(cudaErrorInvalidMemcpyDirection, "%s: kind %d", api, static_cast<int>(kind));
  if (bytes == 0) return cudaSuccess;
  const bool src_device = kind == cudaMemcpyDefault ? is_device(src) : kind == cudaMemcpyDeviceToDevice;
  if (cudaError_t e = check_side(api, "source", src, bytes, src_device)) return e;
  std::memcpy(static_cast<char*>(symbol) + offset, src, bytes);
  return cudaSuccess;
}

}  // namespace perco_shim

using perco_shim::fail;

int perco_shim_is_host_emulation() { return 1; }
// The same for ctypes callers of libperco_kernels_host.so (the binding labels its timings as an emulation's).
extern "C" int perco_kernels_host_emulation(void) { return 1; }

cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return fail(cudaErrorInvalidValue, "cudaGetDeviceCount: null pointer");
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (!device) return fail(cudaErrorInvalidValue, "cudaGetDevice: null pointer");
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice, "cudaSetDevice(%d): the emulation has one device", device);
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // everything already ran at its call

cudaError_t cudaGetLastError() {
  cudaError_t e = perco_shim::last_error;
  perco_shim::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return perco_shim::last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidSymbol: return "cudaErrorInvalidSymbol";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) { return cudaGetErrorName(error); }

cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  using namespace perco_shim;
  if (!ptr) return fail(cudaErrorInvalidValue, "cudaMalloc: null pointer");
  *ptr = nullptr;
  if (bytes == 0) return cudaSuccess;
  void* p = nullptr;
  if (posix_memalign(&p, kAlignment, bytes) != 0)
    return fail(cudaErrorMemoryAllocation, "cudaMalloc: %zu bytes", bytes);
  std::memset(p, kUninitialized, bytes);
  {
    std::lock_guard<std::mutex> lock(memory_mutex);
    allocations()[reinterpret_cast<uintptr_t>(p)] = bytes;
  }
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  using namespace perco_shim;
  if (!ptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lock(memory_mutex);
    if (allocations().erase(reinterpret_cast<uintptr_t>(ptr)) == 0)
      return fail(cudaErrorInvalidValue, "cudaFree(%p): not the start of a live cudaMalloc allocation", ptr);
  }
  std::free(ptr);  // ASan reports any later use
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return perco_shim::copy("cudaMemcpy", dst, src, bytes, kind, nullptr);
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  return perco_shim::copy("cudaMemcpyAsync", dst, src, bytes, kind, stream);
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream) {
  using namespace perco_shim;
  if (cudaError_t e = check_stream("cudaMemsetAsync", stream)) return e;
  if (bytes == 0) return cudaSuccess;
  if (cudaError_t e = check_side("cudaMemset", "destination", dst, bytes, true)) return e;
  std::memset(dst, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* dst, int value, size_t bytes) { return cudaMemsetAsync(dst, value, bytes, nullptr); }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  using namespace perco_shim;
  if (!stream) return fail(cudaErrorInvalidValue, "cudaStreamCreate: null pointer");
  if (flags & ~1u) return fail(cudaErrorInvalidValue, "cudaStreamCreateWithFlags: flags %u", flags);
  // A distinct heap address per stream: ASan reports a destroyed stream that is still dereferenced.
  auto* s = reinterpret_cast<cudaStream_t>(new char[16]);
  std::lock_guard<std::mutex> lock(stream_mutex);
  streams().insert(s);
  *stream = s;
  return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, cudaStreamDefault); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  using namespace perco_shim;
  {
    std::lock_guard<std::mutex> lock(stream_mutex);
    if (stream == nullptr || streams().erase(stream) == 0)
      return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy(%p): not a live stream",
                  static_cast<void*>(stream));
  }
  delete[] reinterpret_cast<char*>(stream);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  return perco_shim::check_stream("cudaStreamSynchronize", stream);
}
