// Minimal stand-in for Apple's <objc/message.h>, for a syntax check only.
#pragma once
#include <objc/runtime.h>
extern "C" {
void objc_msgSend(void);
void objc_msgSend_stret(void);
void objc_msgSend_fpret(void);
}
