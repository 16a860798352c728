// AVX2+FMA build of the dwconv_layernorm CPU kernel (csrc/cpu/dwconv_layernorm.cpp, included
// below into namespace hires::convnext::avx2); the dispatcher there picks it at run time on CPUs
// that have AVX2 and FMA. Every header is included before the target pragma, so no inline
// function shared with other files is compiled for AVX2 here.
#if defined(__x86_64__) && defined(__GNUC__)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "csrc/cpu/cpu_path.h"
#include "csrc/cpu/dwconv_layernorm.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define HIRES_DWCONV_ISA avx2
#include "csrc/cpu/dwconv_layernorm.cpp"
#pragma GCC pop_options
#endif
