#include "wire/nccl_peer.h"

#include <chrono>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

#ifdef MOEPOOL_HAVE_CUDA
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include <map>
#include <thread>

#include "absl/synchronization/mutex.h"
#endif

namespace moepool::wire {

#ifndef MOEPOOL_HAVE_CUDA

namespace {

absl::Status NoCuda() {
  return absl::FailedPreconditionError(
      "NCCL needs a moepool built with CUDA (this one was built without it)");
}

}  // namespace

struct NcclPeer::State {};

absl::Status NcclUsable(const NcclOptions&, int) { return NoCuda(); }
absl::StatusOr<std::string> NcclNewUniqueId(const NcclOptions&) { return NoCuda(); }
absl::StatusOr<std::unique_ptr<NcclPeer>> NcclPeer::Connect(const std::string&, int, int,
                                                            const NcclOptions&) {
  return NoCuda();
}
NcclPeer::NcclPeer(std::unique_ptr<State> state) : state_(std::move(state)) {}
NcclPeer::~NcclPeer() = default;
int NcclPeer::device() const { return -1; }
int NcclPeer::rank() const { return -1; }
bool NcclPeer::broken() const { return true; }
absl::Status NcclPeer::Send(const void*, size_t) { return NoCuda(); }
absl::Status NcclPeer::Recv(void*, size_t) { return NoCuda(); }

#else  // MOEPOOL_HAVE_CUDA

namespace {

using Clock = std::chrono::steady_clock;

// The NCCL functions used, resolved from the library at run time (types from nccl.h).
struct NcclApi {
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRankConfig) init_rank_config = nullptr;
  decltype(&ncclCommGetAsyncError) get_async_error = nullptr;
  decltype(&ncclCommAbort) abort = nullptr;
  decltype(&ncclSend) send = nullptr;
  decltype(&ncclRecv) recv = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;
};

template <typename F>
bool Resolve(void* handle, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(handle, name));
  return *out != nullptr;
}

// Loads `library` once per process (handles are never closed); thread-safe.
absl::StatusOr<const NcclApi*> LoadNccl(const std::string& library) {
  static absl::Mutex mu;
  static auto* loaded = new std::map<std::string, absl::StatusOr<NcclApi>>;
  absl::MutexLock lock(&mu);
  auto it = loaded->find(library);
  if (it == loaded->end()) {
    absl::StatusOr<NcclApi> api = absl::UnknownError("unset");
    void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* why = dlerror();
      api = absl::UnavailableError(
          absl::StrCat("cannot load ", library, ": ", why != nullptr ? why : "unknown error"));
    } else {
      NcclApi a;
      const bool ok = Resolve(handle, "ncclGetUniqueId", &a.get_unique_id) &&
                      Resolve(handle, "ncclCommInitRankConfig", &a.init_rank_config) &&
                      Resolve(handle, "ncclCommGetAsyncError", &a.get_async_error) &&
                      Resolve(handle, "ncclCommAbort", &a.abort) &&
                      Resolve(handle, "ncclSend", &a.send) &&
                      Resolve(handle, "ncclRecv", &a.recv) &&
                      Resolve(handle, "ncclGetErrorString", &a.error_string);
      if (ok) {
        api = a;
      } else {
        api = absl::UnavailableError(
            absl::StrCat(library,
                         " lacks the functions needed (ncclCommInitRankConfig, ncclSend, ...): "
                         "NCCL 2.14 or newer is required"));
      }
    }
    it = loaded->emplace(library, std::move(api)).first;
  }
  if (!it->second.ok()) return it->second.status();
  return &*it->second;
}

absl::Status CudaError(cudaError_t e, const char* what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

absl::Status CheckDevice(int device) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) return CudaError(e, "NCCL: no usable CUDA device");
  if (device < 0 || device >= count) {
    return absl::UnavailableError(
        absl::StrCat("NCCL: CUDA device ", device, " does not exist (", count, " device(s))"));
  }
  return absl::OkStatus();
}

}  // namespace

struct NcclPeer::State {
  const NcclApi* api = nullptr;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  void* staging = nullptr;  // device buffer of staging_bytes
  size_t staging_bytes = 0;
  int device = 0;
  int rank = 0;
  double timeout_s = 30;
  bool broken = false;

  absl::Status NcclError(ncclResult_t r, const std::string& what) {
    return absl::InternalError(absl::StrCat("NCCL ", what, ": ", api->error_string(r)));
  }
  // Marks the peer broken and aborts the communicator; returns `why`.
  absl::Status Fail(absl::Status why) {
    broken = true;
    if (comm != nullptr) api->abort(comm);
    comm = nullptr;
    return why;
  }
  // Waits until the communicator's pending NCCL call has been accepted (non-blocking mode).
  absl::Status WaitComm(const std::string& what, Clock::time_point deadline) {
    for (;;) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = api->get_async_error(comm, &state);
      if (r != ncclSuccess) return Fail(NcclError(r, what));
      if (state == ncclSuccess) return absl::OkStatus();
      if (state != ncclInProgress) return Fail(NcclError(state, what));
      if (Clock::now() > deadline) {
        return Fail(absl::DeadlineExceededError(
            absl::StrCat("NCCL ", what, ": no progress in ", timeout_s, " s (peer gone?)")));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  // Waits for the stream's work, watching the communicator for asynchronous errors.
  absl::Status WaitStream(const std::string& what, Clock::time_point deadline) {
    for (;;) {
      const cudaError_t e = cudaStreamQuery(stream);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) return Fail(CudaError(e, what.c_str()));
      ncclResult_t state = ncclSuccess;
      if (api->get_async_error(comm, &state) == ncclSuccess && state != ncclSuccess &&
          state != ncclInProgress) {
        return Fail(NcclError(state, what));
      }
      if (Clock::now() > deadline) {
        return Fail(absl::DeadlineExceededError(
            absl::StrCat("NCCL ", what, ": not finished in ", timeout_s, " s (peer gone?)")));
      }
      std::this_thread::yield();
    }
  }
  absl::Status Prepare(size_t bytes) {
    if (broken) return absl::FailedPreconditionError("the NCCL link is broken (failed earlier)");
    const cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) return Fail(CudaError(e, "NCCL: cudaSetDevice"));
    if (bytes <= staging_bytes) return absl::OkStatus();
    if (staging != nullptr) cudaFree(staging);
    staging = nullptr;
    staging_bytes = 0;
    const cudaError_t m = cudaMalloc(&staging, bytes);
    if (m != cudaSuccess) return Fail(CudaError(m, "NCCL: cudaMalloc of the staging buffer"));
    staging_bytes = bytes;
    return absl::OkStatus();
  }
  Clock::time_point Deadline() const {
    return Clock::now() + std::chrono::microseconds(static_cast<int64_t>(timeout_s * 1e6));
  }
};

absl::Status NcclUsable(const NcclOptions& options, int device) {
  const auto api = LoadNccl(options.library);
  if (!api.ok()) return api.status();
  return CheckDevice(device);
}

absl::StatusOr<std::string> NcclNewUniqueId(const NcclOptions& options) {
  const auto api = LoadNccl(options.library);
  if (!api.ok()) return api.status();
  ncclUniqueId id;
  const ncclResult_t r = (*api)->get_unique_id(&id);
  if (r != ncclSuccess) {
    return absl::InternalError(absl::StrCat("ncclGetUniqueId: ", (*api)->error_string(r)));
  }
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<NcclPeer>> NcclPeer::Connect(const std::string& unique_id, int rank,
                                                            int device,
                                                            const NcclOptions& options) {
  if (unique_id.size() != NCCL_UNIQUE_ID_BYTES) {
    return absl::InvalidArgumentError(absl::StrCat("an NCCL unique id has ", NCCL_UNIQUE_ID_BYTES,
                                                   " bytes, got ", unique_id.size()));
  }
  if (rank != 0 && rank != 1) {
    return absl::InvalidArgumentError(absl::StrCat("NCCL rank must be 0 or 1, got ", rank));
  }
  const auto api = LoadNccl(options.library);
  if (!api.ok()) return api.status();
  if (absl::Status s = CheckDevice(device); !s.ok()) return s;
  auto state = std::make_unique<State>();
  state->api = *api;
  state->device = device;
  state->rank = rank;
  state->timeout_s = options.timeout_s;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return CudaError(e, "NCCL: cudaSetDevice");
  e = cudaStreamCreateWithFlags(&state->stream, cudaStreamNonBlocking);
  if (e != cudaSuccess) return CudaError(e, "NCCL: cudaStreamCreate");
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), NCCL_UNIQUE_ID_BYTES);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // so joining can time out
  const ncclResult_t r = state->api->init_rank_config(&state->comm, 2, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    state->comm = nullptr;
    cudaStreamDestroy(state->stream);
    return state->NcclError(r, "ncclCommInitRankConfig");
  }
  const absl::Status joined = state->WaitComm("joining the communicator", state->Deadline());
  if (!joined.ok()) {
    cudaStreamDestroy(state->stream);
    return joined;
  }
  return std::unique_ptr<NcclPeer>(new NcclPeer(std::move(state)));
}

NcclPeer::NcclPeer(std::unique_ptr<State> state) : state_(std::move(state)) {}

NcclPeer::~NcclPeer() {
  cudaSetDevice(state_->device);
  if (state_->comm != nullptr) state_->api->abort(state_->comm);
  if (state_->staging != nullptr) cudaFree(state_->staging);
  if (state_->stream != nullptr) cudaStreamDestroy(state_->stream);
}

int NcclPeer::device() const { return state_->device; }
int NcclPeer::rank() const { return state_->rank; }
bool NcclPeer::broken() const { return state_->broken; }

absl::Status NcclPeer::Send(const void* data, size_t bytes) {
  State& s = *state_;
  if (absl::Status p = s.Prepare(bytes); !p.ok()) return p;
  if (bytes == 0) return absl::OkStatus();
  const auto deadline = s.Deadline();
  const cudaError_t e = cudaMemcpyAsync(s.staging, data, bytes, cudaMemcpyHostToDevice, s.stream);
  if (e != cudaSuccess) return s.Fail(CudaError(e, "NCCL send: cudaMemcpyAsync"));
  const ncclResult_t r = s.api->send(s.staging, bytes, ncclUint8, 1 - s.rank, s.comm, s.stream);
  if (r != ncclSuccess && r != ncclInProgress) return s.Fail(s.NcclError(r, "ncclSend"));
  if (absl::Status w = s.WaitComm("ncclSend", deadline); !w.ok()) return w;
  return s.WaitStream("ncclSend", deadline);
}

absl::Status NcclPeer::Recv(void* data, size_t bytes) {
  State& s = *state_;
  if (absl::Status p = s.Prepare(bytes); !p.ok()) return p;
  if (bytes == 0) return absl::OkStatus();
  const auto deadline = s.Deadline();
  const ncclResult_t r = s.api->recv(s.staging, bytes, ncclUint8, 1 - s.rank, s.comm, s.stream);
  if (r != ncclSuccess && r != ncclInProgress) return s.Fail(s.NcclError(r, "ncclRecv"));
  if (absl::Status w = s.WaitComm("ncclRecv", deadline); !w.ok()) return w;
  const cudaError_t e = cudaMemcpyAsync(data, s.staging, bytes, cudaMemcpyDeviceToHost, s.stream);
  if (e != cudaSuccess) return s.Fail(CudaError(e, "NCCL recv: cudaMemcpyAsync"));
  return s.WaitStream("ncclRecv", deadline);
}

#endif  // MOEPOOL_HAVE_CUDA

}  // namespace moepool::wire
