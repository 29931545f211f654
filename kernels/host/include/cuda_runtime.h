// Host build only: stands in for the CUDA runtime header (see kernels/host/cuda_shim.h).
#ifndef PERCO_SHIM_CUDA_RUNTIME_H
#define PERCO_SHIM_CUDA_RUNTIME_H
#include "../cuda_shim.h"
#endif
