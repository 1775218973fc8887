// The pooled ops: gather_blocks, scatter_blocks, gather_dequantize_blocks.
#include <limits>
#include <sstream>

#include "block_ids.h"
#include "block_index.h"
#include "block_ops.h"
#include "validation.h"

namespace blockpool {

namespace {

void check_pool(const mx::array& pool, size_t i, const char* op,
                const char* what = "pools") {
  if (pool.ndim() != 4) {
    fail(where(op, what, i) + " must have rank 4 [num_blocks, H, B, D], got "
         "shape " + shape_str(pool.shape()) + ".");
  }
}

void check_lengths(size_t a, size_t b, const char* op, const char* what_a,
                   const char* what_b) {
  if (a != b) {
    std::ostringstream os;
    os << op << ": got " << a << " " << what_a << " but " << b << " "
       << what_b << "; they must have the same length.";
    fail(os.str());
  }
}

void check_tokens(int64_t num_ids, int64_t block, const char* op) {
  if (num_ids * block > std::numeric_limits<int32_t>::max()) {
    fail(std::string(op) + ": too many blocks for one entry.");
  }
}

}  // namespace

std::vector<mx::array> gather_blocks(const std::vector<mx::array>& pools,
                                     const std::vector<BlockIds>& block_ids,
                                     mx::StreamOrDevice s) {
  const char* op = "gather_blocks";
  check_lengths(pools.size(), block_ids.size(), op, "pools", "block id lists");
  if (pools.empty()) {
    return {};
  }
  auto stream = mx::to_stream(s);
  DistinctInputs inputs;
  std::vector<BlockEntry> entries(pools.size());
  std::vector<int64_t> num_blocks;
  std::vector<int> pool_of;
  for (size_t i = 0; i < pools.size(); ++i) {
    check_pool(pools[i], i, op);
    entries[i].pool = inputs.add(pools[i]);
    num_blocks.push_back(pools[i].shape(0));
    pool_of.push_back(entries[i].pool);
  }
  auto ids = collect_ids(block_ids, num_blocks, pool_of, false, op, stream);
  ids.apply(entries, static_cast<int>(inputs.size()));

  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (size_t i = 0; i < pools.size(); ++i) {
    const auto& pool = pools[i];
    check_tokens(ids.runs[i].count, pool.shape(2), op);
    shapes.push_back({1, pool.shape(1),
                      static_cast<int>(ids.runs[i].count * pool.shape(2)),
                      pool.shape(3)});
    dtypes.push_back(pool.dtype());
  }
  auto all = inputs.arrays();
  all.insert(all.end(), ids.traced.begin(), ids.traced.end());
  return mx::array::make_arrays(
      std::move(shapes), dtypes,
      std::make_shared<GatherBlocks>(
          stream, PooledParams{std::move(entries), std::move(ids.host)}),
      all);
}

std::vector<mx::array> gather_dequantize_blocks(
    const std::vector<mx::array>& packed, const std::vector<mx::array>& scales,
    const std::vector<mx::array>& biases,
    const std::vector<BlockIds>& block_ids, int group_size, int bits,
    mx::StreamOrDevice s) {
  const char* op = "gather_dequantize_blocks";
  check_lengths(packed.size(), block_ids.size(), op, "packed pools",
                "block id lists");
  check_lengths(packed.size(), scales.size(), op, "packed pools",
                "scales pools");
  check_lengths(packed.size(), biases.size(), op, "packed pools",
                "biases pools");
  check_quantization(group_size, bits, op);
  if (packed.empty()) {
    return {};
  }
  auto stream = mx::to_stream(s);
  DistinctInputs inputs;
  std::vector<BlockEntry> entries(packed.size());
  std::vector<int64_t> num_blocks;
  std::vector<int> pool_of;
  // Each packed pool goes with exactly one (scales, biases) pair.
  std::unordered_map<int, std::pair<std::uintptr_t, std::uintptr_t>> pairs;
  int per_word = blockpool_index::values_per_word(bits);
  for (size_t i = 0; i < packed.size(); ++i) {
    const auto& q = packed[i];
    std::ostringstream os;
    os << op << ": entry " << i << ": ";
    check_pool(q, i, op, "packed");
    if (q.dtype() != mx::uint32) {
      os << "packed data must be uint32, got " << q.dtype() << ".";
      fail(os.str());
    }
    int64_t dim = int64_t(q.shape(3)) * per_word;
    for (const auto* plane : {&scales[i], &biases[i]}) {
      if (plane->ndim() != 4 || plane->shape(0) != q.shape(0) ||
          plane->shape(1) != q.shape(1) || plane->shape(2) != q.shape(2) ||
          dim % group_size != 0 || plane->shape(3) != dim / group_size) {
        os << "scales and biases must be [" << q.shape(0) << ", "
           << q.shape(1) << ", " << q.shape(2) << ", " << dim / group_size
           << "] for packed data " << shape_str(q.shape()) << " with bits="
           << bits << " and group_size=" << group_size << ", got "
           << shape_str(plane->shape()) << ".";
        fail(os.str());
      }
    }
    if (scales[i].dtype() != biases[i].dtype() ||
        !mx::issubdtype(scales[i].dtype(), mx::floating) ||
        scales[i].dtype() == mx::float64) {
      os << "scales and biases must share one dtype: float16, bfloat16 or "
         << "float32.";
      fail(os.str());
    }
    int p = inputs.add(q);
    auto pair = std::make_pair(scales[i].id(), biases[i].id());
    auto [it, inserted] = pairs.emplace(p, pair);
    if (!inserted && it->second != pair) {
      os << "the same packed pool is paired with other scales or biases.";
      fail(os.str());
    }
    entries[i].pool = p;
    num_blocks.push_back(q.shape(0));
    pool_of.push_back(p);
  }
  for (size_t i = 0; i < packed.size(); ++i) {
    entries[i].scales = inputs.add(scales[i]);
    entries[i].biases = inputs.add(biases[i]);
  }
  auto ids = collect_ids(block_ids, num_blocks, pool_of, false, op, stream);
  ids.apply(entries, static_cast<int>(inputs.size()));

  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (size_t i = 0; i < packed.size(); ++i) {
    const auto& q = packed[i];
    check_tokens(ids.runs[i].count, q.shape(2), op);
    shapes.push_back({1, q.shape(1),
                      static_cast<int>(ids.runs[i].count * q.shape(2)),
                      q.shape(3) * per_word});
    dtypes.push_back(scales[i].dtype());  // each entry its own dtype
  }
  auto all = inputs.arrays();
  all.insert(all.end(), ids.traced.begin(), ids.traced.end());
  return mx::array::make_arrays(
      std::move(shapes), dtypes,
      std::make_shared<GatherDequantizeBlocks>(
          stream, PooledParams{std::move(entries), std::move(ids.host),
                               group_size, bits}),
      all);
}

std::vector<mx::array> scatter_blocks(const std::vector<mx::array>& pools,
                                      const std::vector<BlockIds>& block_ids,
                                      const std::vector<mx::array>& sources,
                                      const std::vector<int64_t>& offsets,
                                      mx::StreamOrDevice s) {
  const char* op = "scatter_blocks";
  check_lengths(pools.size(), block_ids.size(), op, "pools", "block id lists");
  check_lengths(pools.size(), sources.size(), op, "pools", "sources");
  if (!offsets.empty()) {
    check_lengths(pools.size(), offsets.size(), op, "pools", "offsets");
  }
  if (pools.empty()) {
    return {};
  }
  auto stream = mx::to_stream(s);
  DistinctInputs distinct;
  std::vector<int> pool_of;
  std::vector<int64_t> num_blocks;
  for (size_t i = 0; i < pools.size(); ++i) {
    check_pool(pools[i], i, op);
    pool_of.push_back(distinct.add(pools[i]));
    num_blocks.push_back(pools[i].shape(0));
  }

  // Shapes and dtypes first, so a bad source fails before any id is read.
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto& pool = pools[i];
    const auto& src = sources[i];
    if (src.ndim() != 4 || src.shape(0) != 1 ||
        src.shape(1) != pool.shape(1) || src.shape(3) != pool.shape(3)) {
      std::ostringstream os;
      os << where(op, "sources", i) << " must have shape [1, " << pool.shape(1)
         << ", T, " << pool.shape(3) << "] to match its pool "
         << shape_str(pool.shape()) << ", got " << shape_str(src.shape())
         << ".";
      fail(os.str());
    }
    if (src.dtype() != pool.dtype()) {
      std::ostringstream os;
      os << where(op, "sources", i) << " has dtype " << src.dtype()
         << " but its pool has dtype " << pool.dtype() << ".";
      fail(os.str());
    }
  }

  auto ids = collect_ids(block_ids, num_blocks, pool_of, true, op, stream);
  for (size_t i = 0; i < pools.size(); ++i) {
    int64_t block = pools[i].shape(2);
    int64_t first = offsets.empty() ? 0 : offsets[i];
    int64_t tokens = sources[i].shape(2);
    if (first < 0 || first >= block) {
      std::ostringstream os;
      os << op << ": offsets[" << i << "] = " << first << " must be in [0, "
         << block << ").";
      fail(os.str());
    }
    // Traced ids: their count is known, their values are checked later.
    int64_t count = ids.runs[i].count;
    if (first + tokens > count * block) {
      std::ostringstream os;
      os << where(op, "sources", i) << " has " << tokens << " tokens";
      if (first) {
        os << " starting at offset " << first;
      }
      os << ", more than its " << count << " blocks of " << block
         << " tokens hold.";
      fail(os.str());
    }
  }

  // One single-output node per distinct pool: [pool, sources..., ids...].
  std::vector<mx::array> updated;
  auto& unique = distinct.arrays();
  for (size_t p = 0; p < unique.size(); ++p) {
    std::vector<mx::array> node_inputs{unique[p]};
    std::vector<BlockEntry> entries;
    std::vector<int32_t> host;
    std::vector<mx::array> traced;
    for (size_t i = 0; i < pools.size(); ++i) {
      if (pool_of[i] != static_cast<int>(p)) {
        continue;
      }
      const auto& run = ids.runs[i];
      BlockEntry e;
      e.pool = 0;
      e.source = static_cast<int>(node_inputs.size());
      node_inputs.push_back(sources[i]);
      e.first_token = offsets.empty() ? 0 : offsets[i];
      e.num_ids = run.count;
      if (run.traced >= 0) {
        e.ids = -2 - static_cast<int>(traced.size());  // fixed below
        traced.push_back(ids.traced[run.traced]);
      } else {
        e.ids_start = static_cast<int64_t>(host.size());
        host.insert(host.end(), ids.host.begin() + run.start,
                    ids.host.begin() + run.start + run.count);
      }
      entries.push_back(e);
    }
    int first_traced = static_cast<int>(node_inputs.size());
    for (auto& e : entries) {
      if (e.ids <= -2) {
        e.ids = first_traced + (-2 - e.ids);
      }
    }
    node_inputs.insert(node_inputs.end(), traced.begin(), traced.end());
    auto shape = unique[p].shape();
    auto dtype = unique[p].dtype();
    updated.emplace_back(
        std::move(shape), dtype,
        std::make_shared<ScatterBlocks>(
            stream, PooledParams{std::move(entries), std::move(host)}),
        std::move(node_inputs));
  }
  unique.clear();  // the graph holds the only reference we keep

  std::vector<mx::array> per_entry;
  per_entry.reserve(pools.size());
  for (int p : pool_of) {
    per_entry.push_back(updated[p]);
  }
  return per_entry;
}

}  // namespace blockpool
