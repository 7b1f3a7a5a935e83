// The RDMA test bed's own tests (ctest: rdma.RdmaVm.*). Each runs in a fresh QEMU guest (see
// tests/rdma/README.md) and checks what the project's RDMA tests rely on: the Soft-RoCE device
// and the two "host" addresses on it, and a real rdma_cm connection from address A to address B
// carrying a verified RDMA SEND. They also prove that dmm_add_rdma_vm_gtest() works: discovery
// on the host, each test in a guest.
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <infiniband/verbs.h>
#include <netinet/in.h>
#include <poll.h>
#include <rdma/rdma_cma.h>
#include <sys/stat.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <string>

#include <gtest/gtest.h>

namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kEventTimeout = std::chrono::seconds(20);  // TCG is slow; nothing takes this long

// The test bed's environment (tests/rdma/run-in-vm.sh); empty outside the guest.
std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

std::string errnoText() {
  return std::string(std::strerror(errno)) + " (errno " + std::to_string(errno) + ")";
}

sockaddr_in ipv4(const std::string& ip, uint16_t port) {
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  EXPECT_EQ(inet_pton(AF_INET, ip.c_str(), &sa.sin_addr), 1) << ip;
  return sa;
}

std::string addrText(const sockaddr* sa) {
  if (sa == nullptr || sa->sa_family != AF_INET) return "(not IPv4)";
  const auto* in = reinterpret_cast<const sockaddr_in*>(sa);
  std::array<char, INET_ADDRSTRLEN> buf{};
  inet_ntop(AF_INET, &in->sin_addr, buf.data(), buf.size());
  return buf.data();
}

#define REQUIRE_TEST_BED()                                               \
  ASSERT_FALSE(env("RDMAVM_IP_A").empty() || env("RDMAVM_IP_B").empty()) \
      << "not inside the RDMA test bed: run through tests/rdma/gtest-in-vm.sh (ctest -L rdma)"

TEST(RdmaVm, DeviceAndBothAddresses) {
  REQUIRE_TEST_BED();
  const std::string dev = env("RDMAVM_DEV");
  const std::string netdev = env("RDMAVM_NETDEV");
  ASSERT_EQ(dev, "rxe0");
  ASSERT_EQ(netdev, "rdma0");

  struct stat st {};
  EXPECT_EQ(stat(("/sys/class/infiniband/" + dev).c_str(), &st), 0)
      << "/sys/class/infiniband/" << dev << ": " << errnoText();

  // Both addresses, on the netdev under rxe0.
  ifaddrs* ifs = nullptr;
  ASSERT_EQ(getifaddrs(&ifs), 0) << errnoText();
  std::set<std::string> found;
  for (const ifaddrs* i = ifs; i != nullptr; i = i->ifa_next) {
    if (i->ifa_addr != nullptr && i->ifa_addr->sa_family == AF_INET && netdev == i->ifa_name) {
      found.insert(addrText(i->ifa_addr));
    }
  }
  freeifaddrs(ifs);
  EXPECT_EQ(found.count(env("RDMAVM_IP_A")), 1U) << env("RDMAVM_IP_A") << " not on " << netdev;
  EXPECT_EQ(found.count(env("RDMAVM_IP_B")), 1U) << env("RDMAVM_IP_B") << " not on " << netdev;

  // The verbs device is there and its port is up.
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  ASSERT_NE(list, nullptr) << errnoText();
  ibv_context* ctx = nullptr;
  for (int i = 0; i < n && ctx == nullptr; ++i) {
    if (dev == ibv_get_device_name(list[i])) ctx = ibv_open_device(list[i]);
  }
  ibv_free_device_list(list);
  ASSERT_NE(ctx, nullptr) << "no verbs device " << dev;
  ibv_port_attr port{};
  EXPECT_EQ(ibv_query_port(ctx, 1, &port), 0);
  EXPECT_EQ(port.state, IBV_PORT_ACTIVE);
  EXPECT_EQ(port.link_layer, IBV_LINK_LAYER_ETHERNET);
  ibv_close_device(ctx);
}

// ---- rdma_cm, one thread driving both sides --------------------------------------------------

struct ChannelDeleter {
  void operator()(rdma_event_channel* c) const { rdma_destroy_event_channel(c); }
};
using Channel = std::unique_ptr<rdma_event_channel, ChannelDeleter>;

// Waits (bounded) for the next event on `ch`; it must be `want`. Returns the event's id (for
// CONNECT_REQUEST: the new connection's id), nullptr after a failed expectation.
rdma_cm_id* expectEvent(rdma_event_channel* ch, rdma_cm_event_type want, const char* side) {
  pollfd p{ch->fd, POLLIN, 0};
  const int ms = static_cast<int>(std::chrono::milliseconds(kEventTimeout).count());
  const int r = poll(&p, 1, ms);
  if (r <= 0) {
    ADD_FAILURE() << side << ": no rdma_cm event within " << ms << " ms, wanted "
                  << rdma_event_str(want) << (r < 0 ? ": " + errnoText() : "");
    return nullptr;
  }
  rdma_cm_event* ev = nullptr;
  if (rdma_get_cm_event(ch, &ev) != 0) {
    ADD_FAILURE() << side << ": rdma_get_cm_event: " << errnoText();
    return nullptr;
  }
  const rdma_cm_event_type got = ev->event;
  const int status = ev->status;
  rdma_cm_id* id = ev->id;
  rdma_ack_cm_event(ev);
  if (got != want) {
    ADD_FAILURE() << side << ": rdma_cm event " << rdma_event_str(got) << " (status " << status
                  << "), wanted " << rdma_event_str(want);
    return nullptr;
  }
  return id;
}

// One side of a connection: its cm_id with a PD, a CQ, an RC QP and a registered 64-byte buffer.
// Destroyed in the order verbs require (QP, MR, CQ, PD, then the id).
struct Endpoint {
  rdma_cm_id* id = nullptr;
  ibv_pd* pd = nullptr;
  ibv_cq* cq = nullptr;
  ibv_mr* mr = nullptr;
  bool qp = false;
  std::array<uint8_t, 64> buf{};

  Endpoint() = default;
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;
  ~Endpoint() {
    if (qp) rdma_destroy_qp(id);
    if (mr != nullptr) ibv_dereg_mr(mr);
    if (cq != nullptr) ibv_destroy_cq(cq);
    if (pd != nullptr) ibv_dealloc_pd(pd);
    if (id != nullptr) rdma_destroy_id(id);
  }

  // PD, CQ, QP and MR on the device rdma_cm resolved for `id`.
  ::testing::AssertionResult setUpVerbs() {
    pd = ibv_alloc_pd(id->verbs);
    if (pd == nullptr) return ::testing::AssertionFailure() << "ibv_alloc_pd: " << errnoText();
    cq = ibv_create_cq(id->verbs, 4, nullptr, nullptr, 0);
    if (cq == nullptr) return ::testing::AssertionFailure() << "ibv_create_cq: " << errnoText();
    ibv_qp_init_attr attr{};
    attr.send_cq = cq;
    attr.recv_cq = cq;
    attr.qp_type = IBV_QPT_RC;
    attr.cap.max_send_wr = 2;
    attr.cap.max_recv_wr = 2;
    attr.cap.max_send_sge = 1;
    attr.cap.max_recv_sge = 1;
    if (rdma_create_qp(id, pd, &attr) != 0) {
      return ::testing::AssertionFailure() << "rdma_create_qp: " << errnoText();
    }
    qp = true;
    mr = ibv_reg_mr(pd, buf.data(), buf.size(), IBV_ACCESS_LOCAL_WRITE);
    if (mr == nullptr) return ::testing::AssertionFailure() << "ibv_reg_mr: " << errnoText();
    return ::testing::AssertionSuccess();
  }

  ibv_sge sge() const {
    return ibv_sge{reinterpret_cast<uintptr_t>(buf.data()), static_cast<uint32_t>(buf.size()),
                   mr->lkey};
  }

  // Busy-polls the CQ for one completion, bounded by kEventTimeout.
  ::testing::AssertionResult completion(ibv_wc& wc) const {
    const auto deadline = Clock::now() + kEventTimeout;
    while (Clock::now() < deadline) {
      const int n = ibv_poll_cq(cq, 1, &wc);
      if (n < 0) return ::testing::AssertionFailure() << "ibv_poll_cq failed";
      if (n == 1) {
        if (wc.status != IBV_WC_SUCCESS) {
          return ::testing::AssertionFailure() << "completion " << ibv_wc_status_str(wc.status);
        }
        return ::testing::AssertionSuccess();
      }
    }
    return ::testing::AssertionFailure() << "no completion within the deadline";
  }
};

TEST(RdmaVm, RdmaCmConnectAtoBAndSend) {
  REQUIRE_TEST_BED();
  const std::string ipA = env("RDMAVM_IP_A");
  const std::string ipB = env("RDMAVM_IP_B");

  Channel serverCh(rdma_create_event_channel());
  Channel clientCh(rdma_create_event_channel());
  ASSERT_TRUE(serverCh && clientCh) << "rdma_create_event_channel: " << errnoText();

  // Server: listen on B, on a port rdma_cm picks.
  Endpoint listener;
  ASSERT_EQ(rdma_create_id(serverCh.get(), &listener.id, nullptr, RDMA_PS_TCP), 0) << errnoText();
  sockaddr_in bAddr = ipv4(ipB, 0);
  ASSERT_EQ(rdma_bind_addr(listener.id, reinterpret_cast<sockaddr*>(&bAddr)), 0)
      << "rdma_bind_addr " << ipB << ": " << errnoText();
  ASSERT_EQ(rdma_listen(listener.id, 1), 0) << errnoText();
  const uint16_t port = ntohs(rdma_get_src_port(listener.id));
  ASSERT_NE(port, 0);
  ASSERT_NE(listener.id->verbs, nullptr) << "bound to " << ipB << " but not to an RDMA device";
  EXPECT_STREQ(ibv_get_device_name(listener.id->verbs->device), env("RDMAVM_DEV").c_str());

  // Client: from A to B.
  Endpoint client;
  ASSERT_EQ(rdma_create_id(clientCh.get(), &client.id, nullptr, RDMA_PS_TCP), 0) << errnoText();
  sockaddr_in aAddr = ipv4(ipA, 0);
  sockaddr_in dst = ipv4(ipB, port);
  const int resolveMs = static_cast<int>(std::chrono::milliseconds(kEventTimeout).count());
  ASSERT_EQ(rdma_resolve_addr(client.id, reinterpret_cast<sockaddr*>(&aAddr),
                              reinterpret_cast<sockaddr*>(&dst), resolveMs),
            0)
      << errnoText();
  ASSERT_NE(expectEvent(clientCh.get(), RDMA_CM_EVENT_ADDR_RESOLVED, "client"), nullptr);
  ASSERT_EQ(rdma_resolve_route(client.id, resolveMs), 0) << errnoText();
  ASSERT_NE(expectEvent(clientCh.get(), RDMA_CM_EVENT_ROUTE_RESOLVED, "client"), nullptr);
  ASSERT_TRUE(client.setUpVerbs());
  rdma_conn_param param{};
  param.responder_resources = 1;
  param.initiator_depth = 1;
  param.retry_count = 7;
  param.rnr_retry_count = 7;
  ASSERT_EQ(rdma_connect(client.id, &param), 0) << errnoText();

  // Server: the request, a receive posted before accepting, accept.
  Endpoint conn;
  conn.id = expectEvent(serverCh.get(), RDMA_CM_EVENT_CONNECT_REQUEST, "server");
  ASSERT_NE(conn.id, nullptr);
  ASSERT_TRUE(conn.setUpVerbs());
  ibv_sge rsge = conn.sge();
  ibv_recv_wr rwr{};
  rwr.wr_id = 1;
  rwr.sg_list = &rsge;
  rwr.num_sge = 1;
  ibv_recv_wr* badR = nullptr;
  ASSERT_EQ(ibv_post_recv(conn.id->qp, &rwr, &badR), 0);
  ASSERT_EQ(rdma_accept(conn.id, &param), 0) << errnoText();

  // ESTABLISHED on both sides.
  ASSERT_NE(expectEvent(clientCh.get(), RDMA_CM_EVENT_ESTABLISHED, "client"), nullptr);
  ASSERT_NE(expectEvent(serverCh.get(), RDMA_CM_EVENT_ESTABLISHED, "server"), nullptr);

  // The connection is A <-> B, on the test bed's device.
  EXPECT_EQ(addrText(rdma_get_local_addr(client.id)), ipA);
  EXPECT_EQ(addrText(rdma_get_peer_addr(client.id)), ipB);
  EXPECT_EQ(addrText(rdma_get_local_addr(conn.id)), ipB);
  EXPECT_EQ(addrText(rdma_get_peer_addr(conn.id)), ipA);
  EXPECT_STREQ(ibv_get_device_name(client.id->verbs->device), env("RDMAVM_DEV").c_str());

  // One SEND of 64 bytes, A -> B, checked byte for byte.
  for (size_t i = 0; i < client.buf.size(); ++i)
    client.buf[i] = static_cast<uint8_t>(i * 7 + 3);
  ibv_sge ssge = client.sge();
  ibv_send_wr swr{};
  swr.wr_id = 2;
  swr.sg_list = &ssge;
  swr.num_sge = 1;
  swr.opcode = IBV_WR_SEND;
  swr.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* badS = nullptr;
  ASSERT_EQ(ibv_post_send(client.id->qp, &swr, &badS), 0);
  ibv_wc wc{};
  ASSERT_TRUE(client.completion(wc)) << "client send";
  EXPECT_EQ(wc.opcode, IBV_WC_SEND);
  ASSERT_TRUE(conn.completion(wc)) << "server receive";
  EXPECT_EQ(wc.opcode, IBV_WC_RECV);
  EXPECT_EQ(wc.wr_id, 1U);
  EXPECT_EQ(wc.byte_len, 64U);
  EXPECT_EQ(conn.buf, client.buf);

  // Orderly close, DISCONNECTED on both sides: the client's DREQ reaches the server, whose own
  // rdma_disconnect answers it (DREP); only then does the client see DISCONNECTED.
  ASSERT_EQ(rdma_disconnect(client.id), 0) << errnoText();
  ASSERT_NE(expectEvent(serverCh.get(), RDMA_CM_EVENT_DISCONNECTED, "server"), nullptr);
  ASSERT_EQ(rdma_disconnect(conn.id), 0) << errnoText();
  EXPECT_NE(expectEvent(clientCh.get(), RDMA_CM_EVENT_DISCONNECTED, "client"), nullptr);
}

}  // namespace
