#include "common/event_loop.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>

namespace dmm {

EventLoop::EventLoop() {
  event_config* cfg = event_config_new();
  // One thread per loop: skip libevent's internal locking; cross-thread work uses post().
  event_config_set_flag(cfg, EVENT_BASE_FLAG_NOLOCK);
  event_config_avoid_method(cfg, "select");
  event_config_avoid_method(cfg, "poll");
  base_.reset(event_base_new_with_config(cfg));
  event_config_free(cfg);
  if (!base_) throw std::runtime_error("event_base_new_with_config failed");

  wake_fd_.reset(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake_fd_) throw std::runtime_error("eventfd failed");
  wake_event_ = newEvent(wake_fd_.get(), EV_READ | EV_PERSIST, &EventLoop::onWake, this);
  event_add(wake_event_.get(), nullptr);
  cleanup_event_ = newEvent(-1, 0, &EventLoop::onCleanup, this);
}

EventLoop::~EventLoop() {
  graveyard_.clear();
  cleanup_event_.reset();
  wake_event_.reset();
}

void freeOrphanedEvent(EventPtr& ev) {
  std::free(ev.release());  // NOLINT: allocated by libevent's default mm_malloc
}

EventPtr EventLoop::newEvent(evutil_socket_t fd, short what, event_callback_fn cb,
                             void* arg) const {
  EventPtr ev(event_new(base_.get(), fd, what, cb, arg));
  if (!ev) throw std::bad_alloc();
  return ev;
}

void EventLoop::run() {
  event_base_dispatch(base_.get());
}

void EventLoop::exit() {
  post([this] { event_base_loopbreak(base_.get()); });
}

void EventLoop::post(std::function<void()> fn) {
  {
    std::lock_guard lock(mutex_);
    posted_.push_back(std::move(fn));
  }
  std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(wake_fd_.get(), &one, sizeof one);
}

void EventLoop::onWake(evutil_socket_t fd, short, void* arg) {
  auto* self = static_cast<EventLoop*>(arg);
  std::uint64_t count = 0;
  [[maybe_unused]] auto n = ::read(fd, &count, sizeof count);
  std::vector<std::function<void()>> work;
  {
    std::lock_guard lock(self->mutex_);
    work.swap(self->posted_);
  }
  for (auto& fn : work)
    fn();
}

void EventLoop::deferDelete(std::unique_ptr<Deferrable> obj) {
  if (graveyard_.empty()) event_active(cleanup_event_.get(), 0, 0);
  graveyard_.push_back(std::move(obj));
}

void EventLoop::collectGarbage() {
  while (!graveyard_.empty()) {
    std::vector<std::unique_ptr<Deferrable>> dead;
    dead.swap(graveyard_);
  }
}

void EventLoop::onCleanup(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<EventLoop*>(arg);
  // Destructors may defer more deletions; swap first so those land in a fresh batch.
  std::vector<std::unique_ptr<Deferrable>> dead;
  dead.swap(self->graveyard_);
  dead.clear();
  if (!self->graveyard_.empty()) event_active(self->cleanup_event_.get(), 0, 0);
}

}  // namespace dmm
