#include "stacks/stack.h"

#include <cerrno>

#include "stacks/kernel/kernel_stack.h"
#ifdef DMM_WITH_DPDK
#include "stacks/dpdk/dpdk_stack.h"
#endif
#ifdef DMM_WITH_RDMA
#include "stacks/rdma/rdma_stack.h"
#endif

namespace dmm::stacks {

IoResult IoResult::fromErrno(int e) {
  switch (e) {
    case EAGAIN:
      return wouldBlock();
    case ECONNRESET:
    case EPIPE:
    case ECONNABORTED:
      return {Status::kReset, 0, e};
    default:
      return {Status::kError, 0, e};
  }
}

Result<std::vector<std::uint8_t>> Stack::expectData(EventLoop&, const SessionToken&,
                                                    std::span<const std::uint8_t>, DataAcceptor&) {
  return Error{EOPNOTSUPP, "no_data_path"};
}

void Stack::cancelData(EventLoop&, const SessionToken&) {}

Result<std::unique_ptr<StackConnection>> Stack::connectData(EventLoop&,
                                                            std::span<const std::uint8_t>,
                                                            const SessionToken&,
                                                            ConnectionCallbacks&) {
  return Error{EOPNOTSUPP, "no_data_path"};
}

void StackRegistry::add(std::unique_ptr<StackFactory> factory) {
  factories_.push_back(std::move(factory));
}

const StackFactory* StackRegistry::find(std::string_view kind) const {
  for (const auto& f : factories_) {
    if (f->kind() == kind) return f.get();
  }
  return nullptr;
}

std::vector<std::string> StackRegistry::kinds() const {
  std::vector<std::string> out;
  for (const auto& f : factories_)
    out.emplace_back(f->kind());
  return out;
}

void registerBuiltinStacks(StackRegistry& registry) {
  registry.add(std::make_unique<kernel::KernelStackFactory>());
#ifdef DMM_WITH_DPDK
  registry.add(std::make_unique<dpdk::DpdkStackFactory>());
#endif
#ifdef DMM_WITH_RDMA
  registry.add(std::make_unique<rdma::RdmaStackFactory>());
#endif
}

}  // namespace dmm::stacks
