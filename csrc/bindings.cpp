// The Python module blockpool._ext: bindings only, no logic.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <sstream>

#include "attention_ops.h"
#include "block_ops.h"
#include "cpu/parallel.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

// block_ids[i]: an mx.array of integers, or any sequence of ints (a list,
// a tuple, a numpy array).
std::vector<blockpool::BlockIds> to_block_ids(
    const std::vector<nb::object>& block_ids, const char* op) {
  std::vector<blockpool::BlockIds> out(block_ids.size());
  for (size_t i = 0; i < block_ids.size(); ++i) {
    const auto& obj = block_ids[i];
    if (nb::isinstance<mx::array>(obj)) {
      out[i].device = nb::cast<mx::array>(obj);
    } else if (!nb::try_cast(obj, out[i].host)) {
      std::ostringstream os;
      os << op << ": block_ids[" << i << "] must be a list of ints or an "
         << "integer mx.array, got " << nb::type_name(obj.type()).c_str()
         << ".";
      throw nb::value_error(os.str().c_str());
    }
  }
  return out;
}

using Planes = std::tuple<mx::array, mx::array, mx::array>;

std::vector<blockpool::QuantizedBlock> to_quantized(
    const std::optional<std::vector<Planes>>& blocks) {
  std::vector<blockpool::QuantizedBlock> out;
  for (const auto& [packed, scales, biases] : blocks.value_or(std::vector<Planes>{})) {
    out.push_back({packed, scales, biases});
  }
  return out;
}

using Write =
    std::tuple<int, std::optional<mx::array>, int64_t, int64_t, int64_t, int64_t>;

}  // namespace

// What every stub signature and docstring repeats.
#define BP_ARRAYS "collections.abc.Sequence[mlx.core.array]"
#define BP_NESTED "collections.abc.Sequence[collections.abc.Sequence[mlx.core.array]]"
#define BP_IDS \
  "block_ids: collections.abc.Sequence[collections.abc.Sequence[int] | mlx.core.array]"
#define BP_QUANT "group_size: int = 64, bits: int = 4"
#define BP_STREAM "stream: mlx.core.Stream | mlx.core.Device | None = None"
#define BP_ARRAY_LIST "list[mlx.core.array]"
#define BP_DOC(op)                                                        \
  "The native " op ": validates, then builds the graph node.\n\nUse "     \
  "blockpool.ops." op ", which documents the arguments, results and\n"    \
  "errors, and picks the backend for the device."

NB_MODULE(_ext, m) {
  m.doc() = "Native block gather/scatter primitives for MLX KV caches.";
  // Registers mx.array and friends in the shared `mlx` domain, so this
  // module can be imported on its own.
  nb::module_::import_("mlx.core");

  // Bad input throws std::invalid_argument, which nanobind raises as
  // ValueError; blockpool.ops re-raises it as InvalidRequestError.

  // How the Metal kernels fared in this build (see CMakeLists.txt).
#ifdef BLOCKPOOL_METAL
  m.attr("metal_kernels_built") = true;
#else
  m.attr("metal_kernels_built") = false;
#endif
#ifdef BLOCKPOOL_METAL_STATUS
  m.attr("metal_build_status") = BLOCKPOOL_METAL_STATUS;
#else
  m.attr("metal_build_status") = "unknown";
#endif
  m.def("num_copy_threads", &blockpool::cpu::num_copy_threads,
        "Threads the CPU kernels use (BLOCKPOOL_NUM_THREADS, else the "
        "hardware threads, at most 8).");

  m.def(
      "gather_blocks",
      [](const std::vector<mx::array>& pools,
         const std::vector<nb::object>& block_ids, mx::StreamOrDevice s) {
        return blockpool::gather_blocks(
            pools, to_block_ids(block_ids, "gather_blocks"), s);
      },
      "pools"_a, "block_ids"_a, nb::kw_only(), "stream"_a = nb::none(),
      nb::sig("def gather_blocks(pools: " BP_ARRAYS ", " BP_IDS
              ", *, " BP_STREAM ") -> " BP_ARRAY_LIST),
      BP_DOC("gather_blocks"));

  m.def(
      "gather_dequantize_blocks",
      [](const std::vector<mx::array>& packed,
         const std::vector<mx::array>& scales,
         const std::vector<mx::array>& biases,
         const std::vector<nb::object>& block_ids, int group_size, int bits,
         mx::StreamOrDevice s) {
        return blockpool::gather_dequantize_blocks(
            packed, scales, biases,
            to_block_ids(block_ids, "gather_dequantize_blocks"), group_size,
            bits, s);
      },
      "packed"_a, "scales"_a, "biases"_a, "block_ids"_a, nb::kw_only(),
      "group_size"_a = 64, "bits"_a = 4, "stream"_a = nb::none(),
      nb::sig("def gather_dequantize_blocks(packed: " BP_ARRAYS
              ", scales: " BP_ARRAYS ", biases: " BP_ARRAYS ", " BP_IDS
              ", *, " BP_QUANT ", " BP_STREAM ") -> " BP_ARRAY_LIST),
      BP_DOC("gather_dequantize_blocks"));

  m.def(
      "scatter_blocks",
      [](const std::vector<mx::array>& pools,
         const std::vector<nb::object>& block_ids,
         const std::vector<mx::array>& sources,
         const std::optional<std::vector<int64_t>>& offsets,
         mx::StreamOrDevice s) {
        return blockpool::scatter_blocks(
            pools, to_block_ids(block_ids, "scatter_blocks"), sources,
            offsets.value_or(std::vector<int64_t>{}), s);
      },
      "pools"_a, "block_ids"_a, "sources"_a, "offsets"_a = nb::none(),
      nb::kw_only(), "stream"_a = nb::none(),
      nb::sig("def scatter_blocks(pools: " BP_ARRAYS ", " BP_IDS
              ", sources: " BP_ARRAYS
              ", offsets: collections.abc.Sequence[int] | None = None"
              ", *, " BP_STREAM ") -> " BP_ARRAY_LIST),
      BP_DOC("scatter_blocks"));

  m.def(
      "concat_blocks",
      [](const std::vector<std::vector<mx::array>>& blocks,
         mx::StreamOrDevice s) { return blockpool::concat_blocks(blocks, s); },
      "blocks"_a, nb::kw_only(), "stream"_a = nb::none(),
      nb::sig("def concat_blocks(blocks: " BP_NESTED ", *, " BP_STREAM
              ") -> " BP_ARRAY_LIST),
      BP_DOC("concat_blocks"));

  m.def(
      "concat_dequantize_blocks",
      [](const std::vector<std::vector<mx::array>>& packed,
         const std::vector<std::vector<mx::array>>& scales,
         const std::vector<std::vector<mx::array>>& biases, int group_size,
         int bits, mx::StreamOrDevice s) {
        return blockpool::concat_dequantize_blocks(packed, scales, biases,
                                                   group_size, bits, s);
      },
      "packed"_a, "scales"_a, "biases"_a, nb::kw_only(), "group_size"_a = 64,
      "bits"_a = 4, "stream"_a = nb::none(),
      nb::sig("def concat_dequantize_blocks(packed: " BP_NESTED
              ", scales: " BP_NESTED ", biases: " BP_NESTED ", *, " BP_QUANT
              ", " BP_STREAM ") -> " BP_ARRAY_LIST),
      BP_DOC("concat_dequantize_blocks"));

  m.def(
      "split_blocks",
      [](const std::vector<mx::array>& sources,
         const std::vector<int64_t>& offsets,
         const std::vector<std::optional<mx::array>>& heads,
         int64_t block_tokens, mx::StreamOrDevice s) {
        return blockpool::split_blocks(sources, offsets, heads, block_tokens,
                                       s);
      },
      "sources"_a, "offsets"_a, "heads"_a, nb::kw_only(),
      "block_tokens"_a = 256, "stream"_a = nb::none(),
      nb::sig("def split_blocks(sources: " BP_ARRAYS
              ", offsets: collections.abc.Sequence[int]"
              ", heads: collections.abc.Sequence[mlx.core.array | None]"
              ", *, block_tokens: int = 256, " BP_STREAM
              ") -> list[list[mlx.core.array]]"),
      BP_DOC("split_blocks"));

  m.def(
      "paged_attention",
      [](const mx::array& queries, const std::vector<mx::array>& key_blocks,
         const std::vector<mx::array>& value_blocks,
         const std::vector<std::vector<int32_t>>& block_tables,
         const std::vector<int32_t>& context_lengths,
         const std::vector<int32_t>& query_starts, float scale, int64_t window,
         float softcap, const std::optional<mx::array>& sinks,
         const std::optional<std::vector<int32_t>>& ring_bases,
         const std::optional<std::vector<Planes>>& quantized_keys,
         const std::optional<std::vector<Planes>>& quantized_values,
         int group_size, int bits, mx::StreamOrDevice s) {
        blockpool::PagedAttentionOptions options;
        options.scale = scale;
        options.window = window;
        options.softcap = softcap;
        options.sinks = sinks;
        options.ring_bases = ring_bases.value_or(std::vector<int32_t>{});
        options.group_size = group_size;
        options.bits = bits;
        return blockpool::paged_attention(
            queries, key_blocks, value_blocks, to_quantized(quantized_keys),
            to_quantized(quantized_values), block_tables, context_lengths,
            query_starts, options, s);
      },
      "queries"_a, "key_blocks"_a, "value_blocks"_a, "block_tables"_a,
      "context_lengths"_a, "query_starts"_a, nb::kw_only(), "scale"_a,
      "window"_a = 0, "softcap"_a = 0.0f, "sinks"_a = nb::none(),
      "ring_bases"_a = nb::none(), "quantized_keys"_a = nb::none(),
      "quantized_values"_a = nb::none(), "group_size"_a = 64, "bits"_a = 0,
      "stream"_a = nb::none(),
      nb::sig("def paged_attention(queries: mlx.core.array, key_blocks: " BP_ARRAYS
              ", value_blocks: " BP_ARRAYS
              ", block_tables: collections.abc.Sequence[collections.abc.Sequence[int]]"
              ", context_lengths: collections.abc.Sequence[int]"
              ", query_starts: collections.abc.Sequence[int], *, scale: float"
              ", window: int = 0, softcap: float = 0.0"
              ", sinks: mlx.core.array | None = None"
              ", ring_bases: collections.abc.Sequence[int] | None = None"
              ", quantized_keys: collections.abc.Sequence[tuple[mlx.core.array, mlx.core.array, mlx.core.array]] | None = None"
              ", quantized_values: collections.abc.Sequence[tuple[mlx.core.array, mlx.core.array, mlx.core.array]] | None = None"
              ", group_size: int = 64, bits: int = 0, " BP_STREAM
              ") -> mlx.core.array"),
      BP_DOC("paged_attention"));

  m.def(
      "write_tokens",
      [](const std::vector<mx::array>& sources, const std::vector<Write>& writes,
         int64_t block_tokens, mx::StreamOrDevice s) {
        std::vector<blockpool::TokenWrite> out;
        out.reserve(writes.size());
        for (const auto& [source, dest, row, start, count, offset] : writes) {
          out.push_back({source, dest, row, start, count, offset});
        }
        return blockpool::write_tokens(sources, out, block_tokens, s);
      },
      "sources"_a, "writes"_a, nb::kw_only(), "block_tokens"_a = 256,
      "stream"_a = nb::none(),
      nb::sig("def write_tokens(sources: " BP_ARRAYS
              ", writes: collections.abc.Sequence[tuple[int, mlx.core.array | None, int, int, int, int]]"
              ", *, block_tokens: int = 256, " BP_STREAM ") -> " BP_ARRAY_LIST),
      BP_DOC("write_tokens"));

  m.def("copied_writes", &blockpool::copied_writes,
        "Token writes since the process started that copied their whole "
        "destination block instead of writing in place.");
}
