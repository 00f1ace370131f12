// OpenSSL contexts for the data channel (wire/data_channel.h), from PEM contents: the worker's
// certificate chain and key (and a client CA for mutual TLS), the coordinator's trusted CAs (or
// the system roots) and optional client certificate. TLS 1.2 or later.
//
// Thread-safe: the contexts are immutable once made and may be shared by connections.
#ifndef MOEPOOL_WIRE_DATA_TLS_H_
#define MOEPOOL_WIRE_DATA_TLS_H_

#include <string>

#include "absl/status/statusor.h"

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;

namespace moepool::wire {

// The server context; INVALID_ARGUMENT naming what did not load. The caller frees it with
// SSL_CTX_free.
absl::StatusOr<SSL_CTX*> NewDataServerContext(const std::string& cert_pem,
                                              const std::string& key_pem,
                                              const std::string& client_ca_pem);
// The client context (verifies the peer); INVALID_ARGUMENT naming what did not load.
absl::StatusOr<SSL_CTX*> NewDataClientContext(const std::string& ca_pem,
                                              const std::string& cert_pem,
                                              const std::string& key_pem);
// Makes `ssl` check that the peer's certificate is for `name` (a DNS name or an IP address) and
// sends it as SNI.
absl::Status ExpectPeerName(SSL* ssl, const std::string& name);
// The newest OpenSSL error (and the queue cleared), or `fallback`.
std::string TakeTlsError(const std::string& fallback);

}  // namespace moepool::wire

#endif  // MOEPOOL_WIRE_DATA_TLS_H_
