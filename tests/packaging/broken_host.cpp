// Deliberately broken: BLOCKPOOL_METAL_TEST_BROKEN=host compiles this in
// place of the Metal host code (csrc/metal/*.cpp) to check that a failing
// Metal build still gives a working package. It must never compile.
#include "primitives.h"

namespace blockpool {
void broken_host_code() { undeclared_metal_call(); }
}  // namespace blockpool
