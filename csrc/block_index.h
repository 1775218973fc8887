// Index arithmetic shared by the CPU kernels (C++) and the Metal kernels
// (Metal Shading Language). This one header compiles as both, so the CPU
// tests exercise the very formulas the GPU uses.
//
// Every copy is described by a plan of segments (CopySegment): a 3-D box of
// heads x rows x items read from one buffer and written, contiguous along the
// items, into another. Dequantization uses DequantSegment the same way. The
// host builds the plan (csrc/plans.cpp); the CPU walks it with memcpy tiles,
// a Metal kernel walks it with one thread per copy unit. Paged attention
// (KeyRange and the functions after it) finds the keys a query attends to,
// the block that holds each, and the order they are summed in.
//
// Keep this file to what both languages accept: plain structs of int64_t and
// int32_t (identical layout in C++ and MSL), inline functions, no pointers
// (MSL pointers carry address spaces), no standard library.
#pragma once

#if defined(__METAL_VERSION__)
#include <metal_stdlib>
#else
#include <cstdint>
#endif

namespace blockpool_index {

// ------------------------------------------------------------- block layout

// Strides, in items, of a 4-D view [block, head, token, item]. A single
// block array [H, B, D] is the same view with block = 0.
struct Strides4 {
  int64_t block;
  int64_t head;
  int64_t token;
  int64_t item;
};

// Offset, in items, of (block, head, token, item) in a strided view.
inline int64_t view_offset(Strides4 s, int64_t block, int64_t head,
                           int64_t token, int64_t item) {
  return block * s.block + head * s.head + token * s.token + item * s.item;
}

// Offset of (head, slot, row, item) in a contiguous joined output
// [1, H, slots * B, D]: slot j holds tokens j*B .. (j+1)*B - 1.
inline int64_t joined_offset(int64_t head, int64_t slot, int64_t row,
                             int64_t item, int64_t slots,
                             int64_t block_tokens, int64_t dim) {
  return ((head * slots + slot) * block_tokens + row) * dim + item;
}

// Which block (slot) of an entry, and which row in it, holds position p
// (0-based over the entry's blocks).
struct BlockPosition {
  int64_t slot;
  int64_t row;
};

inline BlockPosition block_position(int64_t position, int64_t block_tokens) {
  BlockPosition p;
  p.slot = position / block_tokens;
  p.row = position % block_tokens;
  return p;
}

// Blocks needed to hold positions 0 .. first + tokens - 1.
inline int64_t blocks_for(int64_t first, int64_t tokens,
                          int64_t block_tokens) {
  return (first + tokens + block_tokens - 1) / block_tokens;
}

// Rows of block `slot` that a run starting at `position` fills before the
// block ends or the `remaining` tokens run out.
inline int64_t rows_in_block(int64_t position, int64_t remaining,
                             int64_t block_tokens) {
  int64_t room = block_tokens - position % block_tokens;
  return room < remaining ? room : remaining;
}

// ------------------------------------------------------------- quantized layout
// mx.quantize packs 32 / bits values per uint32 word, lowest bits first, and
// keeps one scale and one bias per group of `group_size` values.

inline int values_per_word(int bits) {
  return 32 / bits;
}

inline int64_t packed_word(int64_t item, int bits) {
  return item / values_per_word(bits);
}

inline uint32_t unpack(uint32_t word, int64_t item, int bits) {
  uint32_t shift = uint32_t(item % values_per_word(bits)) * uint32_t(bits);
  return (word >> shift) & ((1u << uint32_t(bits)) - 1u);
}

inline int64_t group_of(int64_t item, int group_size) {
  return item / group_size;
}

// ------------------------------------------------------------- copy plans

// Copies heads x rows x items from buffer `src` to buffer `dst` (slots of
// the dispatch). Offsets and strides count items of `itemsize` bytes. The
// destination's items are contiguous (it is always one of our own
// allocations, or a pool being updated in place). `src < 0` writes zeros.
struct CopySegment {
  int64_t src_offset;
  int64_t dst_offset;
  int64_t src_head_stride;
  int64_t src_row_stride;
  int64_t src_item_stride;
  int64_t dst_head_stride;
  int64_t dst_row_stride;
  int64_t heads;
  int64_t rows;
  int64_t items;
  int32_t src;
  int32_t dst;
  int32_t itemsize;
  int32_t reserved;  // keeps the size a multiple of 8 in both languages
};

inline int64_t segment_src_index(CopySegment s, int64_t head, int64_t row,
                                 int64_t item) {
  return s.src_offset + head * s.src_head_stride + row * s.src_row_stride +
         item * s.src_item_stride;
}

inline int64_t segment_dst_index(CopySegment s, int64_t head, int64_t row,
                                 int64_t item) {
  return s.dst_offset + head * s.dst_head_stride + row * s.dst_row_stride +
         item;
}

// Dequantizes heads x rows x dim values: packed words, scales and biases
// each with their own buffer and strides (in their own items), into a float
// buffer whose values are contiguous along dim.
struct DequantSegment {
  int64_t packed_offset;
  int64_t scales_offset;
  int64_t biases_offset;
  int64_t out_offset;
  int64_t packed_head_stride;
  int64_t packed_row_stride;
  int64_t packed_word_stride;
  int64_t scales_head_stride;
  int64_t scales_row_stride;
  int64_t scales_group_stride;
  int64_t biases_head_stride;
  int64_t biases_row_stride;
  int64_t biases_group_stride;
  int64_t out_head_stride;
  int64_t out_row_stride;
  int64_t heads;
  int64_t rows;
  int64_t dim;
  int32_t packed;
  int32_t scales;
  int32_t biases;
  int32_t out;
};

// The scalar arguments of a dequantize dispatch.
struct DequantParams {
  int32_t count;  // segments in the dispatch
  int32_t group_size;
  int32_t bits;
};

inline int64_t dequant_word_index(DequantSegment s, int64_t head, int64_t row,
                                  int64_t word) {
  return s.packed_offset + head * s.packed_head_stride +
         row * s.packed_row_stride + word * s.packed_word_stride;
}

inline int64_t dequant_scale_index(DequantSegment s, int64_t head,
                                   int64_t row, int64_t group) {
  return s.scales_offset + head * s.scales_head_stride +
         row * s.scales_row_stride + group * s.scales_group_stride;
}

inline int64_t dequant_bias_index(DequantSegment s, int64_t head, int64_t row,
                                  int64_t group) {
  return s.biases_offset + head * s.biases_head_stride +
         row * s.biases_row_stride + group * s.biases_group_stride;
}

inline int64_t dequant_out_index(DequantSegment s, int64_t head, int64_t row,
                                 int64_t item) {
  return s.out_offset + head * s.out_head_stride + row * s.out_row_stride +
         item;
}

// ------------------------------------------------------------- paged attention
// A query at position t of a row holding `length` tokens attends to the keys
// at positions [lo, lo + count): every earlier position and its own, at most
// `window` of them when the layer has a window (0: none), never past the
// row's last token (a padding query past it attends to the row's end).
//
// Sums over keys run in the order mlx-lm's own cache holds them, so that
// results equal mlx-lm's bit for bit: time order, except one-token steps of
// a sliding-window layer, whose RotatingKVCache is a ring. Its slot s holds
// the position p with (p - ring_base) % window == s, where ring_base is the
// row's token count after its last multi-token step (0 while it held fewer
// than `window` tokens then); the sum starts at slot 0. ring_base < 0: time
// order.
struct KeyRange {
  int64_t lo;     // first position attended to
  int64_t count;  // positions attended to
  int64_t first;  // the sum starts at position lo + first, then wraps
};

inline KeyRange key_range(int64_t t, int64_t length, int64_t window,
                          int64_t ring_base) {
  KeyRange r;
  int64_t hi = t < length - 1 ? t : length - 1;
  r.lo = (window > 0 && t - window + 1 > 0) ? t - window + 1 : 0;
  r.count = hi >= r.lo ? hi - r.lo + 1 : 0;
  r.first = 0;
  if (window > 0 && ring_base >= 0 && r.count > 0) {
    int64_t k0 = ((ring_base - r.lo) % window + window) % window;
    r.first = k0 < r.count ? k0 : 0;
  }
  return r;
}

// The position of the k-th key summed (0 <= k < r.count).
inline int64_t key_position(KeyRange r, int64_t k) {
  int64_t j = r.first + k;
  return r.lo + (j >= r.count ? j - r.count : j);
}

// Where position p of a row lives: entry p / block_tokens of its block
// table (an index into the op's block list, or -1 for a block the row does
// not hold), at row p % block_tokens of that block. Blocks are [H, B, D],
// contiguous: (head, row, item) is at (head * B + row) * D + item.
inline int64_t table_slot(int64_t row_of_batch, int64_t position,
                          int64_t block_tokens, int64_t table_width) {
  return row_of_batch * table_width + position / block_tokens;
}

inline int64_t block_item(int64_t head, int64_t row, int64_t item,
                          int64_t block_tokens, int64_t dim) {
  return (head * block_tokens + row) * dim + item;
}

// One Metal dispatch of paged attention (csrc/metal/paged_attention.cpp):
// it attends over the blocks bound to it (a part of every row's blocks)
// and writes, per query, a partial softmax (its maximum, its sum, and the
// weighted values) that a merge dispatch combines. Its table (an int32
// buffer) holds rows x width local block indices (-1: a block bound to
// another dispatch, or none), then the rows' lengths, query starts and
// ring bases.
struct PagedDispatch {
  int64_t query_strides[4];  // in items
  int32_t rows;
  int32_t q_heads;
  int32_t kv_heads;
  int32_t queries;
  int32_t dim;
  int32_t v_dim;
  int32_t block_tokens;
  int32_t width;
  int32_t window;
  int32_t group_size;
  int32_t bits;       // 0: the bound blocks are full precision
  int32_t part;       // which partial result this dispatch writes
  int32_t parts;      // dispatches of this attention
  int32_t has_sinks;
  float scale;
  float softcap;
};

// Where a partial result starts: parts x (rows * q_heads * queries) records
// of v_dim + 2 floats (maximum, sum, then the weighted values).
inline int64_t partial_offset(int64_t part, int64_t item, int64_t items,
                              int64_t v_dim) {
  return (part * items + item) * (v_dim + 2);
}

}  // namespace blockpool_index
