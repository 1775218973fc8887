// The per-block ops: concat_blocks, concat_dequantize_blocks, split_blocks.
// Each block is its own array [H, B, D]; one call covers every layer.
#include <limits>
#include <sstream>

#include "block_index.h"
#include "block_ops.h"
#include "validation.h"

namespace blockpool {

namespace {

std::string block_name(size_t i, size_t j, const char* what = "blocks") {
  return std::string(what) + "[" + std::to_string(i) + "][" +
         std::to_string(j) + "]";
}

void check_block(const mx::array& b, const mx::array& first, size_t i,
                 size_t j, const char* op, const char* what = "blocks") {
  if (b.ndim() != 3) {
    fail(std::string(op) + ": " + block_name(i, j, what) +
         " must have rank 3 [H, B, D], got shape " + shape_str(b.shape()) +
         ".");
  }
  if (b.shape() != first.shape()) {
    fail(std::string(op) + ": " + block_name(i, j, what) + " has shape " +
         shape_str(b.shape()) + " but " + block_name(i, 0, what) +
         " has shape " + shape_str(first.shape()) +
         "; the blocks of one entry must have the same shape.");
  }
  if (b.dtype() != first.dtype()) {
    std::ostringstream os;
    os << op << ": " << block_name(i, j, what) << " has dtype " << b.dtype()
       << " but " << block_name(i, 0, what) << " has dtype " << first.dtype()
       << "; the blocks of one entry must have the same dtype.";
    fail(os.str());
  }
}

void check_entry_count(size_t count, size_t i, const char* op,
                       const char* what = "blocks") {
  if (count == 0) {
    fail(where(op, what, i) +
         " is empty: every entry needs at least one block (its output's "
         "shape comes from its blocks).");
  }
}

void check_tokens(int64_t blocks, int64_t block_tokens, const char* op) {
  if (blocks * block_tokens > std::numeric_limits<int32_t>::max()) {
    fail(std::string(op) + ": too many tokens for one entry.");
  }
}

}  // namespace

std::vector<mx::array> concat_blocks(
    const std::vector<std::vector<mx::array>>& blocks, mx::StreamOrDevice s) {
  const char* op = "concat_blocks";
  if (blocks.empty()) {
    return {};
  }
  auto stream = mx::to_stream(s);
  DistinctInputs inputs;
  std::vector<JoinEntry> entries;
  std::vector<int> block_inputs;
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const auto& entry = blocks[i];
    check_entry_count(entry.size(), i, op);
    const auto& first = entry[0];
    for (size_t j = 0; j < entry.size(); ++j) {
      check_block(entry[j], first, i, j, op);
    }
    int64_t n = static_cast<int64_t>(entry.size());
    check_tokens(n, first.shape(1), op);
    entries.push_back({static_cast<int64_t>(block_inputs.size()), n});
    for (const auto& b : entry) {
      block_inputs.push_back(inputs.add(b));
    }
    shapes.push_back({1, first.shape(0), static_cast<int>(n * first.shape(1)),
                      first.shape(2)});
    dtypes.push_back(first.dtype());
  }
  return mx::array::make_arrays(
      std::move(shapes), dtypes,
      std::make_shared<ConcatBlocks>(
          stream, JoinParams{std::move(entries), std::move(block_inputs)}),
      inputs.arrays());
}

std::vector<mx::array> concat_dequantize_blocks(
    const std::vector<std::vector<mx::array>>& packed,
    const std::vector<std::vector<mx::array>>& scales,
    const std::vector<std::vector<mx::array>>& biases, int group_size,
    int bits, mx::StreamOrDevice s) {
  const char* op = "concat_dequantize_blocks";
  if (scales.size() != packed.size() || biases.size() != packed.size()) {
    std::ostringstream os;
    os << op << ": got " << packed.size() << " packed entries, "
       << scales.size() << " scales entries and " << biases.size()
       << " biases entries; they must have the same length.";
    fail(os.str());
  }
  check_quantization(group_size, bits, op);
  if (packed.empty()) {
    return {};
  }
  auto stream = mx::to_stream(s);
  int per_word = blockpool_index::values_per_word(bits);
  DistinctInputs inputs;
  std::vector<JoinEntry> entries;
  std::vector<int> block_inputs;
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (size_t i = 0; i < packed.size(); ++i) {
    check_entry_count(packed[i].size(), i, op, "packed");
    if (scales[i].size() != packed[i].size() ||
        biases[i].size() != packed[i].size()) {
      std::ostringstream os;
      os << op << ": entry " << i << " has " << packed[i].size()
         << " packed blocks, " << scales[i].size() << " scales and "
         << biases[i].size() << " biases; they must match.";
      fail(os.str());
    }
    const auto& q0 = packed[i][0];
    const auto& s0 = scales[i][0];
    for (size_t j = 0; j < packed[i].size(); ++j) {
      const auto& q = packed[i][j];
      check_block(q, q0, i, j, op, "packed");
      if (q.dtype() != mx::uint32) {
        std::ostringstream os;
        os << op << ": " << block_name(i, j, "packed")
           << " must be uint32, got " << q.dtype() << ".";
        fail(os.str());
      }
      int64_t dim = int64_t(q.shape(2)) * per_word;
      mx::Shape groups{q.shape(0), q.shape(1),
                       static_cast<int>(dim / group_size)};
      for (const auto* plane : {&scales[i][j], &biases[i][j]}) {
        if (dim % group_size != 0 || plane->shape() != groups) {
          std::ostringstream os;
          os << op << ": " << block_name(i, j, "scales")
             << " and its biases must have shape " << shape_str(groups)
             << " for packed data " << shape_str(q.shape()) << " with bits="
             << bits << " and group_size=" << group_size << ", got "
             << shape_str(plane->shape()) << ".";
          fail(os.str());
        }
      }
      auto dtype = scales[i][j].dtype();
      if (biases[i][j].dtype() != dtype || dtype != s0.dtype() ||
          (dtype != mx::float16 && dtype != mx::bfloat16 &&
           dtype != mx::float32)) {
        std::ostringstream os;
        os << op << ": entry " << i << ": every block's scales and biases "
           << "must share one dtype (float16, bfloat16 or float32); "
           << block_name(i, j, "scales") << " is " << dtype << " and its "
           << "biases " << biases[i][j].dtype() << ", entry's first scales "
           << s0.dtype() << ".";
        fail(os.str());
      }
    }
    int64_t n = static_cast<int64_t>(packed[i].size());
    check_tokens(n, q0.shape(1), op);
    entries.push_back({static_cast<int64_t>(block_inputs.size() / 3), n});
    for (size_t j = 0; j < packed[i].size(); ++j) {
      block_inputs.push_back(inputs.add(packed[i][j]));
      block_inputs.push_back(inputs.add(scales[i][j]));
      block_inputs.push_back(inputs.add(biases[i][j]));
    }
    shapes.push_back({1, q0.shape(0), static_cast<int>(n * q0.shape(1)),
                      q0.shape(2) * per_word});
    dtypes.push_back(s0.dtype());  // each entry its own dtype
  }
  return mx::array::make_arrays(
      std::move(shapes), dtypes,
      std::make_shared<ConcatDequantizeBlocks>(
          stream, JoinParams{std::move(entries), std::move(block_inputs),
                             group_size, bits}),
      inputs.arrays());
}

std::vector<std::vector<mx::array>> split_blocks(
    const std::vector<mx::array>& sources, const std::vector<int64_t>& offsets,
    const std::vector<std::optional<mx::array>>& heads, int64_t block_tokens,
    mx::StreamOrDevice s) {
  const char* op = "split_blocks";
  if (offsets.size() != sources.size() || heads.size() != sources.size()) {
    std::ostringstream os;
    os << op << ": got " << sources.size() << " sources, " << offsets.size()
       << " offsets and " << heads.size()
       << " heads; they must have the same length.";
    fail(os.str());
  }
  if (block_tokens < 1 || block_tokens > std::numeric_limits<int32_t>::max()) {
    fail(std::string(op) + ": block_tokens must be at least 1, got " +
         std::to_string(block_tokens) + ".");
  }
  auto stream = mx::to_stream(s);

  // Nodes of at most kOutputsPerNode outputs: every output of an MLX node
  // holds all its siblings, so one node of n outputs costs n^2 references
  // (a 3,072-block write-back took 200 ms to build as one node).
  constexpr int64_t kOutputsPerNode = 128;
  std::vector<std::vector<mx::array>> out(sources.size());
  DistinctInputs inputs;
  std::vector<SplitEntry> entries;
  std::vector<std::pair<size_t, int64_t>> owners;  // (source index, blocks)
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  auto flush = [&]() {
    if (shapes.empty()) {
      return;
    }
    auto flat = mx::array::make_arrays(
        std::move(shapes), dtypes,
        std::make_shared<SplitBlocks>(
            stream, SplitParams{std::move(entries), block_tokens}),
        inputs.arrays());
    size_t next = 0;
    for (const auto& [owner, n] : owners) {
      for (int64_t k = 0; k < n; ++k) {
        out[owner].push_back(flat[next++]);
      }
    }
    inputs = DistinctInputs();
    entries.clear();
    owners.clear();
    shapes.clear();
    dtypes.clear();
  };

  for (size_t i = 0; i < sources.size(); ++i) {
    const auto& src = sources[i];
    if (src.ndim() != 4 || src.shape(0) != 1) {
      fail(where(op, "sources", i) + " must have shape [1, H, T, D], got " +
           shape_str(src.shape()) + ".");
    }
    int64_t offset = offsets[i];
    if (offset < 0 || offset >= block_tokens) {
      std::ostringstream os;
      os << op << ": offsets[" << i << "] = " << offset << " must be in [0, "
         << block_tokens << ").";
      fail(os.str());
    }
    mx::Shape block_shape{src.shape(1), static_cast<int>(block_tokens),
                          src.shape(3)};
    if (heads[i]) {
      const auto& head = *heads[i];
      if (head.shape() != block_shape) {
        fail(where(op, "heads", i) + " must have shape " +
             shape_str(block_shape) + " to match its source " +
             shape_str(src.shape()) + " and block_tokens=" +
             std::to_string(block_tokens) + ", got " +
             shape_str(head.shape()) + ".");
      }
      if (head.dtype() != src.dtype()) {
        std::ostringstream os;
        os << where(op, "heads", i) << " has dtype " << head.dtype()
           << " but its source has dtype " << src.dtype() << ".";
        fail(os.str());
      }
    }
  }

  for (size_t i = 0; i < sources.size(); ++i) {
    const auto& src = sources[i];
    int64_t n = blockpool_index::blocks_for(offsets[i], src.shape(2),
                                            block_tokens);
    if (n == 0) {
      continue;  // no tokens at offset 0: no blocks, nothing to compute
    }
    if (static_cast<int64_t>(shapes.size()) + n > kOutputsPerNode) {
      flush();
    }
    SplitEntry e;
    e.source = inputs.add(src);
    e.head = heads[i] ? inputs.add(*heads[i]) : -1;
    e.offset = offsets[i];
    e.blocks = n;
    entries.push_back(e);
    owners.emplace_back(i, n);
    for (int64_t k = 0; k < n; ++k) {
      shapes.push_back({src.shape(1), static_cast<int>(block_tokens),
                        src.shape(3)});
      dtypes.push_back(src.dtype());
    }
  }
  flush();
  return out;
}

}  // namespace blockpool
