#include "proxy/kernel_relay.h"

#include <linux/sockios.h>
#include <linux/tcp.h>  // struct tcp_info with tcpi_bytes_acked (glibc's lacks it)
#include <netinet/in.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <vector>

#include "common/unique_fd.h"

#ifdef DMM_KERNEL_RELAY
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "proxy/kernel_relay_bpf.h"  // generated: kKernelRelayBpf, the compiled program
#endif

namespace dmm::proxy {

Result<std::uint64_t> sentCount(int fd) {
  // Acknowledged bytes first, then the send queue: an acknowledgement landing between the two
  // makes the sum smaller than the truth, never larger.
  tcp_info info{};
  socklen_t len = sizeof info;
  if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return Error{errno, "tcp_info"};
  if (len < offsetof(tcp_info, tcpi_bytes_acked) + sizeof info.tcpi_bytes_acked)
    return Error{ENOTSUP, "tcp_info_too_old"};
  int queued = 0;
  if (::ioctl(fd, SIOCOUTQ, &queued) != 0) return Error{errno, "siocoutq"};
  return static_cast<std::uint64_t>(info.tcpi_bytes_acked) + static_cast<std::uint64_t>(queued);
}

#ifdef DMM_KERNEL_RELAY

// The BPF side's values (kernel_relay.bpf.c).
struct FlowState {
  std::uint64_t moved;
  std::uint32_t passing;
  std::uint32_t asked;
};
struct FlowCredit {
  std::uint64_t limit;
  std::uint32_t epoch;
  std::uint32_t low;
};
struct FlowEvent {
  std::uint64_t cookie;
  std::uint32_t kind;
  std::uint32_t pad;
};

struct KernelRelay::Maps {
  bpf_object* object = nullptr;
  int sources = -1;
  int targets = -1;
  int states = -1;
  int credits = -1;
  int program = -1;
  ring_buffer* ring = nullptr;
  const std::function<void(std::uint64_t, Event)>* on_event = nullptr;  // during takeEvents()
  ~Maps() {
    if (ring != nullptr) ring_buffer__free(ring);
    if (program >= 0 && sources >= 0)
      (void)bpf_prog_detach2(program, sources, BPF_SK_SKB_STREAM_VERDICT);
    if (object != nullptr) bpf_object__close(object);
  }
};

namespace {

int quietLibbpf(libbpf_print_level, const char*, va_list) {
  return 0;  // create() reports one reason; libbpf's own lines would only repeat it
}

Result<std::uint64_t> cookieOf(int fd) {
  std::uint64_t cookie = 0;
  socklen_t len = sizeof cookie;
  if (::getsockopt(fd, SOL_SOCKET, SO_COOKIE, &cookie, &len) != 0) return Error{errno, "cookie"};
  return cookie;
}

std::string errnoText(const char* what, int err) {
  return std::string(what) + ": " + std::strerror(err);
}

}  // namespace

std::unique_ptr<KernelRelay> KernelRelay::create(const Options& options, std::string& why) {
  libbpf_set_print(quietLibbpf);
  auto maps = std::make_unique<Maps>();
  maps->object = bpf_object__open_mem(kKernelRelayBpf, sizeof kKernelRelayBpf, nullptr);
  if (maps->object == nullptr) {
    why = errnoText("opening the BPF object", errno);
    return nullptr;
  }
  auto entries = static_cast<std::uint32_t>(options.max_flows);
  for (const char* name : {"sources", "targets", "states", "credits"}) {
    bpf_map* map = bpf_object__find_map_by_name(maps->object, name);
    if (map == nullptr || bpf_map__set_max_entries(map, entries) != 0) {
      why = std::string("the BPF object has no map ") + name;
      return nullptr;
    }
  }
  // Events are rare (a flow asks once per quarter window, passes once): 4 bytes of ring per
  // flow, 64 KiB to 1 MiB (its pages are resident, mapped twice). A full ring drops events,
  // and a flow that missed its credit passes: slower, never wrong.
  std::uint32_t ring = 1u << 16;
  while (ring < entries * 4u && ring < (1u << 20))
    ring <<= 1;
  if (bpf_map* map = bpf_object__find_map_by_name(maps->object, "events");
      map == nullptr || bpf_map__set_max_entries(map, ring) != 0) {
    why = "the BPF object has no map events";
    return nullptr;
  }
  if (int rc = bpf_object__load(maps->object); rc != 0) {
    // EPERM: no CAP_BPF / CAP_NET_ADMIN (or locked down).
    why = errnoText("loading the BPF program", -rc);
    return nullptr;
  }
  maps->sources = bpf_object__find_map_fd_by_name(maps->object, "sources");
  maps->targets = bpf_object__find_map_fd_by_name(maps->object, "targets");
  maps->states = bpf_object__find_map_fd_by_name(maps->object, "states");
  maps->credits = bpf_object__find_map_fd_by_name(maps->object, "credits");
  int events = bpf_object__find_map_fd_by_name(maps->object, "events");
  bpf_program* prog = bpf_object__find_program_by_name(maps->object, "dmm_relay");
  maps->program = prog != nullptr ? bpf_program__fd(prog) : -1;
  if (maps->sources < 0 || maps->targets < 0 || maps->states < 0 || maps->credits < 0 ||
      events < 0 || maps->program < 0) {
    why = "the BPF object lacks its program or maps";
    return nullptr;
  }
  auto* raw = maps.get();
  maps->ring = ring_buffer__new(
      events,
      [](void* ctx, void* data, std::size_t size) -> int {
        auto* m = static_cast<Maps*>(ctx);
        if (size < sizeof(FlowEvent) || m->on_event == nullptr) return 0;
        FlowEvent e;
        std::memcpy(&e, data, sizeof e);
        if (e.kind == 1 || e.kind == 2) (*m->on_event)(e.cookie, static_cast<Event>(e.kind));
        return 0;
      },
      raw, nullptr);
  if (maps->ring == nullptr) {
    why = errnoText("mapping the event ring", errno);
    return nullptr;
  }
  if (bpf_prog_attach(maps->program, maps->sources, BPF_SK_SKB_STREAM_VERDICT, 0) != 0) {
    why = errnoText("attaching the verdict to its map", errno);
    maps->program = -1;  // nothing to detach
    return nullptr;
  }
  std::unique_ptr<KernelRelay> relay(new KernelRelay(std::move(maps), options));
  why = relay->selfTest();
  if (!why.empty()) return nullptr;
  return relay;
}

KernelRelay::KernelRelay(std::unique_ptr<Maps> maps, const Options& options)
    : maps_(std::move(maps)), options_(options) {}

KernelRelay::~KernelRelay() = default;

Result<KernelRelay::Flow> KernelRelay::attach(int src, int dst) {
  // TCP sockets only: a sockmap takes Unix and UDP sockets too, which this design is not for
  // (the preload shim's Unix connections, for one).
  for (int fd : {src, dst}) {
    int protocol = 0;
    socklen_t len = sizeof protocol;
    if (::getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) != 0)
      return Error{errno, "not_relayable"};
    if (protocol != IPPROTO_TCP) return Error{EPROTONOSUPPORT, "not_relayable"};
  }
  auto cookie = cookieOf(src);
  if (!cookie) return cookie.error();
  auto base = sentCount(dst);
  if (!base) return base.error();
  Flow flow{*cookie, *base};
  auto undo = [&](int err) -> Error {
    detach(flow);
    if (err == E2BIG || err == ENOSPC || err == ENOMEM) return Error{err, "kernel_relay_full"};
    // Not established (an end of stream already received: CLOSE_WAIT), or not TCP after all.
    if (err == EOPNOTSUPP || err == EINVAL) return Error{err, "not_relayable"};
    return Error{err, "kernel_relay_attach"};
  };
  FlowState state{0, 0, 0};
  // Asks for more once a quarter of the window is used: a burst has three quarters to go while
  // the worker answers.
  FlowCredit credit{options_.window, 1, options_.window / 4 * 3};
  if (bpf_map_update_elem(maps_->states, &flow.cookie, &state, BPF_ANY) != 0) return undo(errno);
  if (bpf_map_update_elem(maps_->credits, &flow.cookie, &credit, BPF_ANY) != 0) return undo(errno);
  std::uint64_t fd = static_cast<std::uint64_t>(dst);
  if (bpf_map_update_elem(maps_->targets, &flow.cookie, &fd, BPF_ANY) != 0) return undo(errno);
  // From here on the source's new segments go to dst.
  fd = static_cast<std::uint64_t>(src);
  if (bpf_map_update_elem(maps_->sources, &flow.cookie, &fd, BPF_ANY) != 0) return undo(errno);
  // Segments that arrived before that wait in the source's queue until something calls its
  // data_ready; setting SO_RCVLOWAT does (tcp_set_rcvlowat() -> tcp_data_ready()).
  int one = 1;
  if (::setsockopt(src, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one) != 0) return undo(errno);
  return flow;
}

std::uint64_t KernelRelay::moved(const Flow& flow) const {
  FlowState state{};
  (void)bpf_map_lookup_elem(maps_->states, &flow.cookie, &state);
  return state.moved;
}

bool KernelRelay::passing(const Flow& flow) const {
  FlowState state{};
  return bpf_map_lookup_elem(maps_->states, &flow.cookie, &state) == 0 && state.passing != 0;
}

Result<bool> KernelRelay::drained(const Flow& flow, int dst) const {
  std::uint64_t taken = moved(flow);  // before the sent count: see sentCount()
  auto sent = sentCount(dst);
  if (!sent) return sent.error();
  return *sent - flow.dst_base >= taken;
}

Status KernelRelay::grant(const Flow& flow, int dst) {
  auto sent = sentCount(dst);
  if (!sent) return sent.error();
  FlowCredit credit{};
  if (bpf_map_lookup_elem(maps_->credits, &flow.cookie, &credit) != 0)
    return Error{errno, "no_such_flow"};
  std::uint64_t limit = *sent - flow.dst_base + options_.window;
  if (limit <= credit.limit) return {};  // the target took nothing new: no more credit
  credit.limit = limit;
  credit.epoch += 1;
  // A hash map's update replaces the element whole: the verdict sees the old or the new one.
  if (bpf_map_update_elem(maps_->credits, &flow.cookie, &credit, BPF_EXIST) != 0)
    return Error{errno, "grant"};
  return {};
}

void KernelRelay::detach(const Flow& flow) {
  (void)bpf_map_delete_elem(maps_->sources, &flow.cookie);
  (void)bpf_map_delete_elem(maps_->targets, &flow.cookie);
  (void)bpf_map_delete_elem(maps_->states, &flow.cookie);
  (void)bpf_map_delete_elem(maps_->credits, &flow.cookie);
}

int KernelRelay::eventFd() const {
  return ring_buffer__epoll_fd(maps_->ring);
}

void KernelRelay::takeEvents(const std::function<void(std::uint64_t, Event)>& fn) {
  maps_->on_event = &fn;
  (void)ring_buffer__consume(maps_->ring);
  maps_->on_event = nullptr;
}

namespace {

// A connected loopback TCP pair: {the connecting end, the accepted end}.
bool loopbackPair(int listener, const sockaddr_in& at, UniqueFd& a, UniqueFd& b) {
  a = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!a || ::connect(a.get(), reinterpret_cast<const sockaddr*>(&at), sizeof at) != 0)
    return false;
  b = UniqueFd(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
  return static_cast<bool>(b);
}

// Reads exactly `want` bytes from `fd` within 2 s.
bool readExactly(int fd, std::vector<unsigned char>& out, std::size_t want) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  out.clear();
  while (out.size() < want) {
    pollfd p{fd, POLLIN, 0};
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) return false;
    unsigned char buf[4096];
    ssize_t n = ::recv(fd, buf, std::min(sizeof buf, want - out.size()), MSG_DONTWAIT);
    if (n <= 0) return false;
    out.insert(out.end(), buf, buf + n);
  }
  return out.size() == want;
}

}  // namespace

std::string KernelRelay::selfTest() {
  // client -> src (the accepted end) ==kernel==> dst -> sink: bytes waiting before attach(),
  // bytes after, the count, the drain, a flow that reaches its credit and passes, and the end
  // of stream seen on the source.
  UniqueFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in at{};
  at.sin_family = AF_INET;
  at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof at;
  if (!listener || ::bind(listener.get(), reinterpret_cast<sockaddr*>(&at), sizeof at) != 0 ||
      ::listen(listener.get(), 4) != 0 ||
      ::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&at), &len) != 0)
    return errnoText("self-test: a loopback listener", errno);
  UniqueFd client, src, dst, sink;
  if (!loopbackPair(listener.get(), at, client, src) ||
      !loopbackPair(listener.get(), at, dst, sink))
    return errnoText("self-test: loopback connections", errno);
  timeval bound{2, 0};  // a send that cannot complete fails the test instead of hanging it
  (void)::setsockopt(client.get(), SOL_SOCKET, SO_SNDTIMEO, &bound, sizeof bound);
  const std::size_t window = options_.window;
  std::vector<unsigned char> data(window + 4000);
  for (std::size_t i = 0; i < data.size(); ++i)
    data[i] = static_cast<unsigned char>(i * 7 + i / 251);
  // 1000 bytes wait in src before attach(); 2000 more come after.
  if (::send(client.get(), data.data(), 1000, 0) != 1000) return "self-test: send";
  pollfd p{src.get(), POLLIN, 0};
  if (::poll(&p, 1, 2000) != 1) return "self-test: the first bytes did not arrive";
  auto flow = attach(src.get(), dst.get());
  if (!flow) return errnoText("self-test: attach", flow.error().code);
  std::vector<unsigned char> got;
  bool ok = readExactly(sink.get(), got, 1000);
  if (!ok || !std::equal(got.begin(), got.end(), data.begin()))
    return "self-test: bytes waiting before the hand-over were not moved (or not exactly)";
  if (::send(client.get(), data.data() + 1000, 2000, 0) != 2000) return "self-test: send";
  ok = readExactly(sink.get(), got, 2000);
  if (!ok || !std::equal(got.begin(), got.end(), data.begin() + 1000))
    return "self-test: bytes after the hand-over were not moved exactly";
  if (moved(*flow) != 3000)
    return "self-test: the kernel counted " + std::to_string(moved(*flow)) + " bytes, not 3000";
  auto done = drained(*flow, dst.get());
  if (!done || !*done) return "self-test: the target's sent count does not match";
  // Past the credit (one window from the start: no grant): the rest stays with the source,
  // announced by an event, and a read takes it there.
  std::size_t rest = data.size() - 3000;
  if (::send(client.get(), data.data() + 3000, rest, 0) != static_cast<ssize_t>(rest))
    return "self-test: send";
  bool announced = false;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (!announced && std::chrono::steady_clock::now() < deadline) {
    pollfd e{eventFd(), POLLIN, 0};
    (void)::poll(&e, 1, 100);
    takeEvents([&](std::uint64_t cookie, Event event) {
      if (cookie == flow->cookie && event == Event::kPassing) announced = true;
    });
  }
  if (!announced || !passing(*flow)) return "self-test: a flow past its credit did not pass";
  std::size_t redirected = static_cast<std::size_t>(moved(*flow)) - 3000;
  if (redirected > 0) {
    if (!readExactly(sink.get(), got, redirected) ||
        !std::equal(got.begin(), got.end(), data.begin() + 3000))
      return "self-test: bytes before the credit ran out were not moved exactly";
  }
  if (!readExactly(src.get(), got, rest - redirected) ||
      !std::equal(got.begin(), got.end(), data.begin() + 3000 + static_cast<long>(redirected)))
    return "self-test: the passed bytes did not wait on the source, in order";
  // The end of stream: seen on the source, passed on by hand, arriving clean (an empty
  // segment the kernel queued on the target would break it with EPIPE).
  ::shutdown(client.get(), SHUT_WR);
  p = pollfd{src.get(), POLLRDHUP, 0};
  if (::poll(&p, 1, 2000) != 1 || (p.revents & POLLRDHUP) == 0)
    return "self-test: the end of stream did not show on the source";
  ::shutdown(dst.get(), SHUT_WR);
  p = pollfd{sink.get(), POLLIN, 0};
  unsigned char byte = 0;
  if (::poll(&p, 1, 2000) != 1 || ::recv(sink.get(), &byte, 1, MSG_DONTWAIT) != 0)
    return "self-test: the end of stream did not arrive clean";
  int err = 0;
  socklen_t err_len = sizeof err;
  if (::getsockopt(dst.get(), SOL_SOCKET, SO_ERROR, &err, &err_len) != 0 || err != 0)
    return errnoText("self-test: the target broke", err);
  detach(*flow);
  return {};
}

#else  // !DMM_KERNEL_RELAY

struct KernelRelay::Maps {};

std::unique_ptr<KernelRelay> KernelRelay::create(const Options&, std::string& why) {
  why = "built without it (no clang for BPF or no libbpf at build time)";
  return nullptr;
}
KernelRelay::KernelRelay(std::unique_ptr<Maps> maps, const Options& options)
    : maps_(std::move(maps)), options_(options) {}
KernelRelay::~KernelRelay() = default;
Result<KernelRelay::Flow> KernelRelay::attach(int, int) {
  return Error{ENOTSUP, "kernel_relay_unavailable"};
}
std::uint64_t KernelRelay::moved(const Flow&) const {
  return 0;
}
bool KernelRelay::passing(const Flow&) const {
  return false;
}
Result<bool> KernelRelay::drained(const Flow&, int) const {
  return Error{ENOTSUP, "kernel_relay_unavailable"};
}
Status KernelRelay::grant(const Flow&, int) {
  return Error{ENOTSUP, "kernel_relay_unavailable"};
}
void KernelRelay::detach(const Flow&) {}
int KernelRelay::eventFd() const {
  return -1;
}
void KernelRelay::takeEvents(const std::function<void(std::uint64_t, Event)>&) {}
std::string KernelRelay::selfTest() {
  return {};
}

#endif

}  // namespace dmm::proxy
