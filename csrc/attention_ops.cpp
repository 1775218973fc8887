// The paged-attention op functions: every check that host values allow,
// then one graph node (paged_attention) or one node per write (write_tokens).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <sstream>

#include "attention_ops.h"
#include "block_index.h"
#include "validation.h"

namespace blockpool {

namespace {

std::atomic<int64_t> copied_write_count{0};

bool is_float(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16;
}

void check_block_shape(const mx::array& block, const mx::Shape& expected,
                       mx::Dtype dtype, const char* what, size_t i,
                       const char* op) {
  if (block.shape() != expected || block.dtype() != dtype) {
    std::ostringstream os;
    os << where(op, what, i) << " must be " << shape_str(expected) << " "
       << dtype << " (as the first key block and the queries), got "
       << shape_str(block.shape()) << " " << block.dtype() << ".";
    fail(os.str());
  }
}

// The quantized planes of one block: packed [H, B, dim*bits/32] uint32,
// scales and biases [H, B, dim/group] in `dtype`.
void check_quantized(const QuantizedBlock& q, int heads, int block_tokens,
                     int dim, mx::Dtype dtype, int group_size, int bits,
                     const char* what, size_t i, const char* op) {
  int per_word = blockpool_index::values_per_word(bits);
  mx::Shape packed{heads, block_tokens, dim / per_word};
  mx::Shape groups{heads, block_tokens, dim / group_size};
  if (dim % group_size != 0 || q.packed.shape() != packed ||
      q.packed.dtype() != mx::uint32 || q.scales.shape() != groups ||
      q.biases.shape() != groups || q.scales.dtype() != dtype ||
      q.biases.dtype() != dtype) {
    std::ostringstream os;
    os << where(op, what, i) << " must hold packed uint32 "
       << shape_str(packed) << " and scales and biases " << shape_str(groups)
       << " " << dtype << " (bits=" << bits << ", group_size=" << group_size
       << ", head dim " << dim << "), got packed "
       << shape_str(q.packed.shape()) << " " << q.packed.dtype()
       << ", scales " << shape_str(q.scales.shape()) << " " << q.scales.dtype()
       << ", biases " << shape_str(q.biases.shape()) << " "
       << q.biases.dtype() << ".";
    fail(os.str());
  }
}

// Every position a row's queries read must be in a block it holds.
void check_row_coverage(const std::vector<int32_t>& table, int64_t row,
                        int64_t length, int64_t start, int64_t queries,
                        int64_t window, int64_t block_tokens,
                        int64_t num_blocks, const char* op) {
  for (size_t j = 0; j < table.size(); ++j) {
    if (table[j] < -1 || table[j] >= num_blocks) {
      std::ostringstream os;
      os << op << ": block_tables[" << row << "][" << j << "] = " << table[j]
         << " is not a block index (-1 for none, or below " << num_blocks
         << ").";
      fail(os.str());
    }
  }
  if (length == 0 || queries == 0) {
    return;
  }
  int64_t hi = std::min(start + queries - 1, length - 1);
  int64_t lo = window > 0 ? std::max<int64_t>(0, start - window + 1) : 0;
  for (int64_t p = lo / block_tokens; p <= hi / block_tokens; ++p) {
    if (p >= static_cast<int64_t>(table.size()) || table[p] < 0) {
      std::ostringstream os;
      os << op << ": row " << row << " attends to positions " << lo << ".."
         << hi << " but its block table has no block for positions "
         << p * block_tokens << ".." << (p + 1) * block_tokens - 1 << ".";
      fail(os.str());
    }
  }
}

}  // namespace

void record_copied_write() {
  copied_write_count.fetch_add(1, std::memory_order_relaxed);
}

int64_t copied_writes() {
  return copied_write_count.load(std::memory_order_relaxed);
}

mx::array paged_attention(const mx::array& queries,
                          const std::vector<mx::array>& key_blocks,
                          const std::vector<mx::array>& value_blocks,
                          const std::vector<QuantizedBlock>& quantized_keys,
                          const std::vector<QuantizedBlock>& quantized_values,
                          const std::vector<std::vector<int32_t>>& block_tables,
                          const std::vector<int32_t>& context_lengths,
                          const std::vector<int32_t>& query_starts,
                          const PagedAttentionOptions& options,
                          mx::StreamOrDevice s) {
  const char* op = "paged_attention";
  if (queries.ndim() != 4 || !is_float(queries.dtype())) {
    std::ostringstream os;
    os << op << ": queries must be [B, Hq, N, D] float32, float16 or "
       << "bfloat16, got " << shape_str(queries.shape()) << " "
       << queries.dtype() << ".";
    fail(os.str());
  }
  int rows = queries.shape(0), q_heads = queries.shape(1);
  int num_queries = queries.shape(2), dim = queries.shape(3);
  if (key_blocks.size() != value_blocks.size() ||
      quantized_keys.size() != quantized_values.size()) {
    std::ostringstream os;
    os << op << ": got " << key_blocks.size() << " key and "
       << value_blocks.size() << " value blocks, " << quantized_keys.size()
       << " quantized key and " << quantized_values.size()
       << " quantized value blocks; keys and values must pair up.";
    fail(os.str());
  }
  if (key_blocks.empty() && quantized_keys.empty()) {
    fail(std::string(op) + ": no blocks: the keys' shape comes from them.");
  }
  if (block_tables.size() != static_cast<size_t>(rows) ||
      context_lengths.size() != static_cast<size_t>(rows) ||
      query_starts.size() != static_cast<size_t>(rows) ||
      (!options.ring_bases.empty() &&
       options.ring_bases.size() != static_cast<size_t>(rows))) {
    std::ostringstream os;
    os << op << ": queries have " << rows << " rows but there are "
       << block_tables.size() << " block tables, " << context_lengths.size()
       << " context lengths, " << query_starts.size() << " query starts and "
       << options.ring_bases.size() << " ring bases (none, or one per row).";
    fail(os.str());
  }
  if (options.window < 0 || !(options.softcap >= 0) ||
      !(std::abs(options.scale) < std::numeric_limits<float>::infinity())) {
    std::ostringstream os;
    os << op << ": window must be >= 0, softcap >= 0 and scale finite; got "
       << options.window << ", " << options.softcap << ", " << options.scale
       << ".";
    fail(os.str());
  }

  // The blocks' geometry, from the first one.
  int kv_heads, block_tokens, v_dim;
  bool quantized = !quantized_keys.empty();
  if (quantized) {
    check_quantization(options.group_size, options.bits, op);
  }
  if (!key_blocks.empty()) {
    const auto& k0 = key_blocks[0];
    const auto& v0 = value_blocks[0];
    if (k0.ndim() != 3 || v0.ndim() != 3) {
      fail(std::string(op) + ": blocks must be [H, B, D] arrays.");
    }
    kv_heads = k0.shape(0);
    block_tokens = k0.shape(1);
    v_dim = v0.shape(2);
  } else {
    const auto& q0 = quantized_keys[0].scales;
    const auto& v0 = quantized_values[0].scales;
    if (q0.ndim() != 3 || v0.ndim() != 3) {
      fail(std::string(op) + ": quantized blocks must be [H, B, d] arrays.");
    }
    kv_heads = q0.shape(0);
    block_tokens = q0.shape(1);
    v_dim = v0.shape(2) * options.group_size;
  }
  if (kv_heads < 1 || q_heads % kv_heads != 0 || block_tokens < 1) {
    std::ostringstream os;
    os << op << ": " << q_heads << " query heads cannot share " << kv_heads
       << " key/value heads (they must divide evenly).";
    fail(os.str());
  }
  mx::Shape key_shape{kv_heads, block_tokens, dim};
  mx::Shape value_shape{kv_heads, block_tokens, v_dim};
  for (size_t i = 0; i < key_blocks.size(); ++i) {
    check_block_shape(key_blocks[i], key_shape, queries.dtype(), "key_blocks",
                      i, op);
    check_block_shape(value_blocks[i], value_shape, queries.dtype(),
                      "value_blocks", i, op);
  }
  for (size_t i = 0; i < quantized_keys.size(); ++i) {
    check_quantized(quantized_keys[i], kv_heads, block_tokens, dim,
                    queries.dtype(), options.group_size, options.bits,
                    "quantized_keys", i, op);
    check_quantized(quantized_values[i], kv_heads, block_tokens, v_dim,
                    queries.dtype(), options.group_size, options.bits,
                    "quantized_values", i, op);
  }
  if (options.sinks) {
    const auto& sinks = *options.sinks;
    if (sinks.ndim() != 1 || sinks.shape(0) != q_heads ||
        !is_float(sinks.dtype())) {
      std::ostringstream os;
      os << op << ": sinks must be a float array of shape (" << q_heads
         << ",), got " << shape_str(sinks.shape()) << " " << sinks.dtype()
         << ".";
      fail(os.str());
    }
  }

  int64_t num_blocks =
      static_cast<int64_t>(key_blocks.size() + quantized_keys.size());
  size_t width = 0;
  for (const auto& t : block_tables) {
    width = std::max(width, t.size());
  }
  PagedAttentionParams params;
  params.width = static_cast<int64_t>(std::max<size_t>(width, 1));
  params.tables.assign(rows * params.width, -1);
  for (int b = 0; b < rows; ++b) {
    int64_t length = context_lengths[b], start = query_starts[b];
    int64_t ring = options.ring_bases.empty() ? -1 : options.ring_bases[b];
    if (length < 0 || start < 0 || start > length || ring < -1 ||
        length > static_cast<int64_t>(block_tables[b].size()) * block_tokens) {
      std::ostringstream os;
      os << op << ": row " << b << " has context length " << length
         << ", query start " << start << " and ring base " << ring
         << "; it needs 0 <= start <= length <= its blocks' "
         << block_tables[b].size() * block_tokens
         << " tokens, and ring base >= -1.";
      fail(os.str());
    }
    check_row_coverage(block_tables[b], b, length, start, num_queries,
                       options.window, block_tokens, num_blocks, op);
    std::copy(block_tables[b].begin(), block_tables[b].end(),
              params.tables.begin() + b * params.width);
  }
  params.lengths = context_lengths;
  params.starts = query_starts;
  params.ring_bases = options.ring_bases;
  params.scale = options.scale;
  params.window = options.window;
  params.softcap = options.softcap;
  params.has_sinks = options.sinks.has_value();
  params.full_blocks = static_cast<int64_t>(key_blocks.size());
  params.quantized_blocks = static_cast<int64_t>(quantized_keys.size());
  params.group_size = quantized ? options.group_size : 0;
  params.bits = quantized ? options.bits : 0;
  params.block_tokens = block_tokens;

  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs{queries};
  if (options.sinks) {  // as MLX's attention: the sinks in the queries' dtype
    inputs.push_back(mx::astype(*options.sinks, queries.dtype(), stream));
  }
  for (size_t i = 0; i < key_blocks.size(); ++i) {
    inputs.push_back(key_blocks[i]);
    inputs.push_back(value_blocks[i]);
  }
  for (size_t i = 0; i < quantized_keys.size(); ++i) {
    for (const auto* q : {&quantized_keys[i], &quantized_values[i]}) {
      inputs.push_back(q->packed);
      inputs.push_back(q->scales);
      inputs.push_back(q->biases);
    }
  }
  return mx::array(mx::Shape{rows, q_heads, num_queries, v_dim},
                   queries.dtype(),
                   std::make_shared<PagedAttention>(stream, std::move(params)),
                   std::move(inputs));
}

std::vector<mx::array> write_tokens(const std::vector<mx::array>& sources,
                                    const std::vector<TokenWrite>& writes,
                                    int64_t block_tokens,
                                    mx::StreamOrDevice s) {
  const char* op = "write_tokens";
  if (block_tokens < 1 || block_tokens > std::numeric_limits<int32_t>::max()) {
    fail(std::string(op) + ": block_tokens must be at least 1.");
  }
  for (size_t i = 0; i < sources.size(); ++i) {
    if (sources[i].ndim() != 4) {
      fail(where(op, "sources", i) + " must be [R, H, T, D], got " +
           shape_str(sources[i].shape()) + ".");
    }
  }
  auto stream = mx::to_stream(s);
  std::vector<mx::array> out;
  out.reserve(writes.size());
  for (size_t i = 0; i < writes.size(); ++i) {
    const auto& w = writes[i];
    if (w.source < 0 || w.source >= static_cast<int>(sources.size())) {
      fail(where(op, "writes", i) + " names source " +
           std::to_string(w.source) + " of " +
           std::to_string(sources.size()) + ".");
    }
    const auto& src = sources[w.source];
    mx::Shape block{src.shape(1), static_cast<int>(block_tokens), src.shape(3)};
    if (w.row < 0 || w.row >= src.shape(0) || w.count < 0 ||
        w.source_start < 0 || w.source_start + w.count > src.shape(2) ||
        w.offset < 0 || w.offset + w.count > block_tokens) {
      std::ostringstream os;
      os << where(op, "writes", i) << ": row " << w.row << ", tokens "
         << w.source_start << ".." << w.source_start + w.count
         << " of a source " << shape_str(src.shape()) << " at offset "
         << w.offset << " do not fit a block of " << block_tokens
         << " tokens.";
      fail(os.str());
    }
    if (w.dest && (w.dest->shape() != block || w.dest->dtype() != src.dtype())) {
      std::ostringstream os;
      os << where(op, "writes", i) << ": the destination must be "
         << shape_str(block) << " " << src.dtype() << ", got "
         << shape_str(w.dest->shape()) << " " << w.dest->dtype() << ".";
      fail(os.str());
    }
    std::vector<mx::array> inputs{src};
    if (w.dest) {
      inputs.push_back(*w.dest);
    }
    WriteTokensParams params{w.row, w.source_start, w.count, w.offset,
                             block_tokens, w.dest.has_value()};
    out.emplace_back(block, src.dtype(),
                     std::make_shared<WriteTokens>(stream, params),
                     std::move(inputs));
  }
  return out;
}

}  // namespace blockpool
