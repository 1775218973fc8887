// CPU evaluation of GatherBlocks and ScatterBlocks.
//
// The work runs as one task on the stream's CPU encoder: the block ids are
// only readable once earlier tasks have run, so the ids are checked and the
// copy list is built inside the task, and nothing is written unless every id
// is valid.
#include <sstream>
#include <stdexcept>

#include "block_ops.h"
#include "cpu/parallel.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace blockpool {

namespace {

// What the task needs of a pool or a source: where it is and how it is laid
// out. Captured by value; the encoder keeps the buffers alive.
struct View {
  const char* data;
  mx::Shape shape;
  mx::Strides strides;
  int itemsize;
};

View view_of(const mx::array& a) {
  return {a.data<char>(), a.shape(), a.strides(),
          static_cast<int>(a.itemsize())};
}

void check_ids(const int32_t* ids, const std::vector<BlockEntry>& entries,
               const std::vector<int64_t>& num_blocks, bool unique,
               const char* op) {
  std::vector<std::vector<char>> used(num_blocks.size());
  for (const auto& e : entries) {
    for (int64_t k = 0; k < e.num_ids; ++k) {
      int64_t id = ids[e.ids_start + k];
      int64_t n = num_blocks[e.pool];
      if (id < 0 || id >= n) {
        std::ostringstream os;
        os << op << ": block id " << id << " is out of range for a pool of "
           << n << " blocks.";
        throw std::out_of_range(os.str());
      }
      if (unique) {
        auto& seen = used[e.pool];
        if (seen.empty()) {
          seen.assign(n, 0);
        }
        if (seen[id]) {
          std::ostringstream os;
          os << op << ": block id " << id
             << " appears more than once in one scatter to the same pool.";
          throw std::invalid_argument(os.str());
        }
        seen[id] = 1;
      }
    }
  }
}

// One block's head `h`, tokens [row0, row0+rows) of the pool.
cpu::Tile pool_rows(const View& pool, int64_t block, int64_t h, int64_t row0,
                    int64_t rows, char* pool_data) {
  int64_t isz = pool.itemsize;
  int64_t off = (block * pool.strides[0] + h * pool.strides[1] +
                 row0 * pool.strides[2]) * isz;
  return {pool.data + off, pool_data ? pool_data + off : nullptr, rows,
          pool.shape[3], pool.itemsize, pool.strides[2] * isz,
          pool.strides[2] * isz, pool.strides[3] * isz, pool.strides[3] * isz};
}

}  // namespace

void GatherBlocks::eval_cpu(const std::vector<mx::array>& inputs,
                            std::vector<mx::array>& outputs) {
  int num_pools = static_cast<int>(inputs.size()) - 1;
  auto& encoder = mx::cpu::get_command_encoder(stream());

  std::vector<View> pools;
  std::vector<int64_t> num_blocks;
  for (int p = 0; p < num_pools; ++p) {
    encoder.set_input_array(inputs[p]);
    pools.push_back(view_of(inputs[p]));
    num_blocks.push_back(inputs[p].shape(0));
  }
  const auto& ids = inputs[num_pools];
  encoder.set_input_array(ids);

  std::vector<char*> dst;
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
    dst.push_back(out.data<char>());
  }

  encoder.dispatch([ids = ids.data<int32_t>(), pools = std::move(pools),
                    num_blocks = std::move(num_blocks),
                    dst = std::move(dst), entries = entries_]() {
    check_ids(ids, entries, num_blocks, false, "gather_blocks");
    std::vector<cpu::Tile> tiles;
    for (size_t i = 0; i < entries.size(); ++i) {
      const auto& e = entries[i];
      const auto& pool = pools[e.pool];
      int64_t heads = pool.shape[1], block = pool.shape[2], dim = pool.shape[3];
      int64_t out_tokens = e.num_ids * block;
      int64_t row_bytes = dim * pool.itemsize;
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t j = 0; j < e.num_ids; ++j) {
          auto t = pool_rows(pool, ids[e.ids_start + j], h, 0, block, nullptr);
          t.dst = dst[i] + ((h * out_tokens + j * block) * dim) * pool.itemsize;
          t.dst_row_stride = row_bytes;
          t.dst_elem_stride = pool.itemsize;
          tiles.push_back(t);
        }
      }
    }
    cpu::copy_tiles(tiles);
  });
}

void ScatterBlocks::eval_cpu(const std::vector<mx::array>& inputs,
                             mx::array& out) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  const auto& in = inputs[0];
  const auto& ids = inputs[1];
  encoder.set_input_array(in);
  encoder.set_input_array(ids);

  // The output takes over the input's buffer when nothing else references
  // the input; otherwise it starts as a full copy of it.
  bool donated = in.is_donatable() && in.flags().row_contiguous &&
                 in.data_size() == in.size();
  if (donated) {
    out.copy_shared_buffer(in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  encoder.set_output_array(out);

  std::vector<View> sources;
  for (size_t i = 2; i < inputs.size(); ++i) {
    encoder.set_input_array(inputs[i]);
    sources.push_back(view_of(inputs[i]));
  }

  encoder.dispatch([ids = ids.data<int32_t>(), in = view_of(in),
                    pool = view_of(out), donated,
                    sources = std::move(sources), entries = entries_]() {
    // Checked before the first write, so a bad id leaves the pool as it
    // was (a donated pool is the caller's old buffer, untouched).
    check_ids(ids, entries, {in.shape[0]}, true, "scatter_blocks");
    char* pool_data = const_cast<char*>(pool.data);

    std::vector<cpu::Tile> tiles;
    if (!donated) {
      if (in.strides == pool.strides) {
        int64_t rows = in.shape[0] * in.shape[1] * in.shape[2];
        int64_t row_bytes = in.shape[3] * in.itemsize;
        tiles.push_back({in.data, pool_data, rows, in.shape[3], in.itemsize,
                         row_bytes, row_bytes, in.itemsize, in.itemsize});
      } else {
        for (int64_t b = 0; b < in.shape[0]; ++b) {
          for (int64_t h = 0; h < in.shape[1]; ++h) {
            auto t = pool_rows(in, b, h, 0, in.shape[2], nullptr);
            auto o = pool_rows(pool, b, h, 0, pool.shape[2], pool_data);
            t.dst = o.dst;
            t.dst_row_stride = o.dst_row_stride;
            t.dst_elem_stride = o.dst_elem_stride;
            tiles.push_back(t);
          }
        }
      }
      cpu::copy_tiles(tiles);
      tiles.clear();
    }

    int64_t block = pool.shape[2];
    for (size_t i = 0; i < entries.size(); ++i) {
      const auto& e = entries[i];
      const auto& src = sources[i];
      int64_t isz = src.itemsize;
      // Source token t lands at position first_token + t of the entry.
      for (int64_t t0 = 0; t0 < e.tokens;) {
        int64_t pos = e.first_token + t0;
        int64_t j = pos / block, row = pos % block;
        int64_t rows = std::min(block - row, e.tokens - t0);
        for (int64_t h = 0; h < src.shape[1]; ++h) {
          auto t = pool_rows(pool, ids[e.ids_start + j], h, row, rows,
                             pool_data);
          t.src = src.data + (h * src.strides[1] + t0 * src.strides[2]) * isz;
          t.src_row_stride = src.strides[2] * isz;
          t.src_elem_stride = src.strides[3] * isz;
          tiles.push_back(t);
        }
        t0 += rows;
      }
    }
    cpu::copy_tiles(tiles);
  });
}

}  // namespace blockpool
