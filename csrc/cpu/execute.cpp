#include "cpu/execute.h"

#include <stdexcept>
#include <string>

#include "block_index.h"
#include "cpu/parallel.h"
#include "mlx/allocator.h"

namespace blockpool::cpu {

namespace bi = blockpool_index;

void run_copy_plan(const CopyPlan& plan, const std::vector<char*>& base) {
  std::vector<Tile> tiles;
  for (const auto& phase : plan.phases) {
    tiles.clear();
    for (const auto& s : phase) {
      const int64_t isz = s.itemsize;
      // Heads whose rows follow each other in both buffers form one tile.
      bool merge = s.src_head_stride == s.rows * s.src_row_stride &&
                   s.dst_head_stride == s.rows * s.dst_row_stride;
      int64_t tiles_of_segment = merge ? 1 : s.heads;
      int64_t rows = merge ? s.heads * s.rows : s.rows;
      for (int64_t h = 0; h < tiles_of_segment; ++h) {
        const char* src =
            s.src < 0 ? nullptr
                      : base[s.src] + bi::segment_src_index(s, h, 0, 0) * isz;
        char* dst = base[s.dst] + bi::segment_dst_index(s, h, 0, 0) * isz;
        tiles.push_back({src, dst, rows, s.items, s.itemsize,
                         s.src_row_stride * isz, s.dst_row_stride * isz,
                         s.src_item_stride * isz, isz});
      }
    }
    copy_tiles(tiles);
  }
}

mx::cpu::CommandEncoder& encode_io(mx::Stream stream,
                                   const std::vector<mx::array>& inputs,
                                   std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
  }
  return encoder;
}

std::vector<char*> base_pointers(const std::vector<mx::array>& inputs,
                                 const std::vector<mx::array>& outputs) {
  std::vector<char*> base;
  base.reserve(inputs.size() + outputs.size());
  for (const auto& a : inputs) {
    base.push_back(const_cast<char*>(a.data<char>()));
  }
  for (const auto& a : outputs) {
    base.push_back(const_cast<char*>(a.data<char>()));
  }
  return base;
}

std::vector<IdSpan> traced_ids(const std::vector<BlockEntry>& entries,
                               const std::vector<mx::array>& inputs,
                               const char* op) {
  std::vector<IdSpan> traced(entries.size(), IdSpan{nullptr, 0});
  for (size_t i = 0; i < entries.size(); ++i) {
    int k = entries[i].ids;
    if (k < 0) {
      continue;
    }
    const auto& ids = inputs[k];
    // The op function made them contiguous int32; anything else is a bug.
    if (ids.dtype() != mx::int32 || !ids.flags().row_contiguous) {
      throw std::runtime_error(std::string(op) +
                               ": internal error: traced ids are not "
                               "contiguous int32.");
    }
    traced[i] = {ids.data<int32_t>(), static_cast<int64_t>(ids.size())};
  }
  return traced;
}

}  // namespace blockpool::cpu
