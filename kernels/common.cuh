// What every Pagoda kernel shares: element conversions for the three activation dtypes, warp and
// block reductions, vector loads, and the few constructs whose spelling differs between nvcc/NVRTC
// and the CPU emulation (cuda_emu.h, which defines CUDA_EMU).
//
// Conventions for every kernel in kernels/*.cu:
//  * entry points are `extern "C"`, named pagoda_<op>_<dtype> with dtype f32, f16 or bf16, and
//    each has its launch geometry computed by one Rust function in src/backend/cuda/geometry.rs;
//  * activations are row-major [rows, cols] in the activation dtype; arithmetic is in f32;
//  * sizes and indices are plain `int`/`unsigned` (no <stdint.h>: NVRTC has none); offsets into
//    large buffers are computed in size_t.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef CUDA_EMU
// Under nvcc/NVRTC: the usual byte-typed extern array, cast to the type the kernel wants (a typed
// one clashes between template instantiations). cuda_emu.h defines its own version.
#define CUDA_DYNAMIC_SHARED(T, name)                                   \
  extern __shared__ __align__(16) unsigned char pagoda_dyn_smem_[];  \
  T* name = reinterpret_cast<T*>(pagoda_dyn_smem_)
#endif

typedef __nv_bfloat16 bf16;
typedef __half f16;

namespace pagoda {

constexpr unsigned FULL_MASK = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(f16 x) { return __half2float(x); }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ f16 from_float<f16>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// Sum over the 32 lanes of a warp; every lane gets the total. All lanes must call it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// total. `scratch` is 32 floats of shared memory; the block must not be using it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();  // scratch may be reused right after
  return v;
}

// The elements packed in one 32-bit word, widened to f32 without taking any address (which would
// push the word to local memory).
template <typename T>
struct Unpack;
template <>
struct Unpack<float> {
  static constexpr int PER_WORD = 1;
  __device__ __forceinline__ static void run(unsigned w, float* out) { out[0] = __uint_as_float(w); }
};
template <>
struct Unpack<bf16> {
  static constexpr int PER_WORD = 2;
  // A bf16 is the top half of an f32: widening is a shift.
  __device__ __forceinline__ static void run(unsigned w, float* out) {
    out[0] = __uint_as_float(w << 16);
    out[1] = __uint_as_float(w & 0xffff0000u);
  }
};
template <>
struct Unpack<f16> {
  static constexpr int PER_WORD = 2;
  __device__ __forceinline__ static void run(unsigned w, float* out) {
    out[0] = __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
    out[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
  }
};

// Loads N consecutive elements (N * sizeof(T) a multiple of 16 bytes, `p` 16-byte aligned) as
// floats, with 16-byte loads.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&out)[N]) {
  constexpr int PER_LOAD = 16 / sizeof(T);
  constexpr int PER_WORD = Unpack<T>::PER_WORD;
  static_assert(N % PER_LOAD == 0, "load_floats: N must fill whole 16-byte loads");
#pragma unroll
  for (int i = 0; i < N / PER_LOAD; i++) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p + i * PER_LOAD);
    Unpack<T>::run(raw.x, out + i * PER_LOAD);
    Unpack<T>::run(raw.y, out + i * PER_LOAD + PER_WORD);
    Unpack<T>::run(raw.z, out + i * PER_LOAD + 2 * PER_WORD);
    Unpack<T>::run(raw.w, out + i * PER_LOAD + 3 * PER_WORD);
  }
}

}  // namespace pagoda

// Declares the extern "C" entry point NAME and, under the emulation, registers it so the Rust side
// can launch it by name (under nvcc/NVRTC the module's symbol table serves that purpose).
#ifdef CUDA_EMU
#define PAGODA_REGISTER(name) CUDA_EMU_REGISTER(name)
#else
#define PAGODA_REGISTER(name)
#endif

// Instantiates pagoda_<NAME>_{f32,f16,bf16}: PARAMS and BODY name function-like macros that take
// the element type and give the parenthesised parameter list and the body.
#define PAGODA_KERNEL_FOR(NAME, SUFFIX, TYPE, BOUNDS, PARAMS, BODY)                         \
  extern "C" __global__ void __launch_bounds__(BOUNDS) pagoda_##NAME##_##SUFFIX PARAMS(TYPE) { \
    BODY(TYPE);                                                                             \
  }                                                                                         \
  PAGODA_REGISTER(pagoda_##NAME##_##SUFFIX)

#define PAGODA_KERNEL_ALL_DTYPES(NAME, BOUNDS, PARAMS, BODY)   \
  PAGODA_KERNEL_FOR(NAME, f32, float, BOUNDS, PARAMS, BODY)    \
  PAGODA_KERNEL_FOR(NAME, f16, f16, BOUNDS, PARAMS, BODY)      \
  PAGODA_KERNEL_FOR(NAME, bf16, bf16, BOUNDS, PARAMS, BODY)
