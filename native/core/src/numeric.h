// numpy's float arithmetic, reproduced: pairwise summation, argmax.
#ifndef SMTM_CORE_NUMERIC_H_
#define SMTM_CORE_NUMERIC_H_

#include <cmath>
#include <cstddef>

namespace smtm::internal {

// numpy's pairwise summation (loops_utils.h `pairwise_sum`) over n
// contiguous values, accumulating in T: below 8 values a plain loop; up to
// 128, eight accumulators combined as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))
// then the remainder in order; above, split at n/2 rounded down to a
// multiple of 8. This is what `x.sum(axis=-1)` computes for float32 and
// float64 rows that are contiguous.
template <typename T>
T PairwiseSum(const T* a, size_t n) {
  if (n < 8) {
    T res = 0;
    for (size_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    T r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i < n - (n % 8); i += 8) {
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    }
    T res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  size_t n2 = n / 2;
  n2 -= n2 % 8;
  return PairwiseSum(a, n2) + PairwiseSum(a + n2, n - n2);
}

// numpy's argmax: the first maximum; a NaN counts as the maximum (the first NaN wins).
template <typename T>
size_t ArgMax(const T* a, size_t n) {
  size_t best = 0;
  T mp = a[0];
  if (std::isnan(mp)) return 0;
  for (size_t i = 1; i < n; ++i) {
    if (!(a[i] <= mp)) {
      mp = a[i];
      best = i;
      if (std::isnan(mp)) break;
    }
  }
  return best;
}

}  // namespace smtm::internal

#endif  // SMTM_CORE_NUMERIC_H_
