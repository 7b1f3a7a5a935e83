#include "preload/preamble.h"

#include <netinet/in.h>
#include <sys/socket.h>

#include <cstring>

namespace dmm::preload {

namespace {

constexpr std::uint8_t kMagic[4] = {'D', 'M', 'M', 'p'};
constexpr std::uint8_t kFieldDestination = 0x01;
constexpr std::uint8_t kFieldQos = 0x02;
constexpr std::uint8_t kFieldShm = 0x03;
constexpr std::uint8_t kFieldCritical = 0x80;
constexpr std::size_t kMaxQos = 32;

bool validQos(const std::string& q) {
  if (q.empty() || q.size() > kMaxQos) return false;
  for (char c : q) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::size_t addressBytes(int family) {
  return family == AF_INET ? 4 : family == AF_INET6 ? 16 : 0;
}

}  // namespace

std::size_t encodePreamble(const Preamble& p, std::span<std::uint8_t> out) {
  std::size_t addr = addressBytes(p.destination.family);
  if (addr == 0) return 0;
  if (!p.qos.empty() && !validQos(p.qos)) return 0;
  std::size_t body = 2 + 3 + addr + (p.qos.empty() ? 0 : 2 + p.qos.size()) + (p.shm ? 2 : 0);
  std::size_t total = kPreambleHeaderBytes + body;
  if (total > out.size() || total > kMaxPreambleBytes) return 0;
  std::uint8_t* w = out.data();
  std::memcpy(w, kMagic, 4);
  w[4] = kPreambleVersion;
  w[5] = 0;
  w[6] = static_cast<std::uint8_t>(body >> 8);
  w[7] = static_cast<std::uint8_t>(body & 0xff);
  w += kPreambleHeaderBytes;
  *w++ = kFieldDestination;
  *w++ = static_cast<std::uint8_t>(3 + addr);
  *w++ = p.destination.family == AF_INET ? 4 : 6;
  *w++ = static_cast<std::uint8_t>(p.destination.port >> 8);
  *w++ = static_cast<std::uint8_t>(p.destination.port & 0xff);
  std::memcpy(w, p.destination.address, addr);
  w += addr;
  if (!p.qos.empty()) {
    *w++ = kFieldQos;
    *w++ = static_cast<std::uint8_t>(p.qos.size());
    std::memcpy(w, p.qos.data(), p.qos.size());
    w += p.qos.size();
  }
  if (p.shm) {
    *w++ = kFieldShm;
    *w++ = 0;
  }
  return total;
}

bool encodePreamble(const Preamble& preamble, std::vector<std::uint8_t>& out) {
  std::uint8_t buffer[kMaxPreambleBytes];
  std::size_t n = encodePreamble(preamble, std::span<std::uint8_t>(buffer));
  if (n == 0) return false;
  out.insert(out.end(), buffer, buffer + n);
  return true;
}

DecodeResult decodePreamble(std::span<const std::uint8_t> bytes) {
  DecodeResult r;
  auto invalid = [&r](std::string why) {
    r.status = DecodeResult::Status::kInvalid;
    r.error = std::move(why);
    return r;
  };
  // The magic is checked on whatever has arrived, so that a stranger is refused at once.
  std::size_t have = bytes.size() < 4 ? bytes.size() : 4;
  if (have > 0 && std::memcmp(bytes.data(), kMagic, have) != 0) return invalid("bad magic");
  if (bytes.size() < kPreambleHeaderBytes) return r;
  if (bytes[4] != kPreambleVersion)
    return invalid("unsupported version " + std::to_string(bytes[4]));
  if (bytes[5] != 0) return invalid("reserved byte is not 0");
  std::size_t body = (std::size_t{bytes[6]} << 8) | bytes[7];
  if (kPreambleHeaderBytes + body > kMaxPreambleBytes) return invalid("too long");
  if (bytes.size() < kPreambleHeaderBytes + body) return r;
  auto fields = bytes.subspan(kPreambleHeaderBytes, body);
  bool have_destination = false;
  bool have_qos = false;
  bool have_shm = false;
  std::size_t at = 0;
  while (at < fields.size()) {
    if (fields.size() - at < 2) return invalid("truncated field header");
    std::uint8_t type = fields[at];
    std::size_t len = fields[at + 1];
    at += 2;
    if (fields.size() - at < len) return invalid("field overruns the preamble");
    auto value = fields.subspan(at, len);
    at += len;
    if (type == kFieldDestination) {
      if (have_destination) return invalid("destination given twice");
      have_destination = true;
      if (len < 3) return invalid("destination too short");
      int family = value[0] == 4 ? AF_INET : value[0] == 6 ? AF_INET6 : 0;
      if (family == 0) return invalid("destination family is neither 4 nor 6");
      if (len != 3 + addressBytes(family)) return invalid("destination has the wrong length");
      r.preamble.destination.family = family;
      r.preamble.destination.port = static_cast<std::uint16_t>((value[1] << 8) | value[2]);
      std::memcpy(r.preamble.destination.address, value.data() + 3, addressBytes(family));
      if (r.preamble.destination.port == 0) return invalid("destination port 0");
    } else if (type == kFieldQos) {
      if (have_qos) return invalid("qos given twice");
      have_qos = true;
      std::string q(reinterpret_cast<const char*>(value.data()), value.size());
      if (!validQos(q)) return invalid("qos is not 1-32 bytes of [a-z0-9_-]");
      r.preamble.qos = std::move(q);
    } else if (type == kFieldShm) {
      if (have_shm) return invalid("shm given twice");
      if (len != 0) return invalid("shm has a value");
      have_shm = true;
      r.preamble.shm = true;
    } else if ((type & kFieldCritical) != 0) {
      return invalid("unknown critical field " + std::to_string(type));
    }
  }
  if (!have_destination) return invalid("no destination");
  r.status = DecodeResult::Status::kOk;
  r.consumed = kPreambleHeaderBytes + body;
  return r;
}

}  // namespace dmm::preload
