// Small helpers for propagating absl::Status through engine code.
#ifndef MOEPOOL_ENGINE_STATUS_MACROS_H_
#define MOEPOOL_ENGINE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MOEPOOL_CONCAT_INNER_(a, b) a##b
#define MOEPOOL_CONCAT_(a, b) MOEPOOL_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` yields a non-OK status.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status moepool_status_ = (expr);           \
    if (!moepool_status_.ok()) return moepool_status_; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, MakeX());` binds the value or returns the error.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(MOEPOOL_CONCAT_(moepool_statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                           \
  if (!tmp.ok()) return tmp.status();          \
  lhs = std::move(tmp).value()

#endif  // MOEPOOL_ENGINE_STATUS_MACROS_H_
