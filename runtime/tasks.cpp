// The decode kernel's task scheduler: parallel_tasks (matvec.h) on a pool of its own threads, not torch's OpenMP.
//
// Why not OpenMP: an OpenMP region ends at a barrier that every thread of the team must reach. When other processes
// hold the cores, a thread the OS has not scheduled stalls each region until its next time slice: under the `heavy`
// level (a spinning process per core) 2 threads decoded at 1.2 s per token in some generations, against 60 ms on 1
// thread (bench/RESULTS.md). Here a region ends when its tasks are done. A worker that is not running when a region
// starts finds it closed when it wakes, and the caller has run that worker's share by stealing. Only a task a worker
// has claimed and not finished holds the caller back.
//
// A region: the caller writes the shares and opens it (epoch + 1); each participant claims tasks from the front of its
// own contiguous share (its rows stream as one), and one whose share is done takes the back half of the largest share
// left. Workers spin about a millisecond for the next region (the serial work between a step's regions is shorter),
// then sleep on a condition variable.
#include "matvec.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace matvec {
namespace {

// one participant's tasks [lo, hi) in one word, so that its owner (from the front) and a thief (from the back) claim
// by compare-and-swap, and the tasks it has finished; a cache line each: the owner's claims and counts stay in its
// own cache until a thief looks (one counter shared by all moved a cache line between the cores on every task)
struct alignas(64) Share {
  std::atomic<uint64_t> range{0};
  std::atomic<int64_t> done{0};
};

constexpr uint64_t pack(uint64_t lo, uint64_t hi) { return hi << 32 | lo; }
constexpr uint32_t low(uint64_t r) { return static_cast<uint32_t>(r); }
constexpr uint32_t high(uint64_t r) { return static_cast<uint32_t>(r >> 32); }

constexpr int64_t kMaxThreads = 64;
constexpr int64_t kSpinPauses = 20000;   // a worker's wait for the next region before it sleeps: about 1 ms
constexpr int64_t kYieldAfter = 2000;    // the caller's pauses, waiting on a claimed task, before it yields the core

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// the caller's wait on the workers: spin briefly, then yield the core (a worker it waits for may need it)
template <typename Done>
void wait_until(Done done) {
  for (int64_t spins = 0; !done(); ++spins) {
    if (spins < kYieldAfter) pause(); else std::this_thread::yield();
  }
}

thread_local bool in_worker = false;   // a task that calls parallel_tasks runs its tasks itself

class Pool {
 public:
  // task(i) for i in [0, count) on the caller and threads - 1 workers; false (nothing run) when another caller holds
  // the pool
  bool run(int64_t count, int64_t threads, const std::function<void(int64_t)>& task) {
    std::unique_lock<std::mutex> mine(run_mutex_, std::try_to_lock);
    if (!mine.owns_lock()) return false;
    while (static_cast<int64_t>(workers_) < threads - 1) {
      std::thread(&Pool::work, this, static_cast<int>(++workers_)).detach();   // the pool outlives the process's use
    }
    task_ = &task;
    participants_ = threads;
    for (int64_t i = 0; i < threads; ++i) {
      shares_[i].range.store(pack(count * i / threads, count * (i + 1) / threads), std::memory_order_relaxed);
      shares_[i].done.store(0, std::memory_order_relaxed);
    }
    open_.store(true);
    epoch_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    while (take(0)) {
    }
    wait_until([&] { return finished() == count; });   // every task is claimed: wait for those a worker still runs
    open_.store(false);
    // a worker that joined late may still be looking at the shares; the next region rewrites them
    wait_until([&] { return inside_.load() == 0; });
    return true;
  }

 private:
  int64_t finished() const {
    int64_t n = 0;
    for (int64_t i = 0; i < participants_; ++i) n += shares_[i].done.load(std::memory_order_acquire);
    return n;
  }

  // claims and runs one task: the front of participant me's share, else the back half of the largest share left
  bool take(int64_t me) {
    std::atomic<uint64_t>& own = shares_[me].range;
    for (;;) {
      uint64_t r = own.load(std::memory_order_acquire);
      if (low(r) < high(r)) {
        if (own.compare_exchange_weak(r, pack(low(r) + 1, high(r)), std::memory_order_acq_rel)) {
          (*task_)(low(r));
          shares_[me].done.store(shares_[me].done.load(std::memory_order_relaxed) + 1, std::memory_order_release);
          return true;
        }
        continue;
      }
      int64_t victim = -1;
      uint64_t seen = 0;
      for (int64_t v = 0; v < participants_; ++v) {
        const uint64_t vr = shares_[v].range.load(std::memory_order_acquire);
        if (low(vr) < high(vr) && (victim < 0 || high(vr) - low(vr) > high(seen) - low(seen))) {
          victim = v;
          seen = vr;
        }
      }
      if (victim < 0) return false;
      const uint32_t split = high(seen) - (high(seen) - low(seen) + 1) / 2;
      if (shares_[victim].range.compare_exchange_strong(seen, pack(low(seen), split), std::memory_order_acq_rel))
        own.store(pack(split, high(seen)), std::memory_order_release);
    }
  }

  void work(int me) {
    in_worker = true;
    uint64_t seen = 0;
    for (;;) {
      uint64_t epoch = epoch_.load(std::memory_order_acquire);
      for (int64_t spins = 0; epoch == seen && spins < kSpinPauses; ++spins) {
        pause();
        epoch = epoch_.load(std::memory_order_acquire);
      }
      if (epoch == seen) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return epoch_.load() != seen; });
        sleepers_.fetch_sub(1);
        continue;
      }
      seen = epoch;
      // counted in before looking: the caller does not reuse the shares while a worker may read them; a region
      // opened after `seen` is joined as well (its task and shares were written before it opened)
      inside_.fetch_add(1);
      if (open_.load() && me < participants_) {
        while (take(me)) {
        }
      }
      inside_.fetch_sub(1);
    }
  }

  Share shares_[kMaxThreads];
  const std::function<void(int64_t)>* task_ = nullptr;   // written only while no worker is inside a region
  int64_t participants_ = 0;
  // the lines the workers spin on are written once per region
  alignas(64) std::atomic<uint64_t> epoch_{0};      // regions opened
  std::atomic<bool> open_{false};
  alignas(64) std::atomic<int> inside_{0};          // workers between joining a region and leaving it
  alignas(64) std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::mutex run_mutex_;                // one region at a time (the kernel releases the GIL)
  int workers_ = 0;                     // started, detached: they live as long as the process
};

std::atomic<Pool*> the_pool{nullptr};

// a forked child has none of its parent's workers: it starts a pool of its own (the parent's is left, never freed)
void forget_pool_in_child() { the_pool.store(nullptr); }

Pool& pool() {
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, forget_pool_in_child); });
  Pool* p = the_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    Pool* fresh = new Pool();   // never freed: detached workers hold it until the process exits
    if (the_pool.compare_exchange_strong(p, fresh)) return *fresh;
    delete fresh;
  }
  return *p;
}

}  // namespace

void parallel_tasks(int64_t count, const std::function<void(int64_t)>& task) {
  const int64_t threads = std::min({static_cast<int64_t>(at::get_num_threads()), count, kMaxThreads});
  TORCH_CHECK(count < (int64_t{1} << 32), "parallel_tasks: ", count, " tasks do not fit a 32-bit index");
  if (threads > 1 && !in_worker && !at::in_parallel_region() && pool().run(count, threads, task)) return;
  for (int64_t t = 0; t < count; ++t) task(t);
}

}  // namespace matvec
