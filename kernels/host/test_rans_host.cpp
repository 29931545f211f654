// Host build only: the ctest sweep kernels/tests/test_rans.cu, compiled as host C++ against the
// emulated runtime (kernels/host/cuda_shim.h), which reports one device, so the sweep runs.
#include "../tests/test_rans.cu"
