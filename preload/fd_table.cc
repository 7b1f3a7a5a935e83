#include "preload/fd_table.h"

#include <sched.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include <cstring>
#include <new>

namespace dmm::preload {

bool FdData::storeOption(int level, int name, const void* value, socklen_t size) {
  if (size > sizeof(StoredOption::value)) size = sizeof(StoredOption::value);
  StoredOption* slot = nullptr;
  for (std::size_t i = 0; i < option_count; ++i) {
    if (options[i].level == level && options[i].name == name) slot = &options[i];
  }
  if (slot == nullptr) {
    if (option_count == kMaxStoredOptions) return false;
    slot = &options[option_count++];
  }
  slot->level = level;
  slot->name = name;
  slot->size = size;
  std::memset(slot->value, 0, sizeof(slot->value));
  if (value != nullptr) std::memcpy(slot->value, value, size);
  return true;
}

const StoredOption* FdData::findOption(int level, int name) const {
  for (std::size_t i = 0; i < option_count; ++i) {
    if (options[i].level == level && options[i].name == name) return &options[i];
  }
  return nullptr;
}

void FdEntry::lock() const {
  while (lock_.exchange(true, std::memory_order_acquire)) {
    while (lock_.load(std::memory_order_relaxed))
      sched_yield();
  }
}

FdData FdEntry::read() const {
  lock();
  FdData copy = data_;
  unlock();
  return copy;
}

void FdEntry::write(const FdData& data) {
  update([&data](FdData& d) { d = data; });
}

void FdEntry::clear() {
  update([](FdData& d) { d = FdData{}; });
  setShm(nullptr);
}

void FdEntry::setShm(void* channel) {
  void* old = shm_.exchange(channel, std::memory_order_acq_rel);
  if (old != nullptr && fdTable().shmHooks().release != nullptr) fdTable().shmHooks().release(old);
}

void FdTable::init() {
  rlimit rl{};
  std::size_t limit = kChunkEntries;
  if (::getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    // The hard limit: an application may raise its soft limit later (servers do), and an fd
    // we cannot track is an fd we cannot capture.
    rlim_t hard = rl.rlim_max == RLIM_INFINITY ? kMaxEntries : rl.rlim_max;
    if (hard < rl.rlim_cur && rl.rlim_cur != RLIM_INFINITY) hard = rl.rlim_cur;
    limit = hard > kMaxEntries ? kMaxEntries : static_cast<std::size_t>(hard);
  }
  if (limit < kChunkEntries) limit = kChunkEntries;
  capacity_.store(limit, std::memory_order_relaxed);
}

FdEntry* FdTable::find(int fd) const {
  if (fd < 0) return nullptr;
  auto index = static_cast<std::size_t>(fd);
  if (index >= kMaxEntries) return nullptr;
  FdEntry* chunk = chunks_[index / kChunkEntries].load(std::memory_order_acquire);
  return chunk == nullptr ? nullptr : &chunk[index % kChunkEntries];
}

FdEntry* FdTable::get(int fd) {
  if (fd < 0 || static_cast<std::size_t>(fd) >= capacity()) return nullptr;
  if (FdEntry* e = find(fd)) return e;
  auto index = static_cast<std::size_t>(fd);
  // mmap, not malloc: this may run inside any libc call of any thread (close, dup, socket),
  // and allocator state is no business of ours.
  void* mem = ::mmap(nullptr, sizeof(FdEntry) * kChunkEntries, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return nullptr;
  auto* chunk = new (mem) FdEntry[kChunkEntries];
  FdEntry* expected = nullptr;
  if (!chunks_[index / kChunkEntries].compare_exchange_strong(expected, chunk,
                                                              std::memory_order_acq_rel)) {
    ::munmap(mem, sizeof(FdEntry) * kChunkEntries);  // another thread mapped it first
    chunk = expected;
  }
  return &chunk[index % kChunkEntries];
}

void FdTable::copy(int from, int to) {
  FdEntry* src = find(from);
  FdEntry* dst = find(to);
  if (src != nullptr && src->state() != FdState::kFree && src->state() != FdState::kHidden) {
    FdData data = src->read();
    data.epoll_count = 0;
    if (dst == nullptr) dst = get(to);
    if (dst != nullptr) {
      dst->write(data);
      void* channel = src->shm();
      if (channel != nullptr && hooks_.retain != nullptr) hooks_.retain(channel);
      dst->setShm(channel);
    }
  } else if (dst != nullptr && dst->state() != FdState::kFree) {
    dst->clear();
  }
}

void FdTable::clear(int fd) {
  FdEntry* e = find(fd);
  if (e != nullptr && e->state() != FdState::kFree) e->clear();
}

void FdTable::clearRange(unsigned first, unsigned last) {
  for (std::size_t c = first / kChunkEntries; c < kMaxEntries / kChunkEntries; ++c) {
    if (c * kChunkEntries > last) break;
    FdEntry* chunk = chunks_[c].load(std::memory_order_acquire);
    if (chunk == nullptr) continue;
    for (std::size_t i = 0; i < kChunkEntries; ++i) {
      std::size_t fd = c * kChunkEntries + i;
      if (fd < first || fd > last) continue;
      if (chunk[i].state() != FdState::kFree && chunk[i].state() != FdState::kHidden)
        chunk[i].clear();
    }
  }
}

long FdTable::nextHidden(unsigned first, unsigned last) const {
  for (std::size_t c = first / kChunkEntries; c < kMaxEntries / kChunkEntries; ++c) {
    if (c * kChunkEntries > last) break;
    FdEntry* chunk = chunks_[c].load(std::memory_order_acquire);
    if (chunk == nullptr) continue;
    for (std::size_t i = 0; i < kChunkEntries; ++i) {
      std::size_t fd = c * kChunkEntries + i;
      if (fd >= first && fd <= last && chunk[i].state() == FdState::kHidden)
        return static_cast<long>(fd);
    }
  }
  return -1;
}

void FdTable::resetLocksAfterFork() {
  for (auto& slot : chunks_) {
    FdEntry* chunk = slot.load(std::memory_order_relaxed);
    if (chunk == nullptr) continue;
    for (std::size_t i = 0; i < kChunkEntries; ++i)
      chunk[i].resetLock();
  }
}

namespace {
// Constant-initialised (no constructor runs), so it is usable from the first interposed call
// of the process, before any static initialiser of ours.
constinit FdTable g_table;
}  // namespace

FdTable& fdTable() {
  return g_table;
}

}  // namespace dmm::preload
