// Copy plans for every primitive, and the checks evaluation repeats.
#include "plans.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <string>

#include "mlx/allocator.h"
#include "validation.h"

namespace blockpool {

namespace bi = blockpool_index;

namespace {

[[noreturn]] void eval_fail(const std::string& msg) {
  throw std::runtime_error(msg);
}

// A pool [N, H, B, D] as a 4-D view.
bi::Strides4 pool_strides(const Layout& l) {
  return {l.strides[0], l.strides[1], l.strides[2], l.strides[3]};
}

// A block [H, B, D] as a 4-D view with one block.
bi::Strides4 block_strides(const Layout& l) {
  return {0, l.strides[0], l.strides[1], l.strides[2]};
}

// A [1, H, T, D] source as a 4-D view.
bi::Strides4 source_strides(const Layout& l) {
  return {0, l.strides[1], l.strides[2], l.strides[3]};
}

// Copies heads x rows x items from `from` at `src_offset` into a contiguous
// destination whose rows are `dim` items apart and heads `head_stride`.
CopySegment copy_segment(int src, bi::Strides4 from, int64_t src_offset,
                         int dst, int64_t dst_offset, int64_t dst_head_stride,
                         int64_t dim, int64_t heads, int64_t rows,
                         int itemsize) {
  CopySegment s{};
  s.src_offset = src_offset;
  s.dst_offset = dst_offset;
  s.src_head_stride = from.head;
  s.src_row_stride = from.token;
  s.src_item_stride = from.item;
  s.dst_head_stride = dst_head_stride;
  s.dst_row_stride = dim;
  s.heads = heads;
  s.rows = rows;
  s.items = dim;
  s.src = src;
  s.dst = dst;
  s.itemsize = itemsize;
  return s;
}

CopySegment zero_segment(int dst, int64_t dst_offset, int64_t dst_head_stride,
                         int64_t dim, int64_t heads, int64_t rows,
                         int itemsize) {
  CopySegment s = copy_segment(-1, {0, 0, 0, 0}, 0, dst, dst_offset,
                               dst_head_stride, dim, heads, rows, itemsize);
  return s;
}

void expect_shape(const Layout& l, const mx::Shape& want, const char* op,
                  const char* what, size_t entry) {
  if (l.shape != want) {
    std::ostringstream os;
    os << op << ": " << what << " of entry " << entry << " has shape "
       << shape_str(l.shape) << " at evaluation, expected " << shape_str(want)
       << ".";
    eval_fail(os.str());
  }
}

// The quantized planes of one block or pool agree with each other and with
// the output (shapes may have changed under a shapeless compile).
void check_quantized(const Layout& packed, const Layout& scales,
                     const Layout& biases, const Layout& out, int group_size,
                     int bits, const char* op, size_t entry) {
  size_t rank = packed.shape.size();
  mx::Shape groups = packed.shape;
  int64_t dim = int64_t(packed.shape[rank - 1]) * bi::values_per_word(bits);
  if (packed.dtype != mx::uint32 || dim % group_size != 0) {
    std::ostringstream os;
    os << op << ": the packed plane of entry " << entry
       << " does not fit bits=" << bits << ", group_size=" << group_size
       << " at evaluation.";
    eval_fail(os.str());
  }
  groups[rank - 1] = static_cast<int>(dim / group_size);
  expect_shape(scales, groups, op, "the scales", entry);
  expect_shape(biases, groups, op, "the biases", entry);
  if (scales.dtype != out.dtype || biases.dtype != out.dtype) {
    std::ostringstream os;
    os << op << ": the scales and biases of entry " << entry
       << " changed dtype since the graph was built.";
    eval_fail(os.str());
  }
}

DequantSegment dequant_segment(int packed, const Layout& pl, int scales,
                               const Layout& sl, int biases, const Layout& bl,
                               bool pooled, int64_t block, int out,
                               int64_t out_offset, int64_t out_head_stride,
                               int64_t dim) {
  auto view = [&](const Layout& l) {
    return pooled ? pool_strides(l) : block_strides(l);
  };
  auto ps = view(pl), ss = view(sl), bs = view(bl);
  DequantSegment d{};
  d.packed_offset = bi::view_offset(ps, block, 0, 0, 0);
  d.scales_offset = bi::view_offset(ss, block, 0, 0, 0);
  d.biases_offset = bi::view_offset(bs, block, 0, 0, 0);
  d.out_offset = out_offset;
  d.packed_head_stride = ps.head;
  d.packed_row_stride = ps.token;
  d.packed_word_stride = ps.item;
  d.scales_head_stride = ss.head;
  d.scales_row_stride = ss.token;
  d.scales_group_stride = ss.item;
  d.biases_head_stride = bs.head;
  d.biases_row_stride = bs.token;
  d.biases_group_stride = bs.item;
  d.out_head_stride = out_head_stride;
  d.out_row_stride = dim;
  size_t rank = pl.shape.size();
  d.heads = pl.shape[rank - 3];
  d.rows = pl.shape[rank - 2];
  d.dim = dim;
  d.packed = packed;
  d.scales = scales;
  d.biases = biases;
  d.out = out;
  return d;
}

}  // namespace

std::vector<Layout> layouts_of(const std::vector<mx::array>& inputs,
                               const std::vector<mx::array>& outputs) {
  std::vector<Layout> slots;
  slots.reserve(inputs.size() + outputs.size());
  for (const auto* list : {&inputs, &outputs}) {
    for (const auto& a : *list) {
      slots.push_back(
          {a.shape(), a.strides(), a.dtype(), static_cast<int>(a.itemsize())});
    }
  }
  return slots;
}

std::vector<IdSpan> id_spans(const std::vector<BlockEntry>& entries,
                             const std::vector<int32_t>& host,
                             const std::vector<IdSpan>& traced) {
  std::vector<IdSpan> spans;
  spans.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    spans.push_back(e.ids >= 0 ? traced[i]
                               : IdSpan{host.data() + e.ids_start, e.num_ids});
  }
  return spans;
}

void check_ids_at_eval(const std::vector<Layout>& slots,
                       const std::vector<BlockEntry>& entries,
                       const std::vector<IdSpan>& ids, bool unique,
                       const char* op) {
  std::vector<std::vector<char>> used(slots.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    for (int64_t k = 0; k < ids[i].count; ++k) {
      auto problem = id_problem(ids[i].data[k], slots[e.pool].shape[0], i,
                                unique ? &used[e.pool] : nullptr, op);
      if (!problem.empty()) {
        eval_fail(problem);
      }
    }
  }
}

CopyPlan plan_gather(const std::vector<Layout>& slots, int num_inputs,
                     const std::vector<BlockEntry>& entries,
                     const std::vector<IdSpan>& ids) {
  check_ids_at_eval(slots, entries, ids, false, "gather_blocks");
  CopyPlan plan;
  auto& segments = plan.phases.emplace_back();
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& pool = slots[entries[i].pool];
    int out = num_inputs + static_cast<int>(i);
    int64_t heads = pool.shape[1], block = pool.shape[2], dim = pool.shape[3];
    int64_t n = ids[i].count;
    expect_shape(slots[out], {1, pool.shape[1], int(n * block), pool.shape[3]},
                 "gather_blocks", "the output", i);
    for (int64_t j = 0; j < n; ++j) {
      segments.push_back(copy_segment(
          entries[i].pool, pool_strides(pool),
          bi::view_offset(pool_strides(pool), ids[i].data[j], 0, 0, 0), out,
          bi::joined_offset(0, j, 0, 0, n, block, dim),
          bi::joined_offset(1, 0, 0, 0, n, block, dim), dim, heads, block,
          pool.itemsize));
    }
  }
  return plan;
}

CopyPlan plan_scatter(const std::vector<Layout>& slots, int num_inputs,
                      const std::vector<BlockEntry>& entries,
                      const std::vector<IdSpan>& ids, bool donated) {
  const char* op = "scatter_blocks";
  const auto& pool = slots[0];
  int out = num_inputs;
  int64_t heads = pool.shape[1], block = pool.shape[2], dim = pool.shape[3];
  // The output is contiguous: a reused pool buffer only when it was.
  bi::Strides4 dst{heads * block * dim, block * dim, dim, 1};

  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    const auto& src = slots[e.source];
    int64_t tokens = src.shape.size() == 4 ? src.shape[2] : -1;
    expect_shape(src, {1, pool.shape[1], int(tokens), pool.shape[3]}, op,
                 "the source", i);
    if (src.dtype != pool.dtype) {
      eval_fail(std::string(op) + ": a source's dtype differs from its pool's.");
    }
    if (e.first_token < 0 || e.first_token >= block ||
        e.first_token + tokens > ids[i].count * block) {
      std::ostringstream os;
      os << op << ": source " << i << " (" << tokens << " tokens at offset "
         << e.first_token << ") does not fit its " << ids[i].count
         << " blocks of " << block << " tokens at evaluation.";
      eval_fail(os.str());
    }
  }
  check_ids_at_eval(slots, entries, ids, true, op);

  CopyPlan plan;
  if (!donated) {
    auto& copy = plan.phases.emplace_back();
    auto from = pool_strides(pool);
    if (from.block == heads * from.head) {  // blocks and heads merge
      copy.push_back(copy_segment(0, from, 0, out, 0, dst.head, dim,
                                  pool.shape[0] * heads, block,
                                  pool.itemsize));
    } else {
      for (int64_t b = 0; b < pool.shape[0]; ++b) {
        copy.push_back(copy_segment(0, from, bi::view_offset(from, b, 0, 0, 0),
                                    out, bi::view_offset(dst, b, 0, 0, 0),
                                    dst.head, dim, heads, block,
                                    pool.itemsize));
      }
    }
  }
  auto& writes = plan.phases.emplace_back();
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    const auto& src = slots[e.source];
    auto from = source_strides(src);
    int64_t tokens = src.shape[2];
    // Source token t lands at position first_token + t of the entry.
    for (int64_t t = 0; t < tokens;) {
      int64_t position = e.first_token + t;
      auto at = bi::block_position(position, block);
      int64_t rows = bi::rows_in_block(position, tokens - t, block);
      writes.push_back(copy_segment(
          e.source, from, bi::view_offset(from, 0, 0, t, 0), out,
          bi::view_offset(dst, ids[i].data[at.slot], 0, at.row, 0), dst.head,
          dim, heads, rows, pool.itemsize));
      t += rows;
    }
  }
  return plan;
}

std::vector<DequantSegment> plan_gather_dequantize(
    const std::vector<Layout>& slots, int num_inputs,
    const std::vector<BlockEntry>& entries, const std::vector<IdSpan>& ids,
    int group_size, int bits) {
  const char* op = "gather_dequantize_blocks";
  check_ids_at_eval(slots, entries, ids, false, op);
  std::vector<DequantSegment> segments;
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    const auto &pl = slots[e.pool], &sl = slots[e.scales], &bl = slots[e.biases];
    int out = num_inputs + static_cast<int>(i);
    check_quantized(pl, sl, bl, slots[out], group_size, bits, op, i);
    int64_t block = pl.shape[2];
    int64_t dim = slots[out].shape[3], n = ids[i].count;
    expect_shape(slots[out], {1, pl.shape[1], int(n * block), int(dim)}, op,
                 "the output", i);
    for (int64_t j = 0; j < n; ++j) {
      segments.push_back(dequant_segment(
          e.pool, pl, e.scales, sl, e.biases, bl, true, ids[i].data[j], out,
          bi::joined_offset(0, j, 0, 0, n, block, dim),
          bi::joined_offset(1, 0, 0, 0, n, block, dim), dim));
    }
  }
  return segments;
}

CopyPlan plan_concat(const std::vector<Layout>& slots, int num_inputs,
                     const std::vector<JoinEntry>& entries,
                     const std::vector<int>& block_inputs) {
  const char* op = "concat_blocks";
  CopyPlan plan;
  auto& segments = plan.phases.emplace_back();
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    const auto& first = slots[block_inputs[e.start]];
    int out = num_inputs + static_cast<int>(i);
    for (int64_t j = 0; j < e.count; ++j) {
      const auto& b = slots[block_inputs[e.start + j]];
      expect_shape(b, first.shape, op, "a block", i);
      if (b.dtype != first.dtype) {
        eval_fail(std::string(op) + ": blocks of one entry differ in dtype.");
      }
    }
    int64_t heads = first.shape[0], block = first.shape[1], dim = first.shape[2];
    int64_t n = e.count;
    expect_shape(slots[out], {1, first.shape[0], int(n * block), first.shape[2]},
                 op, "the output", i);
    for (int64_t j = 0; j < n; ++j) {
      int slot = block_inputs[e.start + j];
      segments.push_back(copy_segment(
          slot, block_strides(slots[slot]), 0, out,
          bi::joined_offset(0, j, 0, 0, n, block, dim),
          bi::joined_offset(1, 0, 0, 0, n, block, dim), dim, heads, block,
          first.itemsize));
    }
  }
  return plan;
}

std::vector<DequantSegment> plan_concat_dequantize(
    const std::vector<Layout>& slots, int num_inputs,
    const std::vector<JoinEntry>& entries,
    const std::vector<int>& block_inputs, int group_size, int bits) {
  const char* op = "concat_dequantize_blocks";
  std::vector<DequantSegment> segments;
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    int out = num_inputs + static_cast<int>(i);
    const auto& first = slots[block_inputs[3 * e.start]];
    int64_t block = first.shape[1], n = e.count;
    int64_t dim = slots[out].shape[3];
    expect_shape(slots[out], {1, first.shape[0], int(n * block), int(dim)}, op,
                 "the output", i);
    for (int64_t j = 0; j < n; ++j) {
      int p = block_inputs[3 * (e.start + j)];
      int s = block_inputs[3 * (e.start + j) + 1];
      int b = block_inputs[3 * (e.start + j) + 2];
      expect_shape(slots[p], first.shape, op, "a packed block", i);
      check_quantized(slots[p], slots[s], slots[b], slots[out], group_size,
                      bits, op, i);
      segments.push_back(dequant_segment(
          p, slots[p], s, slots[s], b, slots[b], false, 0, out,
          bi::joined_offset(0, j, 0, 0, n, block, dim),
          bi::joined_offset(1, 0, 0, 0, n, block, dim), dim));
    }
  }
  return segments;
}

CopyPlan plan_write_tokens(const std::vector<Layout>& slots, int num_inputs,
                           const WriteTokensParams& params, bool donated) {
  const Layout& out = slots[num_inputs];
  const Layout& src = slots[0];
  int64_t heads = out.shape[0], rows = params.block_tokens, dim = out.shape[2];
  int64_t head_stride = rows * dim;
  CopyPlan plan;
  if (!donated) {
    plan.phases.push_back(
        {params.has_dest
             ? copy_segment(1, block_strides(slots[1]), 0, num_inputs, 0,
                            head_stride, dim, heads, rows, out.itemsize)
             : zero_segment(num_inputs, 0, head_stride, dim, heads, rows,
                            out.itemsize)});
  }
  int64_t src_offset = params.row * src.strides[0] +
                       params.source_start * src.strides[2];
  plan.phases.push_back({copy_segment(0, source_strides(src), src_offset,
                                      num_inputs, params.offset * dim,
                                      head_stride, dim, heads, params.count,
                                      out.itemsize)});
  return plan;
}

bool adopt_or_allocate(const mx::array* in, mx::array& out) {
  bool adopted = in != nullptr && in->is_donatable() &&
                 in->flags().row_contiguous && in->data_size() == in->size();
  if (adopted) {
    out.copy_shared_buffer(*in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  return adopted;
}

CopyPlan plan_split(const std::vector<Layout>& slots, int num_inputs,
                    const std::vector<SplitEntry>& entries,
                    int64_t block_tokens) {
  const char* op = "split_blocks";
  CopyPlan plan;
  auto& segments = plan.phases.emplace_back();
  int out = num_inputs;
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    const auto& src = slots[e.source];
    int64_t heads = src.shape[1], tokens = src.shape[2], dim = src.shape[3];
    int64_t B = block_tokens;
    if (bi::blocks_for(e.offset, tokens, B) != e.blocks) {
      eval_fail(std::string(op) + ": a source's token count changed since "
                                  "the graph was built.");
    }
    if (e.head >= 0) {
      expect_shape(slots[e.head], {int(heads), int(B), int(dim)}, op,
                   "the head block", i);
      if (slots[e.head].dtype != src.dtype) {
        eval_fail(std::string(op) + ": a head block's dtype differs from its "
                                    "source's.");
      }
    }
    auto from = source_strides(src);
    bi::Strides4 block_dst{0, B * dim, dim, 1};
    for (int64_t k = 0; k < e.blocks; ++k, ++out) {
      int64_t start = k * B, end = start + B;  // positions of block k
      int64_t copied_from = std::max(start, e.offset);
      int64_t copied_to = std::min(end, e.offset + tokens);
      // Before the source: the head block's rows, or zeros.
      if (start < e.offset) {
        int64_t rows = e.offset - start;  // only in block 0
        if (e.head >= 0) {
          segments.push_back(copy_segment(e.head, block_strides(slots[e.head]),
                                          0, out, 0, block_dst.head, dim,
                                          heads, rows, src.itemsize));
        } else {
          segments.push_back(zero_segment(out, 0, block_dst.head, dim, heads,
                                          rows, src.itemsize));
        }
      }
      if (copied_from < copied_to) {
        int64_t t = copied_from - e.offset;  // source token
        segments.push_back(copy_segment(
            e.source, from, bi::view_offset(from, 0, 0, t, 0), out,
            bi::view_offset(block_dst, 0, 0, copied_from - start, 0),
            block_dst.head, dim, heads, copied_to - copied_from,
            src.itemsize));
      }
      // After the source: zeros.
      int64_t tail = std::max(copied_to, std::max(start, e.offset));
      if (tail < end) {
        segments.push_back(zero_segment(
            out, bi::view_offset(block_dst, 0, 0, tail - start, 0),
            block_dst.head, dim, heads, end - tail, src.itemsize));
      }
    }
  }
  return plan;
}

}  // namespace blockpool
