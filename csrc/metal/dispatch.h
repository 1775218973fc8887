// Encoding a plan (plans.h) for the Metal kernels of block_copy.metal.
//
// NOT BUILT OR RUN IN THIS PROJECT'S CI (see block_copy.cpp).
#pragma once

#include <string>
#include <vector>

#include "plans.h"

namespace MTL {
class ComputePipelineState;
}

namespace blockpool::metal {

// Metal allows 31 buffer arguments per kernel: slot 0 holds the segment
// table, slot 1 the parameters, slots 2..30 the arrays a dispatch touches.
// A plan touching more arrays is split into several dispatches; one whose
// arrays fit is one dispatch per phase and copy unit.
constexpr int kTableSlot = 0;
constexpr int kParamsSlot = 1;
constexpr int kFirstArraySlot = 2;
constexpr int kMaxArrays = 29;

// A kernel of blockpool.metallib (installed next to the extension binary).
MTL::ComputePipelineState* blockpool_kernel(const mx::Stream& stream, const std::string& name);

// Copies with the widest unit every segment of a dispatch allows, up to 16
// bytes per thread (see copy_unit in dispatch.cpp).
void encode_copy_plan(const mx::Stream& stream, const CopyPlan& plan,
                      const std::vector<mx::array>& inputs,
                      std::vector<mx::array>& outputs);

// One thread per packed word (32 / bits values), one dispatch per output
// dtype and group of at most kMaxArrays arrays.
void encode_dequant_plan(const mx::Stream& stream,
                         const std::vector<DequantSegment>& segments,
                         const std::vector<mx::array>& inputs,
                         std::vector<mx::array>& outputs, int group_size,
                         int bits);

}  // namespace blockpool::metal
