#include "wire/data_tls.h"

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <memory>

#include "absl/strings/str_cat.h"

namespace moepool::wire {
namespace {

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
using BioPtr = std::unique_ptr<BIO, BioFree>;

BioPtr PemBio(const std::string& pem) {
  return BioPtr(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// Loads the certificate chain (leaf first) and the private key into `ctx`.
absl::Status UseCertificateAndKey(SSL_CTX* ctx, const std::string& cert_pem,
                                  const std::string& key_pem, const char* whose) {
  BioPtr certs = PemBio(cert_pem);
  X509* leaf = PEM_read_bio_X509(certs.get(), nullptr, nullptr, nullptr);
  if (leaf == nullptr || SSL_CTX_use_certificate(ctx, leaf) != 1) {
    if (leaf != nullptr) X509_free(leaf);
    return absl::InvalidArgumentError(
        TakeTlsError(absl::StrCat(whose, " certificate: no PEM certificate")));
  }
  X509_free(leaf);
  while (X509* more = PEM_read_bio_X509(certs.get(), nullptr, nullptr, nullptr)) {
    SSL_CTX_add0_chain_cert(ctx, more);  // takes ownership
  }
  ERR_clear_error();  // the end of the PEM data reads as an error
  BioPtr key_bio = PemBio(key_pem);
  EVP_PKEY* key = PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr);
  const bool ok = key != nullptr && SSL_CTX_use_PrivateKey(ctx, key) == 1 &&
                  SSL_CTX_check_private_key(ctx) == 1;
  if (key != nullptr) EVP_PKEY_free(key);
  if (!ok) {
    return absl::InvalidArgumentError(TakeTlsError(
        absl::StrCat(whose, " private key: missing, unreadable or not the certificate's")));
  }
  return absl::OkStatus();
}

// Adds every certificate of `pem` to the context's trust store.
absl::Status TrustCertificates(SSL_CTX* ctx, const std::string& pem, const char* what) {
  BioPtr bio = PemBio(pem);
  X509_STORE* store = SSL_CTX_get_cert_store(ctx);
  int added = 0;
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    X509_STORE_add_cert(store, cert);
    X509_free(cert);
    ++added;
  }
  ERR_clear_error();
  if (added == 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": no PEM certificate"));
  }
  return absl::OkStatus();
}

SSL_CTX* NewContext(const SSL_METHOD* method) {
  SSL_CTX* ctx = SSL_CTX_new(method);
  if (ctx != nullptr) SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  return ctx;
}

}  // namespace

std::string TakeTlsError(const std::string& fallback) {
  const unsigned long e = ERR_get_error();
  ERR_clear_error();
  if (e == 0) return fallback;
  char text[256];
  ERR_error_string_n(e, text, sizeof(text));
  return absl::StrCat(fallback, " (", text, ")");
}

absl::StatusOr<SSL_CTX*> NewDataServerContext(const std::string& cert_pem,
                                              const std::string& key_pem,
                                              const std::string& client_ca_pem) {
  SSL_CTX* ctx = NewContext(TLS_server_method());
  if (ctx == nullptr) return absl::InternalError(TakeTlsError("cannot make a TLS context"));
  absl::Status s = UseCertificateAndKey(ctx, cert_pem, key_pem, "data channel");
  if (s.ok() && !client_ca_pem.empty()) {
    s = TrustCertificates(ctx, client_ca_pem, "data channel client CA");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  }
  if (!s.ok()) {
    SSL_CTX_free(ctx);
    return s;
  }
  return ctx;
}

absl::StatusOr<SSL_CTX*> NewDataClientContext(const std::string& ca_pem,
                                              const std::string& cert_pem,
                                              const std::string& key_pem) {
  SSL_CTX* ctx = NewContext(TLS_client_method());
  if (ctx == nullptr) return absl::InternalError(TakeTlsError("cannot make a TLS context"));
  absl::Status s = ca_pem.empty() ? (SSL_CTX_set_default_verify_paths(ctx) == 1
                                         ? absl::OkStatus()
                                         : absl::InvalidArgumentError("no system CA roots"))
                                  : TrustCertificates(ctx, ca_pem, "data channel CA");
  if (s.ok() && !cert_pem.empty()) {
    s = UseCertificateAndKey(ctx, cert_pem, key_pem, "data channel client");
  }
  if (!s.ok()) {
    SSL_CTX_free(ctx);
    return s;
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  return ctx;
}

absl::Status ExpectPeerName(SSL* ssl, const std::string& name) {
  unsigned char ip[16];
  const bool is_ip =
      inet_pton(AF_INET, name.c_str(), ip) == 1 || inet_pton(AF_INET6, name.c_str(), ip) == 1;
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
  const int ok =
      is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str()) : SSL_set1_host(ssl, name.c_str());
  if (!is_ip) SSL_set_tlsext_host_name(ssl, name.c_str());
  if (ok != 1) {
    return absl::InvalidArgumentError(TakeTlsError(absl::StrCat("bad TLS peer name '", name, "'")));
  }
  return absl::OkStatus();
}

}  // namespace moepool::wire
