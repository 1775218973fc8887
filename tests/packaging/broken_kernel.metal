// Deliberately broken: BLOCKPOOL_METAL_TEST_BROKEN=kernel compiles this in
// place of csrc/metal/block_copy.metal to check that a failing Metal build
// still gives a working package. It must never compile.
[[kernel]] void broken(device const float* in [[buffer(0)]]) {
  this is not a kernel
}
