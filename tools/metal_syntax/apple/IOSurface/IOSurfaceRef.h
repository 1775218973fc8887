// Minimal stand-in for Apple's <IOSurface/IOSurfaceRef.h>, for a syntax check only.
#pragma once
typedef struct __IOSurface* IOSurfaceRef;
