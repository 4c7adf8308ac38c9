// The CPU kernels' scratch memory (compiled once per instruction set, see xent_rows.h).
#pragma once

#include <cstddef>
#include <memory>

namespace torch_xent {
namespace cpu {
namespace CPU_CAPABILITY {

// Per-thread scratch memory, kept from call to call: a fresh allocation of a row's size would be an
// mmap, page faults and a munmap on every call.
inline void* thread_scratch(size_t bytes) {
  static thread_local std::unique_ptr<char[]> buffer;
  static thread_local size_t capacity = 0;
  if (capacity < bytes) {
    buffer.reset();
    buffer.reset(new char[bytes]);
    capacity = bytes;
  }
  return buffer.get();
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace torch_xent
