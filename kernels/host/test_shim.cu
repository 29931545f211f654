// Host build only (ctest shim_*): the CUDA emulation itself does what kernels/host/cuda_shim.h
// says, and its checks fire. Launches are rewritten by rewrite_launches.cmake as for rans.cu.
//   test_shim                    the semantics and the error returns (must pass)
//   test_shim divergent_barrier  a __syncthreads() not reached by every thread: must abort
//   test_shim cub_block_size     cub::BlockReduce<T, 256> in a 128-thread block: must abort
//   test_shim kernel_overflow    a kernel writing one element past its cudaMalloc: ASan must report
//   test_shim float_cast         a kernel converting 3e10f to unsigned: UBSan must report
//   test_shim expect MODE TEXT   runs one of those, passes if it fails printing TEXT
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

int failures = 0;
#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);   \
      std::fprintf(stderr, __VA_ARGS__);                          \
      std::fprintf(stderr, "\n");                                 \
      ++failures;                                                 \
    }                                                             \
  } while (0)

constexpr int kThreads = 256;

// Neighbours exchange through shared memory; every block reuses the same __shared__ array.
__global__ void exchange_kernel(int* out) {
  __shared__ int buffer[kThreads];
  buffer[threadIdx.x] = static_cast<int>(blockIdx.x * 1000 + threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buffer[(threadIdx.x + 1) % kThreads];
}

__global__ void reduce_scan_kernel(unsigned long long* sums, int* maxima, unsigned long long* prefixes,
                                   unsigned long long* aggregates) {
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  using ReduceI = cub::BlockReduce<int, kThreads>;
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage r;
    typename ReduceI::TempStorage i;
    typename Scan::TempStorage s;
  } temp;
  const unsigned t = threadIdx.x, g = blockIdx.x * blockDim.x + t;
  sums[g] = Reduce(temp.r).Sum(t + 1ull);
  __syncthreads();
  maxima[g] = ReduceI(temp.i).Reduce(static_cast<int>((t * 37) % 251), [](int a, int b) { return a < b ? b : a; });
  __syncthreads();
  Scan(temp.s).ExclusiveSum(t + 1ull, prefixes[g], aggregates[g]);
}

__global__ void index_kernel(uint3* where, dim3* dims) {
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned g = b * blockDim.x * blockDim.y * blockDim.z + t;
  where[2 * g] = blockIdx;
  where[2 * g + 1] = threadIdx;
  if (g == 0) dims[0] = gridDim, dims[1] = blockDim;
}

__global__ void early_return_kernel(int* out, unsigned n) {
  const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= n) return;  // fine without a later barrier
  out[g] = static_cast<int>(g);
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 128) return;  // the other half then waits at a barrier these never reach
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void cub_block_size_kernel(int* out) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  out[threadIdx.x] = Reduce(temp).Sum(1);
}

__global__ void overflow_kernel(int* out, unsigned n) {
  if (threadIdx.x == 0) out[n] = 1;  // one past the end
}

__global__ void float_cast_kernel(unsigned* out, float big) {
  out[threadIdx.x] = static_cast<unsigned>(big);  // the GPU saturates; C++: undefined, UBSan reports
}

__constant__ int c_small[4];

template <typename T>
std::vector<T> fetch(const T* device, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

void semantics() {
  const unsigned blocks = 3, n = blocks * kThreads;
  int* d_out;
  cudaMalloc(&d_out, n * sizeof(int));
  auto fresh = fetch(reinterpret_cast<unsigned char*>(d_out), 8);
  CHECK(fresh[0] == 0xBE && fresh[7] == 0xBE, "cudaMalloc memory is not the uninitialized pattern");
  exchange_kernel<<<blocks, kThreads>>>(d_out);
  CHECK(cudaGetLastError() == cudaSuccess, "exchange launch");
  auto out = fetch(d_out, n);
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < kThreads; ++t)
      CHECK(out[b * kThreads + t] == static_cast<int>(b * 1000 + (t + 1) % kThreads), "exchange b=%u t=%u", b, t);

  unsigned long long *d_sums, *d_prefix, *d_agg;
  int* d_max;
  cudaMalloc(&d_sums, n * 8);
  cudaMalloc(&d_prefix, n * 8);
  cudaMalloc(&d_agg, n * 8);
  cudaMalloc(&d_max, n * 4);
  reduce_scan_kernel<<<blocks, kThreads>>>(d_sums, d_max, d_prefix, d_agg);
  CHECK(cudaGetLastError() == cudaSuccess, "reduce_scan launch");
  auto sums = fetch(d_sums, n), prefix = fetch(d_prefix, n), agg = fetch(d_agg, n);
  auto maxima = fetch(d_max, n);
  for (unsigned g = 0; g < n; ++g) {
    const unsigned t = g % kThreads;
    // CUB: the reduction is defined in thread 0 only; the shim hands other threads their input.
    CHECK(sums[g] == (t == 0 ? 256ull * 257 / 2 : t + 1ull), "Sum thread %u: %llu", t, sums[g]);
    CHECK(maxima[g] == (t == 0 ? 250 : static_cast<int>((t * 37) % 251)), "Reduce(max) thread %u: %d", t, maxima[g]);
    CHECK(prefix[g] == t * (t + 1ull) / 2 && agg[g] == 256ull * 257 / 2, "ExclusiveSum thread %u", t);
  }

  uint3* d_where;
  dim3* d_dims;
  const dim3 grid(2, 3, 2), block(4, 2, 3);
  const unsigned total = 12 * 24;
  cudaMalloc(&d_where, 2 * total * sizeof(uint3));
  cudaMalloc(&d_dims, 2 * sizeof(dim3));
  index_kernel<<<grid, block, 0, 0>>>(d_where, d_dims);
  CHECK(cudaGetLastError() == cudaSuccess, "index launch");
  auto where = fetch(d_where, 2 * total);
  auto dims = fetch(d_dims, 2);
  CHECK(dims[0].x == 2 && dims[0].y == 3 && dims[0].z == 2 && dims[1].x == 4 && dims[1].y == 2 && dims[1].z == 3,
        "gridDim / blockDim");
  for (unsigned g = 0; g < total; ++g) {
    const unsigned b = g / 24, t = g % 24;
    const uint3 bi = where[2 * g], ti = where[2 * g + 1];
    CHECK(bi.x == b % 2 && bi.y == (b / 2) % 3 && bi.z == b / 6 && ti.x == t % 4 && ti.y == (t / 4) % 2 &&
              ti.z == t / 8, "blockIdx / threadIdx of thread %u", g);
  }

  cudaMemset(d_out, 0xff, n * sizeof(int));
  early_return_kernel<<<blocks, kThreads>>>(d_out, 300);
  CHECK(cudaGetLastError() == cudaSuccess, "early return launch");
  out = fetch(d_out, n);
  CHECK(out[299] == 299 && out[300] == -1, "early return");

  for (void* p : {static_cast<void*>(d_out), static_cast<void*>(d_sums), static_cast<void*>(d_prefix),
                  static_cast<void*>(d_agg), static_cast<void*>(d_max), static_cast<void*>(d_where),
                  static_cast<void*>(d_dims)})
    CHECK(cudaFree(p) == cudaSuccess, "cudaFree");
}

void checks() {
  int* d;
  cudaMalloc(&d, 16 * sizeof(int));
  std::vector<int> host(32, 0);
  CHECK(cudaMemcpy(d, host.data(), 16 * sizeof(int), cudaMemcpyHostToDevice) == cudaSuccess, "exact copy");
  CHECK(cudaMemcpy(d + 1, host.data(), 16 * sizeof(int), cudaMemcpyHostToDevice) == cudaErrorInvalidValue,
        "a copy past the allocation");
  CHECK(cudaGetLastError() == cudaErrorInvalidValue && cudaGetLastError() == cudaSuccess, "last error, then reset");
  CHECK(cudaMemcpy(host.data(), host.data() + 16, 4, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue,
        "host memory as the device side");
  CHECK(cudaMemcpy(host.data(), d, 4, cudaMemcpyHostToDevice) == cudaErrorInvalidValue, "device memory as the host side");
  CHECK(cudaMemcpy(host.data(), d, 0, cudaMemcpyDeviceToHost) == cudaSuccess, "an empty copy");
  CHECK(cudaMemset(d + 8, 0, 9 * sizeof(int)) == cudaErrorInvalidValue, "a memset past the allocation");
  CHECK(cudaFree(d + 1) == cudaErrorInvalidValue, "cudaFree inside an allocation");
  CHECK(cudaFree(host.data()) == cudaErrorInvalidValue, "cudaFree of host memory");
  int small[5] = {1, 2, 3, 4, 5};
  CHECK(cudaMemcpyToSymbol(c_small, small, sizeof(c_small)) == cudaSuccess, "symbol copy");
  CHECK(cudaMemcpyToSymbol(c_small, small, 4, 13) == cudaErrorInvalidValue, "a symbol copy past the symbol");
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess, "stream");
  CHECK(cudaStreamDestroy(stream) == cudaSuccess, "destroy");
  CHECK(cudaMemcpyAsync(d, host.data(), 4, cudaMemcpyHostToDevice, stream) == cudaErrorInvalidResourceHandle,
        "a destroyed stream");
  CHECK(cudaStreamDestroy(stream) == cudaErrorInvalidResourceHandle, "destroyed twice");
  cudaGetLastError();

  host.assign(32, 7);
  early_return_kernel<<<1, 32>>>(host.data(), 32);  // a host pointer as a kernel argument
  CHECK(cudaGetLastError() == cudaErrorIllegalAddress && host[0] == 7, "kernel with a host pointer: refused, not run");
  early_return_kernel<<<1, 2048>>>(d, 16);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "2048 threads per block");
  early_return_kernel<<<0, 32>>>(d, 16);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "an empty grid");
  early_return_kernel<<<1, 32, 128>>>(d, 16);
  CHECK(cudaGetLastError() == cudaErrorNotSupported, "dynamic shared memory");
  early_return_kernel<<<1, 16>>>(d + 16, 0);  // the end of an allocation is a valid (empty) pointer
  CHECK(cudaGetLastError() == cudaSuccess, "a pointer to the end of an allocation");
  cudaFree(d);
}

}  // namespace

// `test_shim expect MODE TEXT`: runs `test_shim MODE`, passes if it fails and prints TEXT.
int expect(const char* self, const char* mode, const char* text) {
  std::string command = std::string("'") + self + "' " + mode + " 2>&1";
  FILE* child = popen(command.c_str(), "r");
  if (!child) return 1;
  std::string output;
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof buffer, child)) output.append(buffer, n);
  const int status = pclose(child);
  std::fputs(output.c_str(), stdout);
  const bool ok = status != 0 && output.find(text) != std::string::npos;
  std::printf("%s: %s (exit status %d, expected a failure printing \"%s\")\n", mode, ok ? "caught" : "NOT CAUGHT",
              status, text);
  return ok ? 0 : 1;
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  if (std::strcmp(mode, "expect") == 0 && argc == 4) return expect(argv[0], argv[2], argv[3]);
  int* d;
  cudaMalloc(&d, kThreads * sizeof(int));
  if (std::strcmp(mode, "divergent_barrier") == 0) {
    divergent_barrier_kernel<<<1, kThreads>>>(d);
  } else if (std::strcmp(mode, "cub_block_size") == 0) {
    cub_block_size_kernel<<<1, 128>>>(d);
  } else if (std::strcmp(mode, "kernel_overflow") == 0) {
    overflow_kernel<<<1, 32>>>(d, kThreads);
  } else if (std::strcmp(mode, "float_cast") == 0) {
    float_cast_kernel<<<1, 32>>>(reinterpret_cast<unsigned*>(d), 3e10f);
  } else {
    semantics();
    checks();
    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
    cudaFree(d);
    return failures ? 1 : 0;
  }
  std::printf("%s: the emulation did not stop the kernel\n", mode);
  return 1;
}
