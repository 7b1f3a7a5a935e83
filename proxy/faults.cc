#include "proxy/faults.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <random>

namespace dmm::proxy {

using stacks::CloseType;
using stacks::ConnectionCallbacks;
using stacks::IoResult;
using stacks::StackConnection;

namespace {

// A relayed connection with a reset or a stall in it. It stands between the relay and the
// stack's connection: the stack calls back here, and the relay sees only this object.
class FaultyConnection final : public StackConnection, private ConnectionCallbacks {
 public:
  FaultyConnection(EventLoop& loop, std::unique_ptr<StackConnection> inner,
                   std::optional<std::uint64_t> reset_after,
                   std::optional<std::uint64_t> stall_after, StallDirection direction)
      : loop_(loop),
        inner_(std::move(inner)),
        reset_after_(reset_after),
        stall_after_(stall_after),
        direction_(direction) {}

  void setCallbacks(ConnectionCallbacks& callbacks) override {
    callbacks_ = &callbacks;
    inner_->setCallbacks(*this);
  }

  IoResult read(std::span<std::byte> buffer) override {
    if (reset_) return IoResult::fromErrno(ECONNRESET);
    if (stalled(StallDirection::kReceive)) return IoResult::wouldBlock();
    auto r = inner_->read(limit(buffer));
    if (r.status == IoResult::Status::kOk) return count(r);
    return r;
  }

  IoResult write(std::span<const std::byte> data) override {
    if (reset_) return IoResult::fromErrno(ECONNRESET);
    if (stalled(StallDirection::kSend)) return IoResult::wouldBlock();
    auto r = inner_->write(limit(data));
    if (r.status == IoResult::Status::kOk) return count(r);
    return r;
  }

  void shutdownWrite() override {
    if (!reset_) inner_->shutdownWrite();
  }
  void close(CloseType type) override {
    if (!reset_) inner_->close(type);
    reset_ = true;
  }
  // No splice: every byte passes the counters here.
  int fd() const override { return -1; }
  bool mayBeReadable() const override { return reset_ || inner_->mayBeReadable(); }
  std::optional<SocketAddress> peerAddress() const override { return inner_->peerAddress(); }

 private:
  bool stalled(StallDirection d) const {
    return stall_after_ && bytes_ >= *stall_after_ &&
           (direction_ == d || direction_ == StallDirection::kBoth);
  }
  // Moves at most up to the next threshold, so that it strikes at the byte it names.
  template <class Span>
  Span limit(Span s) const {
    std::uint64_t room = UINT64_MAX;
    if (reset_after_ && *reset_after_ > bytes_) room = *reset_after_ - bytes_;
    if (stall_after_ && *stall_after_ > bytes_) room = std::min(room, *stall_after_ - bytes_);
    return s.size() > room ? s.first(static_cast<std::size_t>(room)) : s;
  }
  IoResult count(IoResult r) {
    bytes_ += r.bytes;
    if (reset_after_ && bytes_ >= *reset_after_) {
      // The peer sees a reset at once; the relay at its next read or write, which an event
      // makes sure of (the stack's connection is closed: no more events come from it).
      inner_->close(CloseType::kAbort);
      reset_ = true;
      r.drained = false;
      loop_.post([this, alive = std::weak_ptr<bool>(alive_)] {
        if (!alive.expired() && callbacks_ != nullptr) callbacks_->onReadable(*this);
      });
    }
    return r;
  }

  void onConnected(StackConnection&) override { callbacks_->onConnected(*this); }
  void onConnectFailed(StackConnection&, Error error) override {
    callbacks_->onConnectFailed(*this, error);
  }
  void onReadable(StackConnection&) override {
    if (!stalled(StallDirection::kReceive)) callbacks_->onReadable(*this);
  }
  void onWritable(StackConnection&) override {
    if (!stalled(StallDirection::kSend)) callbacks_->onWritable(*this);
  }

  EventLoop& loop_;
  std::unique_ptr<StackConnection> inner_;
  ConnectionCallbacks* callbacks_ = nullptr;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  std::optional<std::uint64_t> reset_after_;
  std::optional<std::uint64_t> stall_after_;
  StallDirection direction_;
  std::uint64_t bytes_ = 0;
  bool reset_ = false;
};

}  // namespace

FaultInjector::FaultInjector(const std::vector<std::string>& stack_names,
                             prometheus::Registry& registry) {
  auto& injected = prometheus::BuildCounter()
                       .Name("dmm_sidecar_faults_injected_total")
                       .Help("Faults injected on purpose (fault injection, off by default).")
                       .Register(registry);
  auto& probability = prometheus::BuildGauge()
                          .Name("dmm_sidecar_fault_probability")
                          .Help("The probability of each armed fault per stack instance (0: off).")
                          .Register(registry);
  stacks_.resize(stack_names.size());
  for (std::size_t s = 0; s < stack_names.size(); ++s) {
    for (std::size_t f = 0; f < static_cast<std::size_t>(Fault::kCount); ++f) {
      std::map<std::string, std::string> labels{{"stack", stack_names[s]},
                                                {"fault", faultName(static_cast<Fault>(f))}};
      stacks_[s].injected[f] = &injected.Add(labels);
      stacks_[s].probability[f] = &probability.Add(labels);
    }
  }
}

void FaultInjector::set(std::size_t stack, const FaultPlan& plan) {
  std::lock_guard lock(mu_);
  auto& s = stacks_.at(stack);
  s.plan = plan;
  for (std::size_t f = 0; f < plan.probability.size(); ++f)
    s.probability[f]->Set(plan.probability[f]);
  bool any = false;
  for (const auto& other : stacks_)
    any = any || other.plan.armed();
  armed_.store(any, std::memory_order_relaxed);
}

FaultPlan FaultInjector::plan(std::size_t stack) const {
  std::lock_guard lock(mu_);
  return stacks_.at(stack).plan;
}

bool FaultInjector::draw(double p) {
  if (p >= 1) return true;
  if (p <= 0) return false;
  thread_local std::minstd_rand rng{std::random_device{}()};
  return std::uniform_real_distribution<double>(0, 1)(rng) < p;
}

bool FaultInjector::strike(std::size_t stack, Fault fault) {
  if (!armed() || stack >= stacks_.size()) return false;
  double p = 0;
  {
    std::lock_guard lock(mu_);
    p = stacks_[stack].plan[fault];
  }
  if (!draw(p)) return false;
  stacks_[stack].injected[static_cast<std::size_t>(fault)]->Increment();
  return true;
}

ConnectFailure FaultInjector::connectFailure(std::size_t stack) const {
  std::lock_guard lock(mu_);
  return stacks_.at(stack).plan.connect_failure;
}

std::unique_ptr<StackConnection> FaultInjector::wrapRelayed(EventLoop& loop, std::size_t stack,
                                                            std::unique_ptr<StackConnection> conn) {
  if (!armed() || stack >= stacks_.size()) return conn;
  FaultPlan p = plan(stack);
  std::optional<std::uint64_t> reset_after;
  std::optional<std::uint64_t> stall_after;
  if (strike(stack, Fault::kReset)) reset_after = p.reset_after;
  if (strike(stack, Fault::kStall)) stall_after = p.stall_after;
  if (!reset_after && !stall_after) return conn;
  return std::make_unique<FaultyConnection>(loop, std::move(conn), reset_after, stall_after,
                                            p.stall_direction);
}

}  // namespace dmm::proxy
