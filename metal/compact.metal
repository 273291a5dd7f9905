// Copies the tail of every layer's K/V buffer out in one dispatch: the
// entries [end, end + count) of arrays src0 .. src{N-1}, which all have the
// shape (B, H, C, D) and dtype T and are row contiguous. The cache then writes
// the tails back at the evicted span's start with slice updates, in place.
//
// Inputs: src0 .. src{N-1}; span (2,) int32 = [end, count].
// Output: tails (N, B, H, count, D) in T.
// Template: T, N. Grid: (N * B * H * count * D rounded up to the threadgroup, 1, 1).
// The wrapper defines MEMOSIGHT_SELECT_SOURCE(p, a), which points p at src<a>.

// ---- kernel body ----
const int B = src0_shape[0];
const int H = src0_shape[1];
const int C = src0_shape[2];
const int D = src0_shape[3];
const int end = span[0];
const int count = span[1];
const int64_t per_array = int64_t(B) * H * count * D;
const int64_t i = thread_position_in_grid.x;
if (i < per_array * N) {
  const int a = i / per_array;
  int64_t e = i % per_array;
  const int d = e % D;
  e /= D;
  const int t = e % count;
  e /= count;
  const device T* src = src0;
  MEMOSIGHT_SELECT_SOURCE(src, a);
  tails[i] = src[(e * C + end + t) * D + d];
}
