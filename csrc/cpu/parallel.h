// Parallel loop helper shared by the CPU kernels.
#pragma once
#include <cstdint>

namespace fastdiff {

// Runs fn(task) for task in [0, num_tasks) on `num_threads` threads (OpenMP when the
// build has it, serially otherwise). The caller picks tasks coarse enough that the
// per-task work dwarfs the scheduling cost.
template <typename Fn>
inline void parallel_for(int64_t num_tasks, int num_threads, Fn&& fn) {
#if defined(_OPENMP)
  if (num_threads > 1 && num_tasks > 1) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t task = 0; task < num_tasks; ++task) fn(task);
    return;
  }
#endif
  for (int64_t task = 0; task < num_tasks; ++task) fn(task);
}

}  // namespace fastdiff
