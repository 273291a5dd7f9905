// Combines the key splits of attention.metal (SPLIT true) into the output.
//
// Input:  parts (S, N, D + 2) float32: per split and row the unnormalised
//         output, the running max and the softmax sum.
// Output: out (N, D) in T.
// Template: T, D. Grid: (N * D rounded up to the threadgroup, 1, 1).

// ---- kernel body ----
const int S = parts_shape[0];
const int N = parts_shape[1];
const int64_t i = thread_position_in_grid.x;
if (i < int64_t(N) * D) {
  const int64_t n = i / D;
  const int d = i % D;
  float m = -INFINITY;
  for (int s = 0; s < S; ++s) {
    m = max(m, parts[(s * N + n) * (D + 2) + D]);
  }
  float num = 0.0f;
  float den = 0.0f;
  for (int s = 0; s < S; ++s) {
    const device float* p = parts + (s * N + n) * (D + 2);
    if (p[D] != -INFINITY) {
      const float w = exp(p[D] - m);
      num += w * p[d];
      den += w * p[D + 1];
    }
  }
  out[i] = static_cast<T>(num / den);
}
