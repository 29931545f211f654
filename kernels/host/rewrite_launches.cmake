# Host build only: copies a .cu file to a .cpp, rewriting each kernel launch
#   name<<<grid, block, smem, stream>>>(args)   ->   PERCO_SHIM_LAUNCH(name, grid, block, smem, stream)(args)
# (the triple-chevron syntax is not C++; nvcc does the same rewrite into cudaLaunchKernel calls).
# Nothing else changes; a #line directive keeps diagnostics and sanitizer reports on the original
# file and line. Fails if a launch is left that the pattern does not cover.
# Usage: cmake -DIN=file.cu -DOUT=file.cpp -P rewrite_launches.cmake
if(NOT IN OR NOT OUT)
  message(FATAL_ERROR "usage: cmake -DIN=<file.cu> -DOUT=<file.cpp> -P rewrite_launches.cmake")
endif()
file(READ "${IN}" source)
string(REGEX MATCHALL "<<<" before "${source}")
list(LENGTH before launches)
string(REGEX REPLACE "([A-Za-z_][A-Za-z_0-9:]*)[ \t]*<<<([^<>]*)>>>" "PERCO_SHIM_LAUNCH(\\1, \\2)" source "${source}")
if(source MATCHES "<<<")
  message(FATAL_ERROR "${IN}: a kernel launch the host build cannot rewrite (template kernel, or '<'/'>' in the launch configuration)")
endif()
string(REGEX MATCHALL "PERCO_SHIM_LAUNCH\\(" after "${source}")
list(LENGTH after rewritten)
if(NOT launches EQUAL rewritten)
  message(FATAL_ERROR "${IN}: ${launches} launches but ${rewritten} rewritten")
endif()
file(WRITE "${OUT}.tmp" "// Generated from ${IN} by kernels/host/rewrite_launches.cmake: only the ${launches} kernel launches differ.\n#line 1 \"${IN}\"\n${source}")
file(RENAME "${OUT}.tmp" "${OUT}")
