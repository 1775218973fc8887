// The arrays of a Metal dispatch, shared by every blockpool kernel: buffer
// 2 + k holds array k (at most 29 per dispatch: csrc/metal/dispatch.h). A
// kernel cannot index its buffer arguments, so BOUND(k) picks one by value.
// The macros are written out in full.
//
// NOT BUILT OR RUN IN THIS PROJECT'S CI: Linux cannot compile Metal.
#pragma once

// The arrays of a dispatch: buffer 2 + k holds array k.
#define BLOCKPOOL_BUFFERS \
    device uchar* b0 [[buffer(2)]], \
    device uchar* b1 [[buffer(3)]], \
    device uchar* b2 [[buffer(4)]], \
    device uchar* b3 [[buffer(5)]], \
    device uchar* b4 [[buffer(6)]], \
    device uchar* b5 [[buffer(7)]], \
    device uchar* b6 [[buffer(8)]], \
    device uchar* b7 [[buffer(9)]], \
    device uchar* b8 [[buffer(10)]], \
    device uchar* b9 [[buffer(11)]], \
    device uchar* b10 [[buffer(12)]], \
    device uchar* b11 [[buffer(13)]], \
    device uchar* b12 [[buffer(14)]], \
    device uchar* b13 [[buffer(15)]], \
    device uchar* b14 [[buffer(16)]], \
    device uchar* b15 [[buffer(17)]], \
    device uchar* b16 [[buffer(18)]], \
    device uchar* b17 [[buffer(19)]], \
    device uchar* b18 [[buffer(20)]], \
    device uchar* b19 [[buffer(21)]], \
    device uchar* b20 [[buffer(22)]], \
    device uchar* b21 [[buffer(23)]], \
    device uchar* b22 [[buffer(24)]], \
    device uchar* b23 [[buffer(25)]], \
    device uchar* b24 [[buffer(26)]], \
    device uchar* b25 [[buffer(27)]], \
    device uchar* b26 [[buffer(28)]], \
    device uchar* b27 [[buffer(29)]], \
    device uchar* b28 [[buffer(30)]]

#define BLOCKPOOL_BUFFER_TYPES \
  device uchar*, device uchar*, device uchar*, device uchar*, device uchar*, \
  device uchar*, device uchar*, device uchar*, device uchar*, device uchar*, \
  device uchar*, device uchar*, device uchar*, device uchar*, device uchar*, \
  device uchar*, device uchar*, device uchar*, device uchar*, device uchar*, \
  device uchar*, device uchar*, device uchar*, device uchar*, device uchar*, \
  device uchar*, device uchar*, device uchar*, device uchar*

// A kernel cannot index its buffer arguments, so BOUND picks one by value.
#define BOUND(k) ( \
  (k) == 0 ? b0 : \
  (k) == 1 ? b1 : \
  (k) == 2 ? b2 : \
  (k) == 3 ? b3 : \
  (k) == 4 ? b4 : \
  (k) == 5 ? b5 : \
  (k) == 6 ? b6 : \
  (k) == 7 ? b7 : \
  (k) == 8 ? b8 : \
  (k) == 9 ? b9 : \
  (k) == 10 ? b10 : \
  (k) == 11 ? b11 : \
  (k) == 12 ? b12 : \
  (k) == 13 ? b13 : \
  (k) == 14 ? b14 : \
  (k) == 15 ? b15 : \
  (k) == 16 ? b16 : \
  (k) == 17 ? b17 : \
  (k) == 18 ? b18 : \
  (k) == 19 ? b19 : \
  (k) == 20 ? b20 : \
  (k) == 21 ? b21 : \
  (k) == 22 ? b22 : \
  (k) == 23 ? b23 : \
  (k) == 24 ? b24 : \
  (k) == 25 ? b25 : \
  (k) == 26 ? b26 : \
  (k) == 27 ? b27 : \
  b28)
