#include "block_ids.h"

#include <limits>
#include <sstream>
#include <stdexcept>

#include "validation.h"

namespace blockpool {

namespace {

// Traced ids as int32 without wrapping: anything past INT32_MAX becomes
// INT32_MAX, which no pool reaches, so the kernel still rejects it.
mx::array traced_as_int32(const mx::array& ids, mx::Stream stream) {
  auto dtype = ids.dtype();
  mx::array narrowed = ids;
  if (dtype == mx::int64) {
    narrowed = mx::clip(ids, mx::array(int64_t{-1}, mx::int64),
                        mx::array(int64_t{INT32_MAX}, mx::int64), stream);
  } else if (dtype == mx::uint32 || dtype == mx::uint64) {
    narrowed = mx::minimum(ids, mx::array(int64_t{INT32_MAX}, dtype), stream);
  }
  return mx::contiguous(mx::astype(narrowed, mx::int32, stream), false,
                        stream);
}

// A concrete id array's values, whatever its layout (strided, broadcast,
// transposed) and integer dtype: made contiguous int64 and read by stride.
std::vector<int64_t> read_ids(const mx::array& ids, mx::Stream stream) {
  auto wide = mx::contiguous(mx::astype(ids, mx::int64, stream), false, stream);
  wide.eval();
  std::vector<int64_t> values(wide.size());
  if (!values.empty()) {
    const int64_t* p = wide.data<int64_t>();
    int64_t step = wide.strides(0);
    for (size_t k = 0; k < values.size(); ++k) {
      values[k] = p[k * step];
    }
  }
  return values;
}

}  // namespace

void CollectedIds::apply(std::vector<BlockEntry>& entries,
                         int first_input) const {
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& r = runs[i];
    entries[i].ids = r.traced < 0 ? -1 : first_input + r.traced;
    entries[i].ids_start = r.start;
    entries[i].num_ids = r.count;
  }
}

CollectedIds collect_ids(const std::vector<BlockIds>& block_ids,
                         const std::vector<int64_t>& num_blocks,
                         const std::vector<int>& pool_of, bool unique_per_pool,
                         const char* op, mx::Stream stream) {
  CollectedIds out;
  std::vector<std::vector<char>> used;

  for (size_t i = 0; i < block_ids.size(); ++i) {
    const auto& entry = block_ids[i];
    std::vector<int64_t> array_values;
    const std::vector<int64_t>* values = &entry.host;
    if (entry.device) {
      const auto& ids = *entry.device;
      if (!mx::issubdtype(ids.dtype(), mx::integer)) {
        std::ostringstream os;
        os << where(op, "block_ids", i) << " must be an integer array, got "
           << ids.dtype() << ".";
        fail(os.str());
      }
      if (ids.ndim() != 1) {
        fail(where(op, "block_ids", i) + " must be 1-D, got shape " +
             shape_str(ids.shape()) + ".");
      }
      if (ids.is_tracer()) {
        if (on_gpu(stream)) {
          fail(where(op, "block_ids", i) +
               " is traced by mx.compile. On a GPU stream the ids must be "
               "known when the graph is built (a list, or an array that is "
               "not an argument of the compiled function), so that they are "
               "checked before the kernel runs; or use a CPU stream.");
        }
        out.runs.push_back({static_cast<int>(out.traced.size()), 0,
                            static_cast<int64_t>(ids.size())});
        out.traced.push_back(traced_as_int32(ids, stream));
        continue;
      }
      array_values = read_ids(ids, stream);
      values = &array_values;
    }

    int64_t n = num_blocks[i];
    int pool = pool_of[i];
    if (unique_per_pool && pool >= static_cast<int>(used.size())) {
      used.resize(pool + 1);
    }
    CollectedIds::Run run{-1, static_cast<int64_t>(out.host.size()),
                          static_cast<int64_t>(values->size())};
    for (int64_t id : *values) {
      auto problem =
          id_problem(id, n, i, unique_per_pool ? &used[pool] : nullptr, op);
      if (!problem.empty()) {
        fail(problem);
      }
      out.host.push_back(static_cast<int32_t>(id));
    }
    out.runs.push_back(run);
  }
  return out;
}

}  // namespace blockpool
