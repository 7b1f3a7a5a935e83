// The shared-memory ring of preload stage 2 (preload/shm_ring.h): byte order across the wrap,
// partial puts and gets, peeking, the wake-up flags, and what the sidecar's side does with
// positions the other process wrote to be hostile.

#include "preload/shm_ring.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

namespace dmm::preload::shm {
namespace {

constexpr std::uint32_t kSmall = 4096;

class ShmRing : public ::testing::Test {
 protected:
  void SetUp() override {
    size_ = mappingBytes(kSmall);
    mem_ = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(mem_, MAP_FAILED);
    ASSERT_TRUE(initialise(mem_, kSmall));
  }
  void TearDown() override { ::munmap(mem_, size_); }
  void* mem_ = nullptr;
  std::size_t size_ = 0;
};

TEST_F(ShmRing, BytesComeOutInOrderAcrossTheWrapAndPartially) {
  Ring producer = upRing(mem_, kSmall);
  Ring consumer = upRing(mem_, kSmall);
  std::mt19937 rng(7);
  std::uint8_t next_in = 0;
  std::uint8_t next_out = 0;
  std::size_t moved = 0;
  while (moved < 10 * kSmall) {
    std::vector<std::uint8_t> chunk(rng() % 3000 + 1);
    for (auto& b : chunk)
      b = next_in++;
    std::size_t put = producer.put(chunk.data(), chunk.size());
    EXPECT_LE(put, chunk.size());
    next_in = static_cast<std::uint8_t>(next_in - (chunk.size() - put));  // not taken
    std::vector<std::uint8_t> out(rng() % 3000 + 1);
    std::size_t got = consumer.get(out.data(), out.size());
    for (std::size_t i = 0; i < got; ++i)
      ASSERT_EQ(out[i], next_out++) << "at byte " << moved + i;
    moved += got;
    EXPECT_LE(consumer.readable(), kSmall);
  }
}

TEST_F(ShmRing, AFullRingTakesNothingAndPeekLeavesTheBytes) {
  Ring r = downRing(mem_, kSmall);
  std::vector<std::uint8_t> data(kSmall + 100, 0x5a);
  EXPECT_EQ(r.put(data.data(), data.size()), kSmall);
  EXPECT_EQ(r.writable(), 0u);
  EXPECT_EQ(r.put(data.data(), 1), 0u);
  std::uint8_t b[10];
  EXPECT_EQ(r.get(b, sizeof b, /*peek=*/true), 10u);
  EXPECT_EQ(r.readable(), kSmall);
  iovec two[2] = {{b, 4}, {b + 4, 6}};
  EXPECT_EQ(r.get(two, 2, 10, false), 10u);
  EXPECT_EQ(r.readable(), kSmall - 10);
  EXPECT_EQ(r.get(nullptr, 0, 100, false), 100u);  // dropped (MSG_TRUNC)
  EXPECT_EQ(r.writable(), 110u);
}

TEST_F(ShmRing, HostilePositionsAreClampedToTheRing) {
  // What an application may write into the page the sidecar reads: the sidecar never copies
  // more than its buffer nor outside the ring.
  auto* h = static_cast<Header*>(mem_);
  Ring sidecar_up = upRing(mem_, kSmall);
  h->up.head.store(std::uint64_t{1} << 62);  // claims 2^62 bytes ready
  std::vector<std::uint8_t> buf(3 * kSmall);
  EXPECT_EQ(sidecar_up.readable(), kSmall);
  EXPECT_EQ(sidecar_up.get(buf.data(), buf.size()), kSmall);
  Ring sidecar_down = downRing(mem_, kSmall);
  h->down.tail.store(std::uint64_t{1} << 62);  // claims to have consumed the future
  EXPECT_EQ(sidecar_down.writable(), 0u);
  EXPECT_EQ(sidecar_down.put(buf.data(), buf.size()), 0u);
  h->down.tail.store(0);
  h->down.head.store(~std::uint64_t{0});  // behind the tail: "more than full"
  EXPECT_EQ(sidecar_down.writable(), 0u);
}

TEST_F(ShmRing, WakeUpFlagsAreTakenOnce) {
  Ring r = upRing(mem_, kSmall);
  EXPECT_TRUE(r.takeConsumerArmed());  // armed from the start: the first byte wakes
  EXPECT_FALSE(r.takeConsumerArmed());
  EXPECT_FALSE(r.takeProducerWaiting());
  r.control().producer_waiting.store(1);
  EXPECT_TRUE(r.takeProducerWaiting());
  EXPECT_FALSE(r.takeProducerWaiting());
  r.control().consumer_armed.store(1);
  EXPECT_TRUE(r.emptyAfterArming());
  std::uint8_t b = 1;
  r.put(&b, 1);
  EXPECT_FALSE(r.emptyAfterArming());
}

TEST_F(ShmRing, TwoProcessesWritingUnderTheApplicationLockLoseNothing) {
  // A parent and a fork()ed child share the application's side of a ring, as after fork();
  // the process-shared lock keeps their puts whole. Each puts 4-byte records; the consumer
  // (this process, after both end) sees every record of each writer, in that writer's order.
  auto* h = static_cast<Header*>(mem_);
  Ring r = upRing(mem_, kSmall);
  constexpr std::uint32_t kRecords = 200;
  auto writer = [&](std::uint32_t tag) {
    for (std::uint32_t i = 0; i < kRecords;) {
      std::uint32_t rec = (tag << 16) | i;
      pthread_mutex_lock(&h->up.app_lock);
      bool ok = r.writable() >= sizeof rec;
      if (ok) r.put(&rec, sizeof rec);
      pthread_mutex_unlock(&h->up.app_lock);
      if (ok)
        ++i;
      else
        ::usleep(100);
    }
  };
  std::vector<std::uint32_t> seen;
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    writer(2);
    ::_exit(0);
  }
  std::thread parent_writer([&] { writer(1); });
  std::uint32_t next[3] = {0, 0, 0};
  while (seen.size() < 2 * kRecords) {
    std::uint32_t rec;
    if (r.readable() >= sizeof rec) {
      ASSERT_EQ(r.get(&rec, sizeof rec), sizeof rec);
      std::uint32_t tag = rec >> 16;
      ASSERT_TRUE(tag == 1 || tag == 2) << std::hex << rec;
      ASSERT_EQ(rec & 0xffff, next[tag]++);
      seen.push_back(rec);
    }
  }
  parent_writer.join();
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

}  // namespace
}  // namespace dmm::preload::shm
