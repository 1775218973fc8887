// Metal encoding of copy and dequantize plans.
//
// NOT BUILT OR RUN IN THIS PROJECT'S CI: Linux cannot compile Metal. It is
// compiled only when the configure-time check in CMakeLists.txt passed.
//
// Why bound buffers and not an argument table: every array a dispatch
// touches is bound with MLX's CommandEncoder::set_input_array or
// set_output_array, because that is how MLX tracks hazards (barriers within
// an encoder, fences across command buffers). A table of GPU addresses
// (Metal 3 gpuAddress) would reach more arrays per dispatch but would
// bypass that tracking, which cannot be verified without a Mac. So a
// dispatch binds up to kMaxArrays arrays, and the kernel picks the one a
// segment names by its slot.
#include "metal/dispatch.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>

#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"

namespace blockpool::metal {

namespace {

// blockpool.metallib is installed next to the extension binary. Found once.
const std::string& library_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (dladdr(reinterpret_cast<const void*>(&library_dir), &info) == 0 ||
        info.dli_fname == nullptr) {
      throw std::runtime_error("blockpool: cannot locate the extension binary.");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

MTL::ComputePipelineState* kernel(mx::metal::Device& d,
                                  const std::string& name) {
  return d.get_kernel(name, d.get_library("blockpool", library_dir()));
}

// Which array a plan slot is: inputs first, then outputs.
struct Arrays {
  const std::vector<mx::array>& inputs;
  std::vector<mx::array>& outputs;

  bool is_output(int slot) const {
    return slot >= static_cast<int>(inputs.size());
  }
  const mx::array& at(int slot) const {
    return is_output(slot) ? outputs[slot - inputs.size()] : inputs[slot];
  }
  mx::array& output(int slot) { return outputs[slot - inputs.size()]; }
};

// The widest power-of-two unit (1..16 bytes) that divides every byte offset
// and stride of the segment, including where its buffers start. Items that
// are not contiguous in the source move one item at a time.
int copy_unit(const CopySegment& s, const Arrays& arrays) {
  const int64_t isz = s.itemsize;
  if (s.src >= 0 && s.src_item_stride != 1) {
    return s.itemsize;
  }
  int64_t bytes[] = {
      arrays.at(s.dst).offset() + s.dst_offset * isz,
      s.dst_head_stride * isz,
      s.dst_row_stride * isz,
      s.items * isz,
      s.src < 0 ? 0 : arrays.at(s.src).offset() + s.src_offset * isz,
      s.src < 0 ? 0 : s.src_head_stride * isz,
      s.src < 0 ? 0 : s.src_row_stride * isz,
  };
  int unit = 16;
  while (unit > s.itemsize) {
    bool fits = std::all_of(std::begin(bytes), std::end(bytes),
                            [unit](int64_t b) { return b % unit == 0; });
    if (fits) {
      break;
    }
    unit /= 2;
  }
  return unit;
}

// The segment counted in units of `unit` bytes instead of items.
CopySegment in_units(CopySegment s, int unit) {
  int64_t isz = s.itemsize;
  auto scale = [&](int64_t items) { return items * isz / unit; };
  s.dst_offset = scale(s.dst_offset);
  s.dst_head_stride = scale(s.dst_head_stride);
  s.dst_row_stride = scale(s.dst_row_stride);
  s.items = scale(s.items);
  if (unit != s.itemsize) {  // contiguous items: a unit spans several
    s.src_offset = scale(s.src_offset);
    s.src_head_stride = scale(s.src_head_stride);
    s.src_row_stride = scale(s.src_row_stride);
    s.src_item_stride = 1;
  }
  s.itemsize = unit;
  return s;
}

// Segments grouped into dispatches of at most kMaxArrays distinct arrays.
// `slots_of` lists the plan slots a segment touches; `rebind` rewrites them
// to the dispatch's binding indices.
template <typename Segment, typename SlotsOf, typename Rebind>
std::vector<std::pair<std::vector<Segment>, std::vector<int>>> group(
    const std::vector<Segment>& segments, SlotsOf slots_of, Rebind rebind) {
  std::vector<std::pair<std::vector<Segment>, std::vector<int>>> groups;
  std::map<int, int> bound;  // plan slot -> binding index
  std::vector<Segment> current;
  std::vector<int> arrays;
  auto flush = [&]() {
    if (!current.empty()) {
      groups.emplace_back(std::move(current), std::move(arrays));
    }
    current.clear();
    arrays.clear();
    bound.clear();
  };
  for (auto s : segments) {
    int missing = 0;
    for (int slot : slots_of(s)) {
      missing += (slot >= 0 && !bound.count(slot)) ? 1 : 0;
    }
    if (static_cast<int>(bound.size()) + missing > kMaxArrays) {
      flush();
    }
    for (int slot : slots_of(s)) {
      if (slot >= 0 && !bound.count(slot)) {
        bound[slot] = static_cast<int>(arrays.size());
        arrays.push_back(slot);
      }
    }
    rebind(s, bound);
    current.push_back(s);
  }
  flush();
  return groups;
}

// A device buffer holding `data`, released when the command buffer is done.
template <typename T>
mx::array upload(const std::vector<T>& data, mx::metal::CommandEncoder& enc) {
  size_t bytes = data.size() * sizeof(T);
  mx::array table({static_cast<int>(bytes)}, mx::uint8, nullptr, {});
  table.set_data(mx::allocator::malloc(bytes));
  std::memcpy(table.data<char>(), data.data(), bytes);  // unified memory
  enc.add_temporary(table);
  return table;
}

void bind_arrays(mx::metal::CommandEncoder& enc, Arrays& arrays,
                 const std::vector<int>& slots) {
  for (size_t k = 0; k < slots.size(); ++k) {
    int index = kFirstArraySlot + static_cast<int>(k);
    if (arrays.is_output(slots[k])) {
      enc.set_output_array(arrays.output(slots[k]), index);
    } else {
      enc.set_input_array(arrays.at(slots[k]), index);
    }
  }
}

MTL::Size group_size_for(MTL::Size grid, MTL::ComputePipelineState* k) {
  size_t max = k->maxTotalThreadsPerThreadgroup();
  size_t x = std::min<size_t>(grid.width, 32);
  size_t y = std::min<size_t>(grid.height, std::max<size_t>(1, max / x));
  return MTL::Size(x, y, 1);
}

}  // namespace

MTL::ComputePipelineState* blockpool_kernel(const mx::Stream& stream, const std::string& name) {
  return kernel(mx::metal::device(stream.device), name);
}

void encode_copy_plan(const mx::Stream& stream, const CopyPlan& plan,
                      const std::vector<mx::array>& inputs,
                      std::vector<mx::array>& outputs) {
  auto& d = mx::metal::device(stream.device);
  auto& enc = mx::metal::get_command_encoder(stream);
  Arrays arrays{inputs, outputs};
  for (const auto& phase : plan.phases) {
    // Segments of a phase write disjoint bytes: order them by unit so each
    // dispatch runs one kernel instance.
    std::map<int, std::vector<CopySegment>> by_unit;
    for (const auto& s : phase) {
      int unit = copy_unit(s, arrays);
      by_unit[unit].push_back(in_units(s, unit));
    }
    for (const auto& [unit, segments] : by_unit) {
      auto groups = group(
          segments,
          [](const CopySegment& s) { return std::vector<int>{s.src, s.dst}; },
          [](CopySegment& s, const std::map<int, int>& bound) {
            s.src = s.src < 0 ? -1 : bound.at(s.src);
            s.dst = bound.at(s.dst);
          });
      auto* k = kernel(d, "copy_segments_" + std::to_string(unit));
      for (auto& [group_segments, slots] : groups) {
        int64_t width = 0, height = 0;
        for (const auto& s : group_segments) {
          width = std::max(width, s.items);
          height = std::max(height, s.heads * s.rows);
        }
        int count = static_cast<int>(group_segments.size());
        auto table = upload(group_segments, enc);
        enc.set_compute_pipeline_state(k);
        enc.set_input_array(table, kTableSlot);
        enc.set_bytes(count, kParamsSlot);
        bind_arrays(enc, arrays, slots);
        MTL::Size grid(width, height, count);
        enc.dispatch_threads(grid, group_size_for(grid, k));
      }
    }
  }
}

void encode_dequant_plan(const mx::Stream& stream,
                         const std::vector<DequantSegment>& segments,
                         const std::vector<mx::array>& inputs,
                         std::vector<mx::array>& outputs, int group_size,
                         int bits) {
  auto& d = mx::metal::device(stream.device);
  auto& enc = mx::metal::get_command_encoder(stream);
  Arrays arrays{inputs, outputs};
  // One kernel instance per output dtype: entries may differ.
  std::map<std::string, std::vector<DequantSegment>> by_dtype;
  for (const auto& s : segments) {
    by_dtype[mx::type_to_name(arrays.at(s.out))].push_back(s);
  }
  int per_word = 32 / bits;
  for (const auto& [type, list] : by_dtype) {
    auto groups = group(
        list,
        [](const DequantSegment& s) {
          return std::vector<int>{s.packed, s.scales, s.biases, s.out};
        },
        [](DequantSegment& s, const std::map<int, int>& bound) {
          s.packed = bound.at(s.packed);
          s.scales = bound.at(s.scales);
          s.biases = bound.at(s.biases);
          s.out = bound.at(s.out);
        });
    auto* k = kernel(d, "dequant_segments_" + type);
    for (auto& [group_segments, slots] : groups) {
      int64_t width = 0, height = 0;
      for (const auto& s : group_segments) {
        width = std::max(width, s.dim / per_word);
        height = std::max(height, s.heads * s.rows);
      }
      blockpool_index::DequantParams params{static_cast<int32_t>(group_segments.size()), group_size,
                    bits};
      auto table = upload(group_segments, enc);
      enc.set_compute_pipeline_state(k);
      enc.set_input_array(table, kTableSlot);
      enc.set_bytes(params, kParamsSlot);
      bind_arrays(enc, arrays, slots);
      MTL::Size grid(width, height, params.count);
      enc.dispatch_threads(grid, group_size_for(grid, k));
    }
  }
}

}  // namespace blockpool::metal
