// Copies the tail of every layer's K/V buffer out in one dispatch: the
// entries [end, end + count) of arrays src0 .. src{N-1}, which all have the
// shape (B, H, C, D) and dtype T and are row contiguous, in every batch row or
// in one (a batched cache evicts per row). The cache then writes the tails
// back at the evicted span's start with slice updates, in place.
//
// Inputs: src0 .. src{N-1}; span (3,) int32 = [end, count, row], row -1 for
// every row.
// Output: tails (N, R, H, count, D) in T, R = B (row -1) or 1.
// Template: T, N. Grid: (N * R * H * count * D rounded up to the threadgroup, 1, 1).
// The wrapper defines MEMOSIGHT_SELECT_SOURCE(p, a), which points p at src<a>.

// ---- kernel body ----
const int B = src0_shape[0];
const int H = src0_shape[1];
const int C = src0_shape[2];
const int D = src0_shape[3];
const int end = span[0];
const int count = span[1];
const int row = span[2];
const int64_t per_array = int64_t(row < 0 ? B : 1) * H * count * D;
const int64_t i = thread_position_in_grid.x;
if (i < per_array * N) {
  const int a = i / per_array;
  int64_t e = i % per_array;
  const int d = e % D;
  e /= D;
  const int t = e % count;
  e /= count;
  // e is (output row, head); the source row is the output row or `row`
  if (row >= 0) {
    e += int64_t(row) * H;
  }
  const device T* src = src0;
  MEMOSIGHT_SELECT_SOURCE(src, a);
  tails[i] = src[(e * C + end + t) * D + d];
}
