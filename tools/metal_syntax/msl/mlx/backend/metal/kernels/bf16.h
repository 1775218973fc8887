// Stand-in for MLX's Metal bf16.h, for tools/metal_syntax_check.py only.
#pragma once
#include <metal_stdlib>

struct bfloat16_t {
  float v;
  bfloat16_t(float f = 0) : v(f) {}
  operator float() const { return v; }
};
