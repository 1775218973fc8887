// Block ids as the pooled ops receive them: lists or integer arrays of any
// layout and integer dtype, checked and turned into what a primitive keeps.
#pragma once

#include <cstdint>
#include <vector>

#include "block_ops.h"

namespace blockpool {

struct CollectedIds {
  // Ids known when the graph is built (lists, and arrays that are not
  // traced), checked, entry after entry.
  std::vector<int32_t> host;
  // Ids traced by mx.compile, each made a contiguous int32 array (values
  // that do not fit stay out of range); they become inputs of the node.
  std::vector<mx::array> traced;
  struct Run {
    int traced = -1;  // index into `traced`, or -1: ids in `host`
    int64_t start = 0;
    int64_t count = 0;
  };
  std::vector<Run> runs;  // one per entry

  // Fills entry i's id fields; `first_input` is the input index the first
  // traced array will have.
  void apply(std::vector<BlockEntry>& entries, int first_input) const;
};

// `num_blocks[i]` is the size of entry i's pool and `pool_of[i]` names it:
// with `unique_per_pool`, an id may appear only once per pool in the call.
// On a GPU stream every id must be known here: the Metal kernels cannot
// raise, so ids are checked on the host before any dispatch.
CollectedIds collect_ids(const std::vector<BlockIds>& block_ids,
                         const std::vector<int64_t>& num_blocks,
                         const std::vector<int>& pool_of, bool unique_per_pool,
                         const char* op, mx::Stream stream);

}  // namespace blockpool
