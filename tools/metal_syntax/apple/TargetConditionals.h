// Minimal stand-in for Apple's <TargetConditionals.h>, for a syntax check only.
#pragma once
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
