#include "cpu/parallel.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <future>
#include <thread>

#include "mlx/threadpool.h"

namespace blockpool::cpu {

namespace {

// Below this a copy is not worth waking another thread for.
constexpr int64_t kMinBytesPerThread = 1 << 20;
// Large tiles are cut into pieces of about this size so work balances.
constexpr int64_t kPieceBytes = 1 << 20;

template <typename T>
void copy_elements(const Tile& t, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const char* s = t.src + r * t.src_row_stride;
    char* d = t.dst + r * t.dst_row_stride;
    for (int64_t e = 0; e < t.row_elems; ++e) {
      T v;
      std::memcpy(&v, s + e * t.src_elem_stride, sizeof(T));
      std::memcpy(d + e * t.dst_elem_stride, &v, sizeof(T));
    }
  }
}

void zero_rows(const Tile& t, int64_t r0, int64_t r1) {
  const int64_t row_bytes = t.row_elems * t.itemsize;
  if (t.dst_elem_stride == t.itemsize && t.dst_row_stride == row_bytes) {
    std::memset(t.dst + r0 * row_bytes, 0, (r1 - r0) * row_bytes);
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    char* d = t.dst + r * t.dst_row_stride;
    if (t.dst_elem_stride == t.itemsize) {
      std::memset(d, 0, row_bytes);
      continue;
    }
    for (int64_t e = 0; e < t.row_elems; ++e) {
      std::memset(d + e * t.dst_elem_stride, 0, t.itemsize);
    }
  }
}

void copy_rows(const Tile& t, int64_t r0, int64_t r1) {
  if (t.src == nullptr) {
    return zero_rows(t, r0, r1);
  }
  const int64_t row_bytes = t.row_elems * t.itemsize;
  bool dense_rows = t.src_elem_stride == t.itemsize &&
                    t.dst_elem_stride == t.itemsize;
  if (dense_rows && t.src_row_stride == row_bytes &&
      t.dst_row_stride == row_bytes) {
    std::memcpy(t.dst + r0 * row_bytes, t.src + r0 * row_bytes,
                (r1 - r0) * row_bytes);
    return;
  }
  if (dense_rows) {
    for (int64_t r = r0; r < r1; ++r) {
      std::memcpy(t.dst + r * t.dst_row_stride, t.src + r * t.src_row_stride,
                  row_bytes);
    }
    return;
  }
  switch (t.itemsize) {
    case 1: return copy_elements<uint8_t>(t, r0, r1);
    case 2: return copy_elements<uint16_t>(t, r0, r1);
    case 4: return copy_elements<uint32_t>(t, r0, r1);
    default: return copy_elements<uint64_t>(t, r0, r1);
  }
}

struct Piece {
  const Tile* tile;
  int64_t r0;
  int64_t r1;
};

ThreadPool& helper_threads() {
  // The calling thread works too, so the pool has one thread fewer.
  static ThreadPool pool(std::max(1, num_copy_threads() - 1));
  return pool;
}

}  // namespace

int num_copy_threads() {
  static const int n = [] {
    if (const char* env = std::getenv("BLOCKPOOL_NUM_THREADS")) {
      int v = std::atoi(env);
      if (v > 0) {
        return v;
      }
    }
    int hw = static_cast<int>(std::thread::hardware_concurrency());
    return std::clamp(hw, 1, 8);
  }();
  return n;
}

void copy_tiles(const std::vector<Tile>& tiles) {
  int64_t total = 0;
  for (const auto& t : tiles) {
    total += t.bytes();
  }
  int64_t wanted = std::max<int64_t>(1, total / kMinBytesPerThread);
  int threads = static_cast<int>(
      std::min<int64_t>(num_copy_threads(), wanted));
  if (threads <= 1) {
    for (const auto& t : tiles) {
      copy_rows(t, 0, t.rows);
    }
    return;
  }

  std::vector<Piece> pieces;
  for (const auto& t : tiles) {
    int64_t row_bytes = std::max<int64_t>(1, t.row_elems * t.itemsize);
    int64_t step = std::max<int64_t>(1, kPieceBytes / row_bytes);
    for (int64_t r = 0; r < t.rows; r += step) {
      pieces.push_back({&t, r, std::min(t.rows, r + step)});
    }
  }

  // Contiguous runs of pieces with about total/threads bytes each, so every
  // thread streams through neighbouring memory.
  std::vector<size_t> bounds{0};
  int64_t target = (total + threads - 1) / threads;
  int64_t acc = 0;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const auto& p = pieces[i];
    acc += (p.r1 - p.r0) * p.tile->row_elems * p.tile->itemsize;
    if (acc >= target && (int)bounds.size() < threads) {
      bounds.push_back(i + 1);
      acc = 0;
    }
  }
  if (bounds.back() != pieces.size()) {
    bounds.push_back(pieces.size());
  }

  auto run = [&pieces](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      copy_rows(*pieces[i].tile, pieces[i].r0, pieces[i].r1);
    }
  };
  std::vector<std::future<void>> pending;
  for (size_t k = 1; k + 1 < bounds.size(); ++k) {
    pending.push_back(helper_threads().enqueue(run, bounds[k], bounds[k + 1]));
  }
  run(bounds[0], bounds[1]);
  for (auto& f : pending) {
    f.get();
  }
}

void parallel_for(int64_t n, int64_t bytes_per_item,
                  const std::function<void(int64_t, int64_t)>& body) {
  int64_t wanted = std::max<int64_t>(1, n * bytes_per_item / kMinBytesPerThread);
  int threads = static_cast<int>(
      std::min<int64_t>({num_copy_threads(), wanted, std::max<int64_t>(n, 1)}));
  if (threads <= 1) {
    body(0, n);
    return;
  }
  std::vector<std::future<void>> pending;
  int64_t chunk = (n + threads - 1) / threads;
  for (int64_t begin = chunk; begin < n; begin += chunk) {
    pending.push_back(
        helper_threads().enqueue(body, begin, std::min(n, begin + chunk)));
  }
  body(0, std::min(n, chunk));
  for (auto& f : pending) {
    f.get();
  }
}

}  // namespace blockpool::cpu
