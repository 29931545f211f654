# Included by the top-level CMakeLists.txt with -DPERCO_KERNELS_HOST=ON: the kernel sources as host
# C++ against the CUDA emulation of this folder (cuda_shim.h, include/), no nvcc needed.
#   libperco_kernels_host.so  the C API of kernels/include/perco/rans.h, kernels run on the CPU
#   test_rans_host            kernels/tests/test_rans.cu compiled as host code (ctest: rans_host)
# PERCO_KERNELS_SANITIZE=address: ASan + UBSan (any report fails the test);
# PERCO_KERNELS_SANITIZE=thread: TSan, plus a twin library whose first __syncthreads() is a no-op and
# the ctest rans_host_broken_barrier_is_caught, which passes only if TSan reports the race.
find_package(Threads REQUIRED)

set(PERCO_HOST_DIR ${CMAKE_CURRENT_SOURCE_DIR}/kernels/host)

# A .cu file as host C++: only its kernel launches are rewritten (rewrite_launches.cmake).
function(perco_host_source cu cpp target)
  add_custom_command(
    OUTPUT ${cpp}
    COMMAND ${CMAKE_COMMAND} -DIN=${cu} -DOUT=${cpp} -P ${PERCO_HOST_DIR}/rewrite_launches.cmake
    DEPENDS ${cu} ${PERCO_HOST_DIR}/rewrite_launches.cmake
    COMMENT "Host build: rewriting the kernel launches of ${cu}"
    VERBATIM)
  add_custom_target(${target} DEPENDS ${cpp})  # one generator for every target using the file
endfunction()
set(PERCO_HOST_RANS ${CMAKE_CURRENT_BINARY_DIR}/host_gen/rans_host.cpp)
set(PERCO_HOST_SHIM_TEST ${CMAKE_CURRENT_BINARY_DIR}/host_gen/test_shim.cpp)
perco_host_source(${CMAKE_CURRENT_SOURCE_DIR}/kernels/src/rans.cu ${PERCO_HOST_RANS} perco_host_rans_source)
perco_host_source(${PERCO_HOST_DIR}/test_shim.cu ${PERCO_HOST_SHIM_TEST} perco_host_shim_test_source)

if(PERCO_KERNELS_SANITIZE STREQUAL "address")
  # float-cast-overflow is not part of GCC's -fsanitize=undefined; the GPU saturates such a
  # conversion where C++ leaves it undefined, so the kernels must never rely on either.
  set(PERCO_HOST_SANITIZE -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=all
                          -fno-omit-frame-pointer)
  set(PERCO_HOST_TEST_ENV "ASAN_OPTIONS=detect_leaks=1:abort_on_error=0" "UBSAN_OPTIONS=print_stacktrace=1")
elseif(PERCO_KERNELS_SANITIZE STREQUAL "thread")
  set(PERCO_HOST_SANITIZE -fsanitize=thread)
  # PERCO_TEST_QUICK: the split/resumable sweep of test_rans.cu without its largest cases (TSan makes every
  # emulated launch several times dearer; the ASan build runs them all)
  set(PERCO_HOST_TEST_ENV "TSAN_OPTIONS=halt_on_error=0:exitcode=66" "PERCO_TEST_QUICK=1")
elseif(NOT PERCO_KERNELS_SANITIZE STREQUAL "")
  message(FATAL_ERROR "PERCO_KERNELS_SANITIZE must be empty, 'address' or 'thread', not '${PERCO_KERNELS_SANITIZE}'")
endif()

function(perco_host_kernels library test broken_barrier)
  add_library(${library} SHARED ${PERCO_HOST_RANS} ${PERCO_HOST_DIR}/cuda_shim.cpp)
  add_dependencies(${library} perco_host_rans_source)
  # The emulation's cuda_runtime.h, cub/ and cuda/ headers; no CUDA toolkit header is ever seen.
  target_include_directories(${library} PUBLIC ${PERCO_HOST_DIR}/include ${CMAKE_CURRENT_SOURCE_DIR}/kernels/include)
  # As nvcc's --fmad=false: no contraction, IEEE float32 (the table procedure matches numpy bit for bit).
  target_compile_options(${library} PRIVATE -ffp-contract=off -fno-fast-math -Wall PUBLIC ${PERCO_HOST_SANITIZE})
  target_link_options(${library} PUBLIC ${PERCO_HOST_SANITIZE})
  if(PERCO_HOST_SANITIZE AND CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    # Clang links a static sanitizer runtime into executables only; a library loaded by Python needs
    # the shared one (what LD_PRELOAD then names). Not exercised in CI, which builds with GCC.
    target_link_options(${library} PUBLIC -shared-libsan)
  endif()
  target_link_libraries(${library} PUBLIC Threads::Threads)
  if(broken_barrier)
    target_compile_definitions(${library} PRIVATE PERCO_SHIM_BROKEN_BARRIER=${broken_barrier})
  endif()
  add_executable(${test} ${PERCO_HOST_DIR}/test_rans_host.cpp)
  target_link_libraries(${test} PRIVATE ${library})
endfunction()

perco_host_kernels(perco_kernels_host test_rans_host "${PERCO_SHIM_BROKEN_BARRIER}")
add_test(NAME rans_host COMMAND test_rans_host)  # no SKIP_RETURN_CODE: the emulation must run it
set_tests_properties(rans_host PROPERTIES ENVIRONMENT "${PERCO_HOST_TEST_ENV}")

# The emulation's own semantics and checks; the death cases pass only on the expected message.
add_executable(test_shim ${PERCO_HOST_SHIM_TEST})
add_dependencies(test_shim perco_host_shim_test_source)
target_compile_options(test_shim PRIVATE -ffp-contract=off -Wall)
target_link_libraries(test_shim PRIVATE perco_kernels_host)
add_test(NAME shim_host COMMAND test_shim)
add_test(NAME shim_host_detects_divergent_barrier
         COMMAND test_shim expect divergent_barrier "a barrier not reached by every thread of the block")
add_test(NAME shim_host_detects_cub_block_size
         COMMAND test_shim expect cub_block_size "cub::BlockReduce specialized for 256 threads used in a block of 128")
set(PERCO_HOST_SHIM_TESTS shim_host shim_host_detects_divergent_barrier shim_host_detects_cub_block_size)
if(PERCO_KERNELS_SANITIZE STREQUAL "address")
  add_test(NAME shim_host_asan_catches_kernel_overflow
           COMMAND test_shim expect kernel_overflow "AddressSanitizer: heap-buffer-overflow")
  add_test(NAME shim_host_ubsan_catches_float_cast
           COMMAND test_shim expect float_cast "is outside the range of representable values")
  list(APPEND PERCO_HOST_SHIM_TESTS shim_host_asan_catches_kernel_overflow shim_host_ubsan_catches_float_cast)
endif()
set_tests_properties(${PERCO_HOST_SHIM_TESTS} PROPERTIES ENVIRONMENT "${PERCO_HOST_TEST_ENV}")

if(PERCO_KERNELS_SANITIZE STREQUAL "thread" AND NOT PERCO_SHIM_BROKEN_BARRIER)
  # The race test must be able to fail: with the first barrier of tables_kernel gone (thread 0
  # writes s_max, the other threads read it), TSan has to report a data race.
  perco_host_kernels(perco_kernels_host_broken_barrier test_rans_host_broken_barrier 1)
  add_test(NAME rans_host_broken_barrier_is_caught COMMAND test_rans_host_broken_barrier tables)
  # halt_on_error: stop at the first report (exit 66), before the wrong values it read crash the kernel.
  set_tests_properties(rans_host_broken_barrier_is_caught PROPERTIES ENVIRONMENT "TSAN_OPTIONS=halt_on_error=1:exitcode=66"
                       PASS_REGULAR_EXPRESSION "WARNING: ThreadSanitizer: data race")
endif()
