// Work shared by the calling thread and helper threads that stay awake between kernel calls.
//
// A decode step calls the kernels a hundred times or more, each for a few tens of
// microseconds. Handing each call's work to XLA's intra-op pool woke a sleeping pool thread
// every time, which costs about as much as the call: on 2 cores a 30-layer step ran slower
// on both than on one. These helpers instead spin for kSpin after each piece of work (so a
// step's next call finds them awake), then sleep until the next call, so an idle engine
// burns no CPU. One call at a time uses them; a call that finds them busy (XLA running two
// independent kernels at once) runs alone on its own thread.

#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

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

class Helpers {
 public:
  // The process's helpers: one fewer than the cores it may run on, at most `limit` (XLA's
  // intra-op pool size). A helper spinning on the caller's only core would just take turns with it.
  static Helpers& Get(int64_t limit) {
    static Helpers* helpers = [limit] {  // never destroyed: its threads may outlive static destructors
      return new Helpers(std::max<int64_t>(0, std::min<int64_t>(limit, Cores() - 1)));
    }();
    return *helpers;
  }

  int64_t size() const { return static_cast<int64_t>(threads_.size()); }

  // Runs task(i) for every i in [0, tasks) on the calling thread and the helpers; returns when
  // all have run. Tasks are claimed one at a time, so one that starts late evens out.
  void Run(int64_t tasks, const std::function<void(int64_t)>& task) {
    auto work = std::make_shared<Work>();
    work->tasks = tasks;
    work->task = &task;
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    const bool shared = busy.owns_lock() && tasks > 1 && size() > 0;
    if (shared) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        work_ = work;
        generation_.fetch_add(1, std::memory_order_release);
      }
      wake_.notify_all();
    }
    Drain(*work);
    // Tasks a helper has claimed are running now; wait for them.
    while (work->done.load(std::memory_order_acquire) < tasks) JPAGED_PAUSE();
    if (shared) {
      std::lock_guard<std::mutex> lock(mu_);
      work_.reset();  // a helper that wakes late finds nothing, not a finished call's task
    }
  }

 private:
  // How long a helper spins for the next call before it sleeps.
  static constexpr std::chrono::microseconds kSpin{100};

  struct Work {
    int64_t tasks = 0;
    const std::function<void(int64_t)>* task = nullptr;  // valid while the caller waits in Run
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };

  static int64_t Cores() {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max<int64_t>(1, std::thread::hardware_concurrency());
  }

  explicit Helpers(int64_t n) {
    for (int64_t i = 0; i < n; ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& t : threads_) t.detach();
  }

  // Claims tasks until none is left. A task is claimed only while its caller waits for it.
  static void Drain(Work& w) {
    for (int64_t i; (i = w.next.fetch_add(1)) < w.tasks;) {
      (*w.task)(i);
      w.done.fetch_add(1, std::memory_order_release);
    }
  }

  void Loop() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto start = std::chrono::steady_clock::now();
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        if (spins % 64 == 63 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mu_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          break;
        }
        // Yields the core now and then: another process's thread waiting for it (two test
        // workers, several engines on one machine) runs instead of this spin.
        if (spins % 16 == 15) std::this_thread::yield(); else JPAGED_PAUSE();
      }
      std::shared_ptr<Work> work;
      {
        std::lock_guard<std::mutex> lock(mu_);
        seen = generation_.load(std::memory_order_acquire);
        work = work_;
      }
      if (work) Drain(*work);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex run_mu_;  // one call at a time
  std::mutex mu_;      // work_ and the sleepers' wake-up
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Work> work_;
};

}  // namespace jpaged
