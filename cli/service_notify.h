// Tells a supervising systemd (a Type=notify unit, deploy/systemd/) what this process is doing,
// through libsystemd's sd_notify: READY=1 once it serves, STOPPING=1 when a stop signal arrives,
// and a STATUS= line `systemctl status` shows. Without $NOTIFY_SOCKET (not started by systemd)
// every call does nothing. Thread-safe.
#ifndef MOEPOOL_CLI_SERVICE_NOTIFY_H_
#define MOEPOOL_CLI_SERVICE_NOTIFY_H_

#include <string>

namespace moepool::cli {

void NotifyReady(const std::string& status);
void NotifyStopping(const std::string& status);
void NotifyStatus(const std::string& status);

}  // namespace moepool::cli

#endif  // MOEPOOL_CLI_SERVICE_NOTIFY_H_
