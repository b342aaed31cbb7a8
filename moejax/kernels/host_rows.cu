// moejax_host_rows_to_slots: rows of pinned host memory copied into slots of a device array, inside a step program,
// with the rows and slots chosen on the device.
//
//   table  u32 [K, 2]  host addresses of K rows (pinned, so mapped into the GPU's address space), row_bytes each,
//                      as (low, high) halves: JAX has no 64-bit integers unless x64 is on
//   keys   s32 [C]     which row each of C copies reads (-1: no copy)
//   slots  s32 [C]     which slot of dst it writes (-1 or >= S: no copy)
//   dst    [S, ...]    any dtype; aliased to the result, so the copies write into it in place
//
// Every block of the grid's row c reads keys[c] and slots[c] itself, so the host never learns them: the copies
// run on the step's stream between the kernels around them. The GPU's threads read the host rows over the link
// (16-byte loads, kUnroll of them in flight per thread, where the rows are 16-byte aligned) and store them straight
// into the slot: no temporary. host_rows_cpu.cc is its twin for the CPU backend (the tests).
#include <cstdint>

#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

__global__ void HostRowsToSlotsKernel(const uint32_t* table, const int32_t* keys, const int32_t* slots,
                                      int64_t num_rows, int64_t num_slots, int64_t row_bytes, char* dst) {
  const int32_t key = keys[blockIdx.y];
  const int32_t slot = slots[blockIdx.y];
  if (key < 0 || key >= num_rows || slot < 0 || slot >= num_slots) return;
  const uint64_t address = (static_cast<uint64_t>(table[2 * key + 1]) << 32) | table[2 * key];
  const char* src = reinterpret_cast<const char*>(address);
  char* out = dst + static_cast<int64_t>(slot) * row_bytes;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (((address | reinterpret_cast<uint64_t>(out)) & 15) != 0) {  // rows not 16-byte aligned: byte by byte
    for (; i < row_bytes; i += stride) out[i] = src[i];
    return;
  }
  const int64_t vectors = row_bytes / 16;
  const uint4* src4 = reinterpret_cast<const uint4*>(src);
  uint4* out4 = reinterpret_cast<uint4*>(out);
  for (; i + (kUnroll - 1) * stride < vectors; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = src4[i + u * stride];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) out4[i + u * stride] = v[u];
  }
  for (; i < vectors; i += stride) out4[i] = src4[i];
  if (blockIdx.x == 0) {  // a row whose size is not a multiple of 16 bytes: the tail byte by byte
    for (int64_t b = vectors * 16 + threadIdx.x; b < row_bytes; b += kThreads) out[b] = src[b];
  }
}

ffi::Error HostRowsToSlots(cudaStream_t stream, int64_t blocks, ffi::Buffer<ffi::U32> table,
                           ffi::Buffer<ffi::S32> keys, ffi::Buffer<ffi::S32> slots, ffi::AnyBuffer dst,
                           ffi::Result<ffi::AnyBuffer> out) {
  if (keys.element_count() != slots.element_count()) {
    return ffi::Error::InvalidArgument("host_rows_to_slots: keys and slots differ in length");
  }
  const auto dims = out->dimensions();
  if (dims.size() < 1 || dims[0] == 0 || out->untyped_data() != dst.untyped_data()) {
    return ffi::Error::InvalidArgument("host_rows_to_slots: dst must be [S, ...] with S > 0 and aliased to the result");
  }
  const int64_t copies = keys.element_count();
  if (copies == 0) return ffi::Error::Success();
  const int64_t num_slots = dims[0];
  const int64_t row_bytes = static_cast<int64_t>(out->size_bytes()) / num_slots;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(copies));
  HostRowsToSlotsKernel<<<grid, kThreads, 0, stream>>>(
      table.typed_data(), keys.typed_data(), slots.typed_data(), static_cast<int64_t>(table.element_count() / 2),
      num_slots, row_bytes, static_cast<char*>(out->untyped_data()));
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return ffi::Error::Internal(cudaGetErrorString(status));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxHostRowsToSlots, HostRowsToSlots,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<int64_t>("blocks")
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              // one launch of the same grid every call, its keys and slots read on the device:
                              // XLA may record it into a command buffer (a CUDA graph) with the kernels around it
                              {ffi::Traits::kCmdBufferCompatible});
