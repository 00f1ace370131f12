// Counts the bytes the program holds through operator new, and their peak, so that a test can
// bound what a parser allocates for its input. Linking alloc_counter.cc replaces the global
// operator new and delete of the whole program (every variant), so it goes only into small
// dedicated binaries: the GGUF memory test and the fuzz target's replay driver, never into a
// sanitizer build (the sanitizers replace them too).
//
// Threading: the counters are atomics; any thread may allocate. The peak is process-wide.
#ifndef MOEPOOL_TESTS_FUZZ_ALLOC_COUNTER_H_
#define MOEPOOL_TESTS_FUZZ_ALLOC_COUNTER_H_

#include <cstdint>
#include <functional>

namespace moepool::testing {

// Bytes held now (as malloc_usable_size counts them).
uint64_t AllocatedBytes();

// The most bytes held at once while `fn` ran, above what was held when it started.
uint64_t PeakAllocatedDuring(const std::function<void()>& fn);

}  // namespace moepool::testing

#endif  // MOEPOOL_TESTS_FUZZ_ALLOC_COUNTER_H_
