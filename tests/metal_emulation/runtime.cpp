// Runs an emulated Metal kernel over its whole grid on the CPU.
//
// Every thread of a threadgroup is a real std::thread; threadgroups run one
// after another. Between two synchronisation points (a threadgroup barrier,
// a simdgroup barrier or simd operation, the end of the kernel) exactly one
// thread runs, and the next one is drawn at random among the runnable
// threads. A kernel that is correct on the GPU is correct under every such
// order, while a missing barrier shows up as reads of data not yet written
// (threadgroup memory starts each threadgroup filled with NaN bytes) or
// already overwritten, deterministically for a given seed. A barrier that not
// every thread reaches is reported as a deadlock instead of hanging.
//
// Usage: runtime JOB OUT. JOB holds the dispatch and the argument table (see
// emulator.py); OUT receives the output buffers. Errors: one line on stderr,
// exit status 3.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#include "metal_emulation.h"

// The address-space qualifiers are for kernels only.
#undef device
#undef constant
#undef thread
#undef threadgroup

namespace metal_emu {
namespace {

constexpr size_t kGuard = 4096;
constexpr size_t kThreadgroupMemory = 32768;
constexpr unsigned char kPoison = 0xff;

[[noreturn]] void fail(const std::string& msg) {
  std::fprintf(stderr, "%s\n", msg.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

struct Barrier {
  int size = 0;
  std::vector<int> waiting;
};

struct Exchange {
  alignas(16) unsigned char slot[2][simd_width][16];
};

struct Thread {
  int index = 0;
  int simdgroup = 0;
  int lane = 0;
  size_t cursor = 0;
  uint64_t simd_ops = 0;
  ThreadIds ids{};
};

struct Runtime {
  std::mutex mu;
  int n_threads = 0;
  std::vector<std::unique_ptr<std::binary_semaphore>> sem;
  std::binary_semaphore group_done{0};
  std::vector<int> runnable;
  std::mt19937_64 rng;
  Barrier group_barrier;
  std::vector<Barrier> simd_barriers;
  std::vector<Exchange> exchange;
  std::vector<Thread> threads;
  int finished = 0;
  bool quit = false;
  unsigned char* arena = nullptr;
  void* const* buffers = nullptr;
};

Runtime rt;
thread_local Thread* self = nullptr;

// Called with the lock held by the running thread when it blocks or ends:
// hand over to a runnable thread (possibly itself).
void switch_away(std::unique_lock<std::mutex>& lock, bool ended) {
  if (rt.runnable.empty()) {
    if (ended && rt.finished == rt.n_threads) {
      lock.unlock();
      rt.group_done.release();
      return;
    }
    int at_group = int(rt.group_barrier.waiting.size());
    int at_simd = 0;
    for (auto& b : rt.simd_barriers) {
      at_simd += int(b.waiting.size());
    }
    fail("emulation deadlock: " + std::to_string(at_group) +
         " thread(s) wait at threadgroup_barrier, " + std::to_string(at_simd) +
         " at a simdgroup barrier or simd operation, " + std::to_string(rt.finished) +
         " returned (a barrier not reached by every thread of the group)");
  }
  size_t pick = rt.rng() % rt.runnable.size();
  int next = rt.runnable[pick];
  rt.runnable[pick] = rt.runnable.back();
  rt.runnable.pop_back();
  if (!ended && next == self->index) {
    return;
  }
  rt.sem[next]->release();
  lock.unlock();
  if (!ended) {
    rt.sem[self->index]->acquire();
  }
}

void wait_at(Barrier& b) {
  std::unique_lock<std::mutex> lock(rt.mu);
  b.waiting.push_back(self->index);
  if (int(b.waiting.size()) == b.size) {
    rt.runnable.insert(rt.runnable.end(), b.waiting.begin(), b.waiting.end());
    b.waiting.clear();
  }
  switch_away(lock, false);
}

void thread_main(int index) {
  self = &rt.threads[index];
  for (;;) {
    rt.sem[index]->acquire();
    if (rt.quit) {
      return;
    }
    emu_invoke(rt.buffers, self->ids);
    std::unique_lock<std::mutex> lock(rt.mu);
    rt.finished++;
    switch_away(lock, true);
  }
}

}  // namespace

void threadgroup_barrier() {
  wait_at(rt.group_barrier);
}

void simdgroup_barrier() {
  wait_at(rt.simd_barriers[self->simdgroup]);
}

int simd_exchange(const void* value, size_t size, void* all) {
  if (size > 16) {
    fail("simd operation on a value over 16 bytes");
  }
  // Two slots per lane: a lane can only reuse a slot after every lane of its
  // simdgroup has passed the next operation, hence read this one.
  Exchange& e = rt.exchange[self->simdgroup];
  int which = int(self->simd_ops++ & 1);
  std::memcpy(e.slot[which][self->lane], value, size);
  simdgroup_barrier();
  int n = rt.simd_barriers[self->simdgroup].size;
  for (int i = 0; i < n; ++i) {
    std::memcpy(static_cast<unsigned char*>(all) + i * size, e.slot[which][i], size);
  }
  return n;
}

int lane() {
  return self->lane;
}

void* threadgroup_alloc(size_t size, size_t align) {
  size_t start = (self->cursor + align - 1) / align * align;
  if (start + size > kThreadgroupMemory) {
    fail("threadgroup memory over " + std::to_string(kThreadgroupMemory) + " bytes");
  }
  self->cursor = start + size;
  return rt.arena + start;
}

}  // namespace metal_emu

namespace {

using metal_emu::fail;

struct Job {
  FILE* f;
  int64_t read_i64() {
    int64_t v;
    if (std::fread(&v, 8, 1, f) != 1) {
      fail("job file is truncated");
    }
    return v;
  }
};

struct Buffer {
  int64_t kind = 0;  // 0 input, 1 output left uninitialised, 2 output with initial bytes
  int64_t nbytes = 0;
  unsigned char* base = nullptr;
  unsigned char* data() const { return base + metal_emu::kGuard; }
};

}  // namespace

int main(int argc, char** argv) {
  using namespace metal_emu;
  if (argc != 3) {
    fail("usage: runtime JOB OUT");
  }
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) {
    fail(std::string("cannot open ") + argv[1]);
  }
  Job job{f};
  int64_t grid[3], tg[3];
  for (auto& g : grid) g = job.read_i64();
  for (auto& t : tg) t = job.read_i64();
  uint64_t seed = uint64_t(job.read_i64());
  int64_t n_buffers = job.read_i64();
  std::vector<Buffer> buffers(n_buffers);
  std::vector<void*> pointers(n_buffers);
  for (int64_t i = 0; i < n_buffers; ++i) {
    Buffer& b = buffers[i];
    b.kind = job.read_i64();
    b.nbytes = job.read_i64();
    size_t total = (size_t(b.nbytes) + 2 * kGuard + 63) / 64 * 64;
    b.base = static_cast<unsigned char*>(std::aligned_alloc(64, total));
    std::memset(b.base, kPoison, total);
    if (b.kind != 1 && b.nbytes > 0 &&
        std::fread(b.data(), 1, size_t(b.nbytes), f) != size_t(b.nbytes)) {
      fail("job file is truncated");
    }
    pointers[i] = b.data();
  }
  std::fclose(f);

  for (int d = 0; d < 3; ++d) {
    if (grid[d] < 1 || tg[d] < 1 || grid[d] % tg[d] != 0) {
      fail("the emulator runs uniform grids only: grid " + std::to_string(grid[d]) +
           " is not a multiple of threadgroup " + std::to_string(tg[d]));
    }
  }
  int n_threads = int(tg[0] * tg[1] * tg[2]);
  if (n_threads > 1024) {
    fail("threadgroup of " + std::to_string(n_threads) + " threads (Metal allows 1024)");
  }
  int n_simd = (n_threads + simd_width - 1) / simd_width;
  rt.n_threads = n_threads;
  rt.rng.seed(seed);
  rt.buffers = pointers.data();
  rt.group_barrier.size = n_threads;
  rt.simd_barriers.resize(n_simd);
  rt.exchange.resize(n_simd);
  for (int s = 0; s < n_simd; ++s) {
    rt.simd_barriers[s].size = std::min(simd_width, n_threads - s * simd_width);
  }
  rt.arena = static_cast<unsigned char*>(std::aligned_alloc(64, kThreadgroupMemory));
  rt.threads.resize(n_threads);
  for (int t = 0; t < n_threads; ++t) {
    rt.sem.emplace_back(std::make_unique<std::binary_semaphore>(0));
  }
  std::vector<std::thread> workers;
  for (int t = 0; t < n_threads; ++t) {
    workers.emplace_back(thread_main, t);
  }

  uint3 groups{uint(grid[0] / tg[0]), uint(grid[1] / tg[1]), uint(grid[2] / tg[2])};
  for (uint gz = 0; gz < groups.z; ++gz) {
    for (uint gy = 0; gy < groups.y; ++gy) {
      for (uint gx = 0; gx < groups.x; ++gx) {
        std::memset(rt.arena, kPoison, kThreadgroupMemory);
        for (int t = 0; t < n_threads; ++t) {
          Thread& th = rt.threads[t];
          uint lx = uint(t % tg[0]), ly = uint(t / tg[0] % tg[1]), lz = uint(t / (tg[0] * tg[1]));
          th.index = t;
          th.simdgroup = t / simd_width;
          th.lane = t % simd_width;
          th.cursor = 0;
          th.simd_ops = 0;
          ThreadIds& ids = th.ids;
          ids.threadgroup_position_in_grid = {gx, gy, gz};
          ids.thread_position_in_threadgroup = {lx, ly, lz};
          ids.thread_position_in_grid = {uint(gx * tg[0] + lx), uint(gy * tg[1] + ly),
                                         uint(gz * tg[2] + lz)};
          ids.threads_per_threadgroup = {uint(tg[0]), uint(tg[1]), uint(tg[2])};
          ids.dispatch_threads_per_threadgroup = ids.threads_per_threadgroup;
          ids.threadgroups_per_grid = groups;
          ids.threads_per_grid = {uint(grid[0]), uint(grid[1]), uint(grid[2])};
          ids.grid_size = ids.threads_per_grid;
          ids.grid_origin = {0, 0, 0};
          ids.thread_index_in_threadgroup = uint(t);
          ids.simdgroup_index_in_threadgroup = uint(t / simd_width);
          ids.thread_index_in_simdgroup = uint(t % simd_width);
          ids.simdgroups_per_threadgroup = uint(n_simd);
          ids.dispatch_simdgroups_per_threadgroup = uint(n_simd);
          ids.threads_per_simdgroup = simd_width;
          ids.thread_execution_width = simd_width;
          ids.quadgroup_index_in_threadgroup = uint(t / 4);
          ids.thread_index_in_quadgroup = uint(t % 4);
          ids.quadgroups_per_threadgroup = uint((n_threads + 3) / 4);
          ids.dispatch_quadgroups_per_threadgroup = ids.quadgroups_per_threadgroup;
        }
        {
          std::unique_lock<std::mutex> lock(rt.mu);
          rt.finished = 0;
          rt.runnable.clear();
          for (int t = 0; t < n_threads; ++t) {
            rt.runnable.push_back(t);
          }
          size_t pick = rt.rng() % rt.runnable.size();
          int first = rt.runnable[pick];
          rt.runnable[pick] = rt.runnable.back();
          rt.runnable.pop_back();
          rt.sem[first]->release();
        }
        rt.group_done.acquire();
      }
    }
  }
  rt.quit = true;
  for (int t = 0; t < n_threads; ++t) {
    rt.sem[t]->release();
  }
  for (auto& w : workers) {
    w.join();
  }

  FILE* out = std::fopen(argv[2], "wb");
  if (!out) {
    fail(std::string("cannot write ") + argv[2]);
  }
  for (int64_t i = 0; i < n_buffers; ++i) {
    const Buffer& b = buffers[i];
    for (size_t k = 0; k < kGuard; ++k) {
      bool before = b.base[k] != kPoison;
      bool after = b.data()[b.nbytes + k] != kPoison;
      if (before || after) {
        fail("out-of-bounds write: buffer(" + std::to_string(i) + ") was written " +
             (before ? "before its start" : "past its end"));
      }
    }
    if (b.kind != 0) {
      std::fwrite(b.data(), 1, size_t(b.nbytes), out);
    }
  }
  std::fclose(out);
  return 0;
}
