#pragma once
// The shim's configuration: which connections it captures, where the sidecar listens, what
// happens when it is not there. Read once per process from a key=value file and the
// environment (the environment wins); bad input is reported as warnings and otherwise
// ignored, never fatal: a typo must not take the application down.
//
// Everything here is plain data of fixed size once loaded, so the connect() path reads it
// without allocating, and constant-initialised: the shim's copy exists before any constructor
// of the process runs (an interposed call may come first). Self-contained (libc and the standard
// library only), like the shim.

#include <netinet/in.h>
#include <sys/un.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace dmm::preload {

inline constexpr const char* kDefaultConfigPath = "/etc/dmm-sidecar/preload.conf";
inline constexpr int kDefaultTimeoutMs = 1000;
inline constexpr std::size_t kMaxCidrs = 32;
inline constexpr std::size_t kMaxQosBytes = 32;

// One IPv4 or IPv6 prefix.
struct CidrPrefix {
  int family = 0;  // AF_INET or AF_INET6
  std::uint8_t address[16] = {};
  unsigned prefix = 0;
};

// A destination as the filter sees it: IPv4-mapped IPv6 addresses are already unmapped.
struct Address {
  int family = 0;
  std::uint8_t bytes[16] = {};
};

struct CidrList {
  CidrPrefix items[kMaxCidrs];
  std::size_t size = 0;
  bool contains(const Address& a) const;
};

enum class Fallback { kDirect, kRefuse };

struct ShimConfig {
  char socket_path[sizeof(sockaddr_un{}.sun_path)] = "/run/dmm-sidecar/preload.sock";
  char qos[kMaxQosBytes + 1] = {};  // "" = no hint
  CidrList include;                 // empty = every address
  CidrList exclude;
  Fallback fallback = Fallback::kDirect;
  bool debug = false;
  // Ask the sidecar for the shared-memory data path (stage 2) for fds with FD_CLOEXEC.
  bool shm = false;
  int timeout_ms = kDefaultTimeoutMs;

  // Whether a connection to `a` is handed to the sidecar. Loopback and unspecified addresses
  // never are, whatever the lists say: they are this host, and the sidecar's own local
  // connections (metrics, admin, direct fallbacks to local servers) must not loop back to it.
  // Nor are IPv6 link-local ones: without the application's scope id the sidecar cannot dial
  // them.
  bool captures(const Address& a) const;
};

// Applies one setting (`key` as in the file: socket, qos, include, exclude, fallback, debug, shm,
// timeout_ms). A bad key or value leaves the setting as it was and adds a warning that names
// `where` (e.g. "/etc/dmm-sidecar/preload.conf:3" or "DMM_PRELOAD_QOS").
void applySetting(ShimConfig& config, std::string_view key, std::string_view value,
                  const std::string& where, std::vector<std::string>& warnings);

// Applies the `key = value` lines of a file's text (`#` comments, blank lines, optional
// double quotes around the value).
void applyFileText(ShimConfig& config, std::string_view text, const std::string& path,
                   std::vector<std::string>& warnings);

// The whole load: defaults, then the file (DMM_PRELOAD_CONFIG or the default path; a missing
// default file is not a warning, a missing named one is), then the DMM_PRELOAD_* variables.
// `getenv` is a parameter so that tests need not touch the process's environment.
ShimConfig loadConfig(const char* (*getenv_fn)(const char*), std::vector<std::string>& warnings);

// Parses "10.0.0.0/8,fd00::/8,192.0.2.7" (a bare address is a full-length prefix).
bool parseCidrList(std::string_view text, CidrList& out, std::string& error);

// True for the classes the policy knows: default, latency, bulk, background.
bool knownQosClass(std::string_view name);

}  // namespace dmm::preload
