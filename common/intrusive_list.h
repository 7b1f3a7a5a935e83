#pragma once
// A minimal intrusive doubly-linked list: O(1) insert/remove without allocation, for objects
// that move between per-worker lists (timeout lists, resume queues) many times in their life.
// An object joins lists of a given Tag by deriving from ListHook<Tag>; it can be in one list per
// tag at a time, and leaves it automatically when destroyed.

#include <cstddef>

namespace dmm {

template <class Tag>
class ListHook {
 public:
  ListHook() = default;
  ListHook(const ListHook&) = delete;
  ListHook& operator=(const ListHook&) = delete;
  ~ListHook() { unlinkFromList(); }

  bool linkedInList() const { return next_ != nullptr; }
  void unlinkFromList() {
    if (next_ == nullptr) return;
    prev_->next_ = next_;
    next_->prev_ = prev_;
    prev_ = next_ = nullptr;
  }

 private:
  template <class T, class U>
  friend class IntrusiveList;
  ListHook* prev_ = nullptr;
  ListHook* next_ = nullptr;
};

template <class T, class Tag>
class IntrusiveList {
  using Hook = ListHook<Tag>;

 public:
  IntrusiveList() { head_.prev_ = head_.next_ = &head_; }
  IntrusiveList(const IntrusiveList&) = delete;
  IntrusiveList& operator=(const IntrusiveList&) = delete;
  ~IntrusiveList() {
    while (!empty())
      remove(*front());
    head_.prev_ = head_.next_ = nullptr;
  }

  bool empty() const { return head_.next_ == &head_; }
  T* front() const { return empty() ? nullptr : static_cast<T*>(head_.next_); }
  // Appends, or moves to the back if already in a list of this tag.
  void pushBack(T& item) {
    Hook& h = item;
    h.unlinkFromList();
    h.prev_ = head_.prev_;
    h.next_ = &head_;
    head_.prev_->next_ = &h;
    head_.prev_ = &h;
  }
  static void remove(T& item) { static_cast<Hook&>(item).unlinkFromList(); }
  // Calls fn(const T&) for each item, front to back; fn must not change the list.
  template <class Fn>
  void forEach(Fn&& fn) const {
    for (const Hook* h = head_.next_; h != &head_; h = h->next_)
      fn(static_cast<const T&>(*h));
  }
  // Calls fn(T&) for each item, front to back; fn may remove the item it is given (and only
  // that one).
  template <class Fn>
  void forEachRemovable(Fn&& fn) {
    for (Hook* h = head_.next_; h != &head_;) {
      Hook* next = h->next_;
      fn(static_cast<T&>(*h));
      h = next;
    }
  }
  std::size_t size() const {
    std::size_t n = 0;
    for (const Hook* h = head_.next_; h != &head_; h = h->next_)
      ++n;
    return n;
  }

 private:
  Hook head_;
};

}  // namespace dmm
