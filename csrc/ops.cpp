// Op functions: validate the request, then build one graph node.
#include <sstream>
#include <limits>
#include <stdexcept>
#include <unordered_map>

#include "block_ops.h"

namespace blockpool {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument(msg);
}

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    os << (i ? ", " : "") << shape[i];
  }
  os << ")";
  return os.str();
}

void check_pool(const mx::array& pool, size_t i, const char* op) {
  if (pool.ndim() != 4) {
    std::ostringstream os;
    os << op << ": pools[" << i << "] must have rank 4 [num_blocks, H, B, D], "
       << "got shape " << shape_str(pool.shape()) << ".";
    fail(os.str());
  }
}

// Pools deduplicated by identity: entries naming the same array share one
// input, so a pool shared by every layer is read (and written) once.
struct PoolTable {
  std::vector<mx::array> unique;
  std::vector<int> index_of_entry;
};

PoolTable dedup_pools(const std::vector<mx::array>& pools, const char* op) {
  PoolTable table;
  std::unordered_map<std::uintptr_t, int> seen;
  for (size_t i = 0; i < pools.size(); ++i) {
    check_pool(pools[i], i, op);
    auto [it, inserted] =
        seen.emplace(pools[i].id(), static_cast<int>(table.unique.size()));
    if (inserted) {
      table.unique.push_back(pools[i]);
    }
    table.index_of_entry.push_back(it->second);
  }
  return table;
}

// The ids of every entry, as one flat int32 array, plus each entry's
// position in it. Concrete ids are checked here; traced ones in the kernel.
struct FlatIds {
  std::vector<mx::array> ids;  // exactly one array once built
  std::vector<BlockEntry> entries;
};

FlatIds flatten_ids(const std::vector<BlockIds>& block_ids,
                    const PoolTable& pools, bool unique_per_pool,
                    const char* op, mx::Stream stream) {
  FlatIds flat;
  std::vector<mx::array> pieces;
  std::vector<int32_t> host_run;
  std::vector<std::vector<char>> used(pools.unique.size());
  int64_t position = 0;

  auto flush_host_run = [&]() {
    if (!host_run.empty()) {
      pieces.emplace_back(host_run.begin(), mx::Shape{(int)host_run.size()},
                          mx::int32);
      host_run.clear();
    }
  };

  for (size_t i = 0; i < block_ids.size(); ++i) {
    const auto& entry_ids = block_ids[i];
    int pool_index = pools.index_of_entry[i];
    const auto& pool = pools.unique[pool_index];
    int64_t num_blocks = pool.shape(0);

    std::vector<int64_t> values;
    bool concrete = true;
    if (entry_ids.device) {
      auto ids = *entry_ids.device;
      if (!mx::issubdtype(ids.dtype(), mx::integer)) {
        std::ostringstream os;
        os << op << ": block_ids[" << i << "] must be an integer array, got "
           << ids.dtype() << ".";
        fail(os.str());
      }
      if (ids.ndim() != 1) {
        std::ostringstream os;
        os << op << ": block_ids[" << i << "] must be 1-D, got shape "
           << shape_str(ids.shape()) << ".";
        fail(os.str());
      }
      if (ids.is_tracer()) {
        concrete = false;  // inside mx.compile: checked by the kernel
      } else {
        // Read as int64 so that no wide id wraps into range unnoticed.
        auto wide = mx::astype(ids, mx::int64, stream);
        wide.eval();
        auto* p = wide.data<int64_t>();
        values.assign(p, p + wide.size());
      }
      ids = mx::astype(ids, mx::int32, stream);
      flush_host_run();
      pieces.push_back(ids);
      if (!concrete) {
        flat.entries.push_back({pool_index, position, (int64_t)ids.size(), 0, 0});
        position += ids.size();
        continue;
      }
    } else {
      values = entry_ids.host;
    }

    if (used[pool_index].empty() && unique_per_pool) {
      used[pool_index].assign(num_blocks, 0);
    }
    for (int64_t id : values) {
      if (id < 0 || id >= num_blocks) {
        std::ostringstream os;
        os << op << ": block id " << id << " in block_ids[" << i
           << "] is out of range for a pool of " << num_blocks << " blocks.";
        throw std::out_of_range(os.str());
      }
      if (unique_per_pool) {
        if (used[pool_index][id]) {
          std::ostringstream os;
          os << op << ": block id " << id << " appears more than once in "
             << "one scatter to the same pool (block_ids[" << i << "]).";
          fail(os.str());
        }
        used[pool_index][id] = 1;
      }
      if (!entry_ids.device) {
        host_run.push_back(static_cast<int32_t>(id));
      }
    }
    flat.entries.push_back(
        {pool_index, position, (int64_t)values.size(), 0, 0});
    position += values.size();
  }
  flush_host_run();
  if (pieces.empty()) {
    int32_t none = 0;
    flat.ids.emplace_back(&none, mx::Shape{0}, mx::int32);
  } else if (pieces.size() == 1) {
    flat.ids.push_back(pieces[0]);
  } else {
    flat.ids.push_back(mx::concatenate(pieces, 0, stream));
  }
  return flat;
}

void check_lengths(size_t pools, size_t ids, const char* op) {
  if (pools != ids) {
    std::ostringstream os;
    os << op << ": got " << pools << " pools but " << ids
       << " block id lists; they must have the same length.";
    fail(os.str());
  }
}

}  // namespace

std::vector<mx::array> gather_blocks(const std::vector<mx::array>& pools,
                                     const std::vector<BlockIds>& block_ids,
                                     mx::StreamOrDevice s) {
  const char* op = "gather_blocks";
  check_lengths(pools.size(), block_ids.size(), op);
  if (pools.empty()) {
    return {};
  }
  auto stream = mx::to_stream(s);
  auto table = dedup_pools(pools, op);
  auto flat = flatten_ids(block_ids, table, false, op, stream);

  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (const auto& e : flat.entries) {
    const auto& pool = table.unique[e.pool];
    int64_t tokens = e.num_ids * pool.shape(2);
    if (tokens > std::numeric_limits<int32_t>::max()) {
      fail("gather_blocks: too many blocks for one entry.");
    }
    shapes.push_back({1, pool.shape(1), (int)tokens, pool.shape(3)});
    dtypes.push_back(pool.dtype());
  }
  auto inputs = table.unique;
  inputs.push_back(flat.ids[0]);
  return mx::array::make_arrays(
      std::move(shapes), dtypes,
      std::make_shared<GatherBlocks>(stream, std::move(flat.entries)), inputs);
}

std::vector<mx::array> gather_dequantize_blocks(
    const std::vector<mx::array>& packed,
    const std::vector<mx::array>& scales,
    const std::vector<mx::array>& biases,
    const std::vector<BlockIds>& block_ids, int group_size, int bits,
    mx::StreamOrDevice s) {
  const char* op = "gather_dequantize_blocks";
  check_lengths(packed.size(), block_ids.size(), op);
  if (scales.size() != packed.size() || biases.size() != packed.size()) {
    fail(std::string(op) + ": packed, scales and biases must have one entry each per block id list.");
  }
  if (bits != 2 && bits != 4 && bits != 8) {
    fail(std::string(op) + ": bits must be 2, 4 or 8, got " + std::to_string(bits) + ".");
  }
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    fail(std::string(op) + ": group_size must be 32, 64 or 128, got " + std::to_string(group_size) + ".");
  }
  if (packed.empty()) {
    return {};
  }
  auto stream = mx::to_stream(s);
  auto table = dedup_pools(packed, op);
  std::vector<mx::array> unique_scales, unique_biases;
  std::vector<bool> seen(table.unique.size(), false);
  unique_scales.reserve(table.unique.size());
  for (size_t i = 0; i < packed.size(); ++i) {
    int p = table.index_of_entry[i];
    const auto& q = packed[i];
    std::ostringstream os;
    os << op << ": entry " << i << ": ";
    if (q.dtype() != mx::uint32) {
      os << "packed data must be uint32, got " << q.dtype() << ".";
      fail(os.str());
    }
    for (const auto* plane : {&scales[i], &biases[i]}) {
      if (plane->ndim() != 4 || plane->shape(0) != q.shape(0) ||
          plane->shape(1) != q.shape(1) || plane->shape(2) != q.shape(2) ||
          (int64_t)plane->shape(3) * group_size != (int64_t)q.shape(3) * 32 / bits) {
        os << "scales and biases must be [" << q.shape(0) << ", " << q.shape(1)
           << ", " << q.shape(2) << ", " << q.shape(3) * 32 / bits / group_size
           << "] for packed data " << shape_str(q.shape()) << " with bits="
           << bits << " and group_size=" << group_size << ", got "
           << shape_str(plane->shape()) << ".";
        fail(os.str());
      }
    }
    if (scales[i].dtype() != biases[i].dtype() ||
        !mx::issubdtype(scales[i].dtype(), mx::floating)) {
      os << "scales and biases must share one floating dtype.";
      fail(os.str());
    }
    if (!seen[p]) {
      seen[p] = true;
      unique_scales.push_back(scales[i]);
      unique_biases.push_back(biases[i]);
    } else if (unique_scales[p].id() != scales[i].id() ||
               unique_biases[p].id() != biases[i].id()) {
      os << "the same packed pool is paired with other scales or biases.";
      fail(os.str());
    }
  }
  auto flat = flatten_ids(block_ids, table, false, op, stream);

  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (const auto& e : flat.entries) {
    const auto& q = table.unique[e.pool];
    int64_t tokens = e.num_ids * q.shape(2);
    if (tokens > std::numeric_limits<int32_t>::max()) {
      fail(std::string(op) + ": too many blocks for one entry.");
    }
    shapes.push_back({1, q.shape(1), (int)tokens, q.shape(3) * 32 / bits});
    dtypes.push_back(unique_scales[e.pool].dtype());
  }
  auto inputs = table.unique;
  inputs.insert(inputs.end(), unique_scales.begin(), unique_scales.end());
  inputs.insert(inputs.end(), unique_biases.begin(), unique_biases.end());
  inputs.push_back(flat.ids[0]);
  return mx::array::make_arrays(
      std::move(shapes), dtypes,
      std::make_shared<GatherDequantizeBlocks>(stream, std::move(flat.entries),
                                               group_size, bits),
      inputs);
}

std::vector<mx::array> scatter_blocks(const std::vector<mx::array>& pools,
                                      const std::vector<BlockIds>& block_ids,
                                      const std::vector<mx::array>& sources,
                                      const std::vector<int64_t>& offsets,
                                      mx::StreamOrDevice s) {
  const char* op = "scatter_blocks";
  check_lengths(pools.size(), block_ids.size(), op);
  if (sources.size() != pools.size()) {
    std::ostringstream os;
    os << op << ": got " << pools.size() << " pools but " << sources.size()
       << " sources; they must have the same length.";
    fail(os.str());
  }
  if (!offsets.empty() && offsets.size() != pools.size()) {
    std::ostringstream os;
    os << op << ": got " << pools.size() << " pools but " << offsets.size()
       << " offsets; they must have the same length.";
    fail(os.str());
  }
  if (pools.empty()) {
    return {};
  }
  auto stream = mx::to_stream(s);
  auto table = dedup_pools(pools, op);

  // Shapes and dtypes first, so a bad source fails before any id is read.
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto& pool = table.unique[table.index_of_entry[i]];
    const auto& src = sources[i];
    std::ostringstream os;
    os << op << ": sources[" << i << "] ";
    if (src.ndim() != 4 || src.shape(0) != 1 || src.shape(1) != pool.shape(1) ||
        src.shape(3) != pool.shape(3)) {
      os << "must have shape [1, " << pool.shape(1) << ", T, " << pool.shape(3)
         << "] to match its pool " << shape_str(pool.shape()) << ", got "
         << shape_str(src.shape()) << ".";
      fail(os.str());
    }
    if (src.dtype() != pool.dtype()) {
      os << "has dtype " << src.dtype() << " but its pool has dtype "
         << pool.dtype() << ".";
      fail(os.str());
    }
  }

  auto flat = flatten_ids(block_ids, table, true, op, stream);
  for (size_t i = 0; i < flat.entries.size(); ++i) {
    auto& e = flat.entries[i];
    const auto& pool = table.unique[e.pool];
    int64_t block_tokens = pool.shape(2);
    int64_t first = offsets.empty() ? 0 : offsets[i];
    int64_t tokens = sources[i].shape(2);
    if (first < 0 || first >= block_tokens) {
      std::ostringstream os;
      os << op << ": offsets[" << i << "] = " << first
         << " must be in [0, " << block_tokens << ").";
      fail(os.str());
    }
    if (first + tokens > e.num_ids * block_tokens) {
      std::ostringstream os;
      os << op << ": sources[" << i << "] has " << tokens << " tokens";
      if (first) {
        os << " starting at offset " << first;
      }
      os << ", more than its " << e.num_ids << " blocks of " << block_tokens
         << " tokens hold.";
      fail(os.str());
    }
    e.tokens = tokens;
    e.first_token = first;
  }

  // One single-output node per distinct pool, sharing the flat id array.
  std::vector<mx::array> updated;
  for (size_t p = 0; p < table.unique.size(); ++p) {
    const auto& pool = table.unique[p];
    std::vector<BlockEntry> entries;
    std::vector<mx::array> inputs{pool, flat.ids[0]};
    for (size_t i = 0; i < flat.entries.size(); ++i) {
      if (flat.entries[i].pool == static_cast<int>(p)) {
        entries.push_back(flat.entries[i]);
        entries.back().pool = 0;  // this node's only pool input
        inputs.push_back(sources[i]);
      }
    }
    updated.emplace_back(
        pool.shape(), pool.dtype(),
        std::make_shared<ScatterBlocks>(stream, std::move(entries)),
        std::move(inputs));
  }
  table.unique.clear();  // the graph holds the only reference we keep

  std::vector<mx::array> per_entry;
  per_entry.reserve(pools.size());
  for (int index : table.index_of_entry) {
    per_entry.push_back(updated[index]);
  }
  return per_entry;
}

}  // namespace blockpool
