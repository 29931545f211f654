// Host emulation of the small part of CUDA that kernels/src/ uses, so the kernels compile and run
// UNMODIFIED as host C++ (with ASan/UBSan/TSan). See docs/entropy-coding.md, "GPU kernels".
//
// Execution model (kernels/host/cuda_shim.cpp):
//  - every CUDA thread of a block is a real std::thread; __syncthreads() is a real barrier, so
//    races between the threads of a block are real races (TSan sees them);
//  - the blocks of a grid run one after another on the same blockDim threads, and one kernel runs
//    at a time in the process; `__shared__` variables are function statics (one instance, reused
//    by every block: per-block storage because blocks never overlap);
//  - every operation runs synchronously at the call (streams exist and are checked, but nothing is
//    asynchronous);
//  - device memory is host memory: cudaMalloc makes an exact-size allocation (so ASan catches a
//    kernel reading or writing past it), filled with 0xBE bytes (cudaMalloc does not clear), and
//    registered, so cudaMemcpy/cudaMemset/cudaFree and kernel pointer arguments are checked
//    against the live allocations.
// Not emulated (a kernel using them does not compile, or the shim reports it): warps and warp
// intrinsics, atomics, dynamic shared memory, cooperative groups, texture/surface memory,
// multiple devices, events, graphs. The GPU memory model and timing are not modelled at all.
#ifndef PERCO_CUDA_SHIM_H
#define PERCO_CUDA_SHIM_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

// --- CUDA C++ keywords ------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__
// Function-local statics: one instance, reused by the blocks (which never run concurrently).
#define __shared__ static
#define __syncthreads() ::perco_shim::syncthreads()

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace perco_shim {
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
}  // namespace perco_shim
using perco_shim::blockDim;
using perco_shim::blockIdx;
using perco_shim::gridDim;
using perco_shim::threadIdx;

// IEEE float32 division, round to nearest (the host's default rounding mode; SSE, no x87).
inline float __fdiv_rn(float a, float b) { return a / b; }

// --- runtime API types ------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidSymbol = 13,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
typedef cudaError_t cudaError;

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;
#define cudaStreamDefault 0x00
#define cudaStreamNonBlocking 0x01
#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamPerThread ((cudaStream_t)0x2)

// C++ linkage on purpose: these never collide with a real libcudart loaded in the same process.
int perco_shim_is_host_emulation();  // 1: tells a binary it runs on the shim
cudaError_t cudaGetDeviceCount(int* count);  // always one emulated device
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorName(cudaError_t error);
const char* cudaGetErrorString(cudaError_t error);

cudaError_t cudaMalloc(void** ptr, size_t bytes);
template <typename T>
inline cudaError_t cudaMalloc(T** ptr, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(ptr), bytes);
}
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream = 0);
cudaError_t cudaMemset(void* dst, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream = 0);

cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);

namespace perco_shim {
cudaError_t copy_to_symbol(void* symbol, size_t symbol_bytes, const char* api, const void* src, size_t bytes,
                           size_t offset, cudaMemcpyKind kind, cudaStream_t stream);
}

// `symbol` is the __constant__ / __device__ variable itself (the runtime API's template form).
template <typename T>
inline cudaError_t cudaMemcpyToSymbol(const T& symbol, const void* src, size_t bytes, size_t offset = 0,
                                      cudaMemcpyKind kind = cudaMemcpyHostToDevice) {
  return perco_shim::copy_to_symbol(const_cast<void*>(static_cast<const void*>(&symbol)), sizeof(T),
                                    "cudaMemcpyToSymbol", src, bytes, offset, kind, 0);
}
template <typename T>
inline cudaError_t cudaMemcpyToSymbolAsync(const T& symbol, const void* src, size_t bytes, size_t offset = 0,
                                           cudaMemcpyKind kind = cudaMemcpyHostToDevice, cudaStream_t stream = 0) {
  return perco_shim::copy_to_symbol(const_cast<void*>(static_cast<const void*>(&symbol)), sizeof(T),
                                    "cudaMemcpyToSymbolAsync", src, bytes, offset, kind, stream);
}

// --- device-side runtime: barriers, kernel launch ------------------------------------------------
namespace perco_shim {

// __syncthreads(): a real barrier over the block's threads. Built with -DPERCO_SHIM_BROKEN_BARRIER=N
// the N-th __syncthreads() each thread of a block reaches is skipped by every thread (a negative
// test: TSan must then report a race).
void syncthreads();
// The barrier inside a CUB block primitive (never skipped by PERCO_SHIM_BROKEN_BARRIER).
void block_internal_sync();
// The calling thread's rank in its block; aborts unless the block has exactly `threads` threads
// (a CUB primitive specialized for BLOCK_DIM_X = 256 is undefined in a block of another size).
unsigned linear_thread_rank(unsigned threads, const char* who);
// A device-side error (undefined behaviour on the GPU): print and abort, as a failed device assert.
[[noreturn]] void device_fault(const char* fmt, ...);

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};
// Runs body(context) once per CUDA thread of the grid; sets the last error on a bad launch.
void run_grid(const char* kernel, const LaunchConfig& config, void (*body)(void*), void* context);
// False (with a message) unless `pointer` is null or inside a live cudaMalloc allocation (the end
// of one included). Only raw pointer parameters are checked; pointers inside structs are not.
bool check_kernel_pointer(const char* kernel, size_t parameter, const void* pointer);
void set_last_error(cudaError_t error);

template <typename... P>
class Launcher {
 public:
  Launcher(void (*kernel)(P...), const char* name, const LaunchConfig& config)
      : kernel_(kernel), name_(name), config_(config) {}

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // The parameters are converted once, as for a call, and every thread gets its own copy.
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    if (!check_pointers(params, std::index_sequence_for<P...>{})) {
      set_last_error(cudaErrorIllegalAddress);
      return;
    }
    struct Context {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...>* params;
    } context{kernel_, &params};
    run_grid(name_, config_,
             [](void* c) {
               auto* ctx = static_cast<Context*>(c);
               std::tuple<std::decay_t<P>...> mine = *ctx->params;
               std::apply(ctx->kernel, mine);
             },
             &context);
  }

 private:
  template <typename Tuple, size_t... I>
  bool check_pointers(const Tuple& params, std::index_sequence<I...>) const {
    bool ok = true;
    ((ok = check_one(I, std::get<I>(params)) && ok), ...);
    return ok;
  }
  template <typename T>
  bool check_one(size_t index, const T& value) const {
    if constexpr (std::is_pointer_v<T>)
      return check_kernel_pointer(name_, index, static_cast<const void*>(value));
    else
      return true;
  }

  void (*kernel_)(P...);
  const char* name_;
  LaunchConfig config_;
};

template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, size_t shared_bytes = 0,
                      cudaStream_t stream = 0) {
  return Launcher<P...>(kernel, name, LaunchConfig{grid, block, shared_bytes, stream});
}

}  // namespace perco_shim

// `kernel<<<grid, block, smem, stream>>>(args)` is not C++; the host build rewrites each launch
// into `PERCO_SHIM_LAUNCH(kernel, grid, block, smem, stream)(args)` (kernels/host/rewrite_launches.cmake).
#define PERCO_SHIM_LAUNCH(kernel, ...) ::perco_shim::launch(kernel, #kernel, __VA_ARGS__)

#endif  // PERCO_CUDA_SHIM_H
