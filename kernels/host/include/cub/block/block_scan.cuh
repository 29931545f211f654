// Host build only: cub::BlockScan::ExclusiveSum with CUB's contract, for kernels/host/cuda_shim.h.
//  - every thread of the block must call it (it contains a barrier); the block must have exactly
//    BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z threads (checked: aborts otherwise);
//  - thread i gets the sum of the inputs of threads 0..i-1 (thread 0: T{} = 0), and every thread
//    gets the block aggregate (the sum of all inputs);
//  - TempStorage may be reused only after a __syncthreads(): every thread still reads every slot
//    after the internal barrier, so a reuse without one is a data race TSan reports.
// Sums run in thread order (exact for integers, as the kernels use it).
// Not emulated: other scan operators, prefix callbacks, inclusive scans, ITEMS_PER_THREAD arrays,
// BlockScan() without TempStorage.
#ifndef PERCO_SHIM_CUB_BLOCK_SCAN
#define PERCO_SHIM_CUB_BLOCK_SCAN
#include <cuda_runtime.h>

namespace cub {

enum BlockScanAlgorithm {
  BLOCK_SCAN_RAKING,
  BLOCK_SCAN_RAKING_MEMOIZE,
  BLOCK_SCAN_WARP_SCANS,
};

template <typename T, int BLOCK_DIM_X, BlockScanAlgorithm ALGORITHM = BLOCK_SCAN_RAKING, int BLOCK_DIM_Y = 1,
          int BLOCK_DIM_Z = 1>
class BlockScan {
  static constexpr unsigned kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    T slot[kThreads];
  };
  static_assert(std::is_trivially_default_constructible_v<TempStorage>, "TempStorage must live in __shared__");

  explicit BlockScan(TempStorage& temp)
      : temp_(temp), rank_(perco_shim::linear_thread_rank(kThreads, "cub::BlockScan")) {}

  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    temp_.slot[rank_] = input;
    perco_shim::block_internal_sync();
    T prefix{}, total{};
    for (unsigned i = 0; i < kThreads; ++i) {
      if (i == rank_) prefix = total;
      total = total + temp_.slot[i];
    }
    output = prefix;
    block_aggregate = total;
  }

  void ExclusiveSum(T input, T& output) {
    T aggregate;
    ExclusiveSum(input, output, aggregate);
  }

 private:
  TempStorage& temp_;
  unsigned rank_;
};

}  // namespace cub
#endif
