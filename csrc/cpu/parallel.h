// Work split across threads: a strided 2-D byte copier, and a parallel loop.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace blockpool::cpu {

// `rows` rows of `row_bytes` bytes each. Elements inside a row are
// `itemsize` bytes apart in memory when the element strides equal itemsize
// (the fast case, one memcpy per row or per tile); otherwise each element is
// copied on its own. A null `src` writes zeros.
struct Tile {
  const char* src;
  char* dst;
  int64_t rows;
  int64_t row_elems;
  int itemsize;
  int64_t src_row_stride;   // bytes
  int64_t dst_row_stride;   // bytes
  int64_t src_elem_stride;  // bytes
  int64_t dst_elem_stride;  // bytes

  int64_t bytes() const { return rows * row_elems * itemsize; }
};

// Copies every tile. Tiles must not overlap each other's destinations.
// Uses up to num_copy_threads() threads once the copy is large enough.
void copy_tiles(const std::vector<Tile>& tiles);

// Runs body(begin, end) over [0, n) in contiguous chunks on up to
// num_copy_threads() threads; `bytes_per_item` decides when threads pay off.
void parallel_for(int64_t n, int64_t bytes_per_item,
                  const std::function<void(int64_t, int64_t)>& body);

// BLOCKPOOL_NUM_THREADS if set, else the hardware threads, at most 8.
int num_copy_threads();

}  // namespace blockpool::cpu
