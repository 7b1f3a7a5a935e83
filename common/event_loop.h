#pragma once
// EventLoop: one libevent event_base driven by one thread, with RAII handles for libevent
// objects, a thread-safe post() for cross-thread work (an eventfd, so the base itself needs no
// locks), and deferred deletion for objects that finish inside their own callbacks.

#include <event2/event.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "common/unique_fd.h"

namespace dmm {

// A libevent timeout from a duration.
inline timeval toTimeval(std::chrono::milliseconds ms) {
  return timeval{static_cast<time_t>(ms.count() / 1000),
                 static_cast<suseconds_t>((ms.count() % 1000) * 1000)};
}

struct EventDeleter {
  void operator()(event* e) const { event_free(e); }
};
using EventPtr = std::unique_ptr<event, EventDeleter>;

struct EventBaseDeleter {
  void operator()(event_base* b) const { event_base_free(b); }
};
using EventBasePtr = std::unique_ptr<event_base, EventBaseDeleter>;

// Base class for objects handed to EventLoop::deferDelete().
class Deferrable {
 public:
  virtual ~Deferrable() = default;
};

// Frees an event whose event_base is already gone, without touching the base (event_free()
// would: a use after free). libevent allocates events with malloc() unless
// event_set_mem_functions() replaced it, which this program never does.
void freeOrphanedEvent(EventPtr& ev);

class EventLoop {
 public:
  EventLoop();
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  event_base* base() const { return base_.get(); }

  // Runs the loop on the calling thread until exit(). Call from one thread only.
  void run();
  // Makes run() return after the current iteration. Any thread.
  void exit();
  // Runs fn on the loop thread, in order of posting. Any thread.
  void post(std::function<void()> fn);
  // Destroys obj once the running callback has returned. Loop thread only.
  void deferDelete(std::unique_ptr<Deferrable> obj);
  // Destroys what deferDelete() holds now (when the loop no longer runs). Loop thread only.
  void collectGarbage();

  // Creates an event on this loop (not yet added). Loop thread (or before run()).
  EventPtr newEvent(evutil_socket_t fd, short what, event_callback_fn cb, void* arg) const;

 private:
  static void onWake(evutil_socket_t fd, short what, void* arg);
  static void onCleanup(evutil_socket_t fd, short what, void* arg);

  EventBasePtr base_;
  UniqueFd wake_fd_;
  EventPtr wake_event_;
  EventPtr cleanup_event_;
  std::vector<std::unique_ptr<Deferrable>> graveyard_;
  std::mutex mutex_;  // guards posted_
  std::vector<std::function<void()>> posted_;
};

}  // namespace dmm
