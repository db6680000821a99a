// Work shared by the calling thread and XLA's intra-op pool.
//
// A decode step calls the kernels a hundred times or more, each for a few tens of
// microseconds, between XLA's own small ops, which run on that same pool and leave its threads
// spinning for more work. The pool's threads therefore pick a call's tasks up at once, and no
// thread of ours competes with them for the cores: helper threads of our own that stayed awake
// between calls made a one-stream step ~15% slower on 2 cores than this (their spinning and
// the pool's took turns on the cores). The caller claims tasks too, so a pool thread that
// starts late (asleep after an idle spell, or busy with another kernel) only finds fewer left.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#ifdef __linux__
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define JPAGED_PAUSE() _mm_pause()
#else
#define JPAGED_PAUSE() std::this_thread::yield()
#endif

namespace jpaged {

inline int64_t Cores() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

// Threads a call's tasks may run on at once: the caller and the pool's, at most one a core.
template <typename Pool>
int64_t Workers(Pool& pool) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), Cores()));
}

// Runs task(i) for every i in [0, tasks) on the calling thread and up to Workers(pool) - 1
// pool threads; returns when all have run. Tasks are claimed one at a time, so one that
// starts late evens out.
template <typename Pool>
void ParallelFor(Pool& pool, int64_t tasks, const std::function<void(int64_t)>& task) {
  struct Work {
    int64_t tasks = 0;
    const std::function<void(int64_t)>* task = nullptr;  // valid while the caller waits below
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  // A pool thread that starts after the caller returned finds no task left, never `task`.
  auto drain = [](Work& w) {
    for (int64_t i; (i = w.next.fetch_add(1)) < w.tasks;) {
      (*w.task)(i);
      w.done.fetch_add(1, std::memory_order_release);
    }
  };
  auto work = std::make_shared<Work>();
  work->tasks = tasks;
  work->task = &task;
  const int64_t extra = std::min<int64_t>(tasks, Workers(pool)) - 1;
  for (int64_t i = 0; i < extra; ++i) pool.Schedule([work, drain] { drain(*work); });
  drain(*work);
  // Tasks a pool thread has claimed are running now; wait for them.
  while (work->done.load(std::memory_order_acquire) < tasks) JPAGED_PAUSE();
}

// Runs task(i) for every i in [0, n) as ParallelFor does, in Workers(pool) contiguous segments
// claimed one index at a time: each thread walks one segment front to back (one stream through
// memory, which the prefetchers follow), then helps with the others'. Each index is claimed once,
// so a thread that starts late only finds less left, and the threads finish within one index of
// each other: chunks of n / (4 x threads) claimed through ParallelFor left one thread waiting
// ~8 us at the end of a decode call (the default model's projections on 2 cores).
template <typename Pool>
void ParallelForSegments(Pool& pool, int64_t n, const std::function<void(int64_t)>& task) {
  const int64_t segments = std::max<int64_t>(1, std::min<int64_t>(n, Workers(pool)));
  struct alignas(64) Segment {
    std::atomic<int64_t> next;
    int64_t end;
  };
  std::unique_ptr<Segment[]> segment(new Segment[segments]);  // valid while ParallelFor runs tasks
  for (int64_t t = 0; t < segments; ++t) {
    segment[t].next.store(n * t / segments, std::memory_order_relaxed);
    segment[t].end = n * (t + 1) / segments;
  }
  ParallelFor(pool, segments, [&](int64_t t) {
    for (int64_t k = 0; k < segments; ++k) {
      Segment& g = segment[(t + k) % segments];
      for (int64_t i; (i = g.next.fetch_add(1, std::memory_order_relaxed)) < g.end;) task(i);
    }
  });
}

}  // namespace jpaged
