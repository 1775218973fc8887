// Minimal stand-in for Apple's <objc/runtime.h>: the declarations metal-cpp uses, for a syntax check only.
#pragma once
#include <cstddef>
typedef struct objc_class* Class;
struct objc_object { Class isa; };
struct objc_class { Class isa; };
typedef struct objc_object* id;
typedef struct objc_selector* SEL;
typedef bool BOOL;
typedef struct objc_object Protocol;
typedef id (*IMP)(id, SEL, ...);
#define YES true
#define NO false
#define nil nullptr
extern "C" {
SEL sel_registerName(const char* name);
Class objc_lookUpClass(const char* name);
id objc_getClass(const char* name);
Protocol* objc_getProtocol(const char* name);
bool class_addMethod(Class cls, SEL name, IMP imp, const char* types);
}
