// Minimal stand-in for Apple's <CoreFoundation/CoreFoundation.h>, for a syntax check only.
#pragma once
#include <cstdint>
typedef double CFTimeInterval;
typedef const void* CFTypeRef;
typedef const struct __CFString* CFStringRef;
typedef long CFIndex;
typedef unsigned long CFOptionFlags;
typedef struct { CFIndex location; CFIndex length; } CFRange;
// On macOS these arrive through CoreFoundation's own includes (libdispatch).
typedef struct dispatch_queue_s* dispatch_queue_t;
typedef struct dispatch_data_s* dispatch_data_t;
