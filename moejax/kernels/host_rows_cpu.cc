// The CPU twin of host_rows.cu's moejax_host_rows_to_slots: the same operands, checks and copies, done with memcpy
// on the host platform, so the CPU tests run the engine's kernel path (tables, keys, slots, aliasing) end to end.
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error HostRowsToSlots(int64_t blocks, ffi::Buffer<ffi::U32> table, ffi::Buffer<ffi::S32> keys,
                           ffi::Buffer<ffi::S32> slots, ffi::AnyBuffer dst, ffi::Result<ffi::AnyBuffer> out) {
  (void)blocks;
  if (keys.element_count() != slots.element_count()) {
    return ffi::Error::InvalidArgument("host_rows_to_slots: keys and slots differ in length");
  }
  const auto dims = out->dimensions();
  if (dims.size() < 1 || dims[0] == 0 || out->untyped_data() != dst.untyped_data()) {
    return ffi::Error::InvalidArgument("host_rows_to_slots: dst must be [S, ...] with S > 0 and aliased to the result");
  }
  const int64_t num_rows = static_cast<int64_t>(table.element_count() / 2);
  const int64_t num_slots = dims[0];
  const int64_t row_bytes = static_cast<int64_t>(out->size_bytes()) / num_slots;
  const uint32_t* halves = table.typed_data();
  char* base = static_cast<char*>(out->untyped_data());
  for (int64_t c = 0; c < static_cast<int64_t>(keys.element_count()); ++c) {
    const int32_t key = keys.typed_data()[c];
    const int32_t slot = slots.typed_data()[c];
    if (key < 0 || key >= num_rows || slot < 0 || slot >= num_slots) continue;
    const uint64_t address = (static_cast<uint64_t>(halves[2 * key + 1]) << 32) | halves[2 * key];
    std::memcpy(base + static_cast<int64_t>(slot) * row_bytes, reinterpret_cast<const void*>(address), row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxHostRowsToSlotsCpu, HostRowsToSlots,
                              ffi::Ffi::Bind()
                                  .Attr<int64_t>("blocks")
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
