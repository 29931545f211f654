// Host build only: cub::BlockReduce with CUB's contract, for kernels/host/cuda_shim.h.
//  - every thread of the block must call it (it contains a barrier); the block must have exactly
//    BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z threads (checked: aborts otherwise);
//  - the aggregate is returned in thread 0 only; other threads get their own input back (CUB: the
//    return value is undefined in threads other than thread 0);
//  - TempStorage may be reused only after a __syncthreads(): thread 0 still reads every slot after
//    the internal barrier, so a reuse without one is a data race TSan reports.
// The reduction runs in thread order (CUB's tree order differs): the same result for associative,
// commutative operators (integer sums, min, max), not necessarily for a float sum.
// Not emulated: the ITEMS_PER_THREAD array overloads, num_valid overloads, BlockReduce() without
// TempStorage.
#ifndef PERCO_SHIM_CUB_BLOCK_REDUCE
#define PERCO_SHIM_CUB_BLOCK_REDUCE
#include <cuda_runtime.h>

namespace cub {

enum BlockReduceAlgorithm {
  BLOCK_REDUCE_RAKING_COMMUTATIVE_ONLY,
  BLOCK_REDUCE_RAKING,
  BLOCK_REDUCE_WARP_REDUCTIONS,
};

template <typename T, int BLOCK_DIM_X, BlockReduceAlgorithm ALGORITHM = BLOCK_REDUCE_WARP_REDUCTIONS,
          int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1>
class BlockReduce {
  static constexpr unsigned kThreads = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

 public:
  struct TempStorage {
    T slot[kThreads];
  };
  static_assert(std::is_trivially_default_constructible_v<TempStorage>, "TempStorage must live in __shared__");

  explicit BlockReduce(TempStorage& temp)
      : temp_(temp), rank_(perco_shim::linear_thread_rank(kThreads, "cub::BlockReduce")) {}

  template <typename ReductionOp>
  T Reduce(T input, ReductionOp op) {
    temp_.slot[rank_] = input;
    perco_shim::block_internal_sync();
    if (rank_ != 0) return input;
    T aggregate = temp_.slot[0];
    for (unsigned i = 1; i < kThreads; ++i) aggregate = op(aggregate, temp_.slot[i]);
    return aggregate;
  }

  T Sum(T input) {
    return Reduce(input, [](const T& a, const T& b) { return a + b; });
  }

 private:
  TempStorage& temp_;
  unsigned rank_;
};

}  // namespace cub
#endif
