// The Python module blockpool._ext: bindings only, no logic.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <sstream>

#include "block_ops.h"

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

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "Native block gather/scatter primitives for MLX KV caches.";
  // Registers mx.array and friends in the shared `mlx` domain, so this
  // module can be imported on its own.
  nb::module_::import_("mlx.core");

  // Bad ids are reported as ValueError, like every other bad input.
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const std::out_of_range& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def(
      "gather_blocks",
      [](const std::vector<mx::array>& pools,
         const std::vector<nb::object>& block_ids, mx::StreamOrDevice s) {
        return blockpool::gather_blocks(
            pools, to_block_ids(block_ids, "gather_blocks"), s);
      },
      "pools"_a, "block_ids"_a, nb::kw_only(), "stream"_a = nb::none(),
      nb::sig("def gather_blocks(pools: collections.abc.Sequence[mlx.core.array], "
              "block_ids: collections.abc.Sequence[collections.abc.Sequence[int] | mlx.core.array], "
              "*, stream: mlx.core.Stream | mlx.core.Device | None = None) "
              "-> list[mlx.core.array]"),
      R"doc(Gather blocks of each pool into contiguous KV arrays.

Args:
    pools: Arrays of shape ``[num_blocks, H, B, D]``, any dtype. The same
        array may appear in several entries.
    block_ids: For each pool, the block indices to read, in order.
    stream: Stream or device to run on.

Returns:
    For each entry, an array ``[1, H, len(block_ids[i]) * B, D]`` holding
    block ``block_ids[i][j]`` at tokens ``j*B:(j+1)*B``.

Raises:
    ValueError: Ids out of range, a pool not of rank 4, or list lengths
        that differ.)doc");

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
      nb::sig("def gather_dequantize_blocks(packed: collections.abc.Sequence[mlx.core.array], "
              "scales: collections.abc.Sequence[mlx.core.array], "
              "biases: collections.abc.Sequence[mlx.core.array], "
              "block_ids: collections.abc.Sequence[collections.abc.Sequence[int] | mlx.core.array], "
              "*, group_size: int = 64, bits: int = 4, "
              "stream: mlx.core.Stream | mlx.core.Device | None = None) "
              "-> list[mlx.core.array]"),
      R"doc(Gather blocks of affine-quantized pools and dequantize them, in one pass.

The pools use ``mx.quantize``'s layout along the head dim: ``packed``
``[num_blocks, H, B, D * bits / 32]`` (uint32), ``scales`` and ``biases``
``[num_blocks, H, B, D / group_size]``. The result equals
``mx.dequantize`` of the gathered planes, bit for bit.

Args:
    packed: Packed pools, one per entry (the same pool may repeat).
    scales: The matching scales pools.
    biases: The matching biases pools.
    block_ids: For each entry, the block indices to read, in order.
    group_size: 32, 64 or 128, as given to ``mx.quantize``.
    bits: 2, 4 or 8, as given to ``mx.quantize``.
    stream: Stream or device to run on.

Returns:
    For each entry, ``[1, H, len(block_ids[i]) * B, D]`` in the scales' dtype.

Raises:
    ValueError: Ids out of range, shapes or dtypes that do not match, bits or
        group_size not supported, or list lengths that differ.)doc");

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
      nb::sig("def scatter_blocks(pools: collections.abc.Sequence[mlx.core.array], "
              "block_ids: collections.abc.Sequence[collections.abc.Sequence[int] | mlx.core.array], "
              "sources: collections.abc.Sequence[mlx.core.array], "
              "offsets: collections.abc.Sequence[int] | None = None, "
              "*, stream: mlx.core.Stream | mlx.core.Device | None = None) "
              "-> list[mlx.core.array]"),
      R"doc(Write contiguous KV arrays back into blocks of each pool.

Source token ``t`` of entry ``i`` goes to position ``offsets[i] + t`` of the
entry's blocks: block ``block_ids[i][(offsets[i] + t) // B]``. Positions of
a block that no source token reaches keep their old contents.

Entries that pass the same pool array write into one updated copy of it, and
each of those entries gets that same array back. When nothing else
references a pool (no other Python name, list or graph node), its buffer is
reused and only the written bytes are touched; otherwise the pool is copied
first and the original array is left unchanged.

Args:
    pools: Arrays of shape ``[num_blocks, H, B, D]``.
    block_ids: For each pool, the block indices to write. No id may repeat
        within one pool in one call.
    sources: Arrays ``[1, H, T, D]`` of the pool's dtype.
    offsets: Position of source token 0 inside the first block, in
        ``[0, B)``; zero for every entry when omitted.
    stream: Stream or device to run on.

Returns:
    The updated pool for each entry.

Raises:
    ValueError: Ids out of range or repeated, shape, dtype or rank
        mismatch, more tokens than the blocks hold, or list lengths that
        differ.)doc");
}
