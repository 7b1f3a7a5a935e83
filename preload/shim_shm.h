#pragma once
// The shim's side of the shared-memory data path (preload stage 2, shm_ring.h): the channel a
// captured fd points to, and the I/O calls on it. Every system call here is a raw one
// (syscall()), never a libc function the shim interposes.

#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>

#include "preload/shm_ring.h"

namespace dmm::preload {

struct ShmChannel {
  std::atomic<int> refs{1};  // one per fd table entry pointing here
  void* mapping = nullptr;
  std::size_t size = 0;
  shm::Header* header = nullptr;
  shm::Ring up;      // we produce
  shm::Ring down;    // we consume
  int wake_fd = -1;  // the eventfd the sidecar waits on: a kHidden entry of the fd table
  int bell_fd = -1;  // the read end of the bell pipe a blocked reader waits on: kHidden too
};

enum class ShmReply {
  kShm,     // *out is a channel with one reference
  kStream,  // the sidecar said no: the socket carries the stream (stage 1)
  kFailed,  // no answer within the socket's receive timeout, or a bad one: errno says
};

// Reads the sidecar's one-byte answer to a preamble that asked for shared memory, on the
// blocking socket `sock` (its SO_RCVTIMEO bounds the wait), and maps what came with it.
ShmReply receiveShmReply(int sock, ShmChannel** out);

// What the application sets on the open file that decides how reads wait (shared by every
// process holding it): O_NONBLOCK and SO_RCVTIMEO.
void shmSetNonBlocking(ShmChannel* ch, bool nonblocking);
void shmSetReceiveTimeout(ShmChannel* ch, long sec, long usec);

// For the fd table's ShmHooks.
void shmRetain(void* channel);
void shmRelease(void* channel);

// read()/recv()/readv()/recvmsg() on captured fd `fd` with channel `ch`: what the kernel call
// would return (bytes, 0 at end of stream, or -1 with errno). `flags` as recv()'s.
ssize_t shmRead(ShmChannel* ch, int fd, const iovec* iov, std::size_t count, int flags);
// write()/send()/writev()/sendmsg(): the same for the other direction.
ssize_t shmWrite(ShmChannel* ch, int fd, const iovec* iov, std::size_t count, int flags);

}  // namespace dmm::preload
