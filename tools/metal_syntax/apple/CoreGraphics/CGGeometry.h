// Minimal stand-in for Apple's <CoreGraphics/CGGeometry.h>, for a syntax check only.
#pragma once
typedef double CGFloat;
struct CGPoint { CGFloat x, y; };
struct CGSize { CGFloat width, height; };
struct CGRect { CGPoint origin; CGSize size; };
