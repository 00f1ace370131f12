#include "cli/service_notify.h"

#include <systemd/sd-daemon.h>

namespace moepool::cli {
namespace {

void Send(const std::string& state, const std::string& status) {
  // Keep $NOTIFY_SOCKET for the later messages (unset_environment = 0). Errors are ignored: the
  // service manager is only informed, never needed.
  const std::string message = status.empty() ? state : state + "\nSTATUS=" + status;
  sd_notify(0, message.c_str());
}

}  // namespace

void NotifyReady(const std::string& status) { Send("READY=1", status); }
void NotifyStopping(const std::string& status) { Send("STOPPING=1", status); }
void NotifyStatus(const std::string& status) { Send("STATUS=" + status, ""); }

}  // namespace moepool::cli
