// MemoSight-masked attention of a block of queries over the KV cache.
//
// Built with mx.fast.metal_kernel: the text above the "kernel body" line is
// the `header`, the rest the `source` (MLX writes the signature).
//
// Inputs (any strides):
//   queries            (B, Hq, Q, D)  T
//   keys, values       (B, Hkv, K, D) T   (views of the cache's buffers)
//   scale              0-d float32
//   query_slot         (B, Q) int32   a query's own key slot
//   query_limit        (B, Q) int32   keys below it are candidates
//   key_visible_until  (B, K) int32   queries at or past it do not see the key
// Output `out`:
//   SPLIT false: (B, Hq, Q, D) in T, the attention itself;
//   SPLIT true:  (S, B * Hq * Q, D + 2) float32, per key split the
//                unnormalised output, the running max and the softmax sum
//                (combined by attention_merge.metal).
// Template: T, O (output type), D (head dim), G (query heads per KV head),
//   RS (rows per simdgroup), SPLIT.
// Grid: (128 * row blocks, B * Hkv, S), threadgroup (128, 1, 1). A row is one
// (query head, query) pair of a KV head; a threadgroup takes 4 * RS rows of
// one KV head, so every key / value tile it loads serves all of them.
// Softmax is computed online (running max and sum) in float32.

// The layout's compact rule (mlx_memosight/layout.py): a query sees its own
// slot, and the keys below its limit that are still visible at its slot.
inline bool memosight_visible(int key, int slot, int limit, int until) {
  return key == slot || (key < limit && slot < until);
}

// ---- kernel body ----
constexpr int BK = 32;            // keys per tile: one per lane
constexpr int NS = 4;             // simdgroups per threadgroup
constexpr int R = NS * RS;        // rows per threadgroup
constexpr int DL = (D + 31) / 32; // output dims per lane
constexpr int KP = D + 1;         // padded tile row: lanes read distinct banks

threadgroup float q_tile[R * D];
threadgroup float kv_tile[BK * KP];
threadgroup float p_tile[R * BK];

const int lane = thread_index_in_simdgroup;
const int sg = simdgroup_index_in_threadgroup;
const int tid = thread_index_in_threadgroup;
const int n_threads = NS * 32;

const int B = queries_shape[0];
const int Hq = queries_shape[1];
const int Q = queries_shape[2];
const int Hkv = keys_shape[1];
const int K = keys_shape[2];
const int rows = G * Q;

const int block = threadgroup_position_in_grid.x;
const int b = threadgroup_position_in_grid.y / Hkv;
const int kvh = threadgroup_position_in_grid.y % Hkv;
const int split = threadgroup_position_in_grid.z;
const int n_split = threadgroups_per_grid.z;
const int chunk = ((K + n_split * BK - 1) / (n_split * BK)) * BK;
const int k_begin = split * chunk;

const device T* k_base = keys + b * keys_strides[0] + kvh * keys_strides[1];
const device T* v_base = values + b * values_strides[0] + kvh * values_strides[1];

for (int i = tid; i < R * D; i += n_threads) {
  const int r = i / D;
  const int d = i % D;
  const int row = block * R + r;
  float x = 0.0f;
  if (row < rows) {
    const int q = row / G;
    const int h = kvh * G + row % G;
    x = float(queries[b * queries_strides[0] + h * queries_strides[1] +
                      q * queries_strides[2] + d * queries_strides[3]]) * scale;
  }
  q_tile[i] = x;
}

// The block's rows see no key at or past k_end.
int k_end = 0;
int slot[RS];
int limit[RS];
for (int r = 0; r < R; ++r) {
  const int row = block * R + r;
  int s = -1;
  int lim = 0;
  if (row < rows) {
    const int q = row / G;
    s = query_slot[b * query_slot_strides[0] + q * query_slot_strides[1]];
    lim = query_limit[b * query_limit_strides[0] + q * query_limit_strides[1]];
    k_end = max(k_end, max(lim, s + 1));
  }
  if (r / RS == sg) {
    slot[r % RS] = s;
    limit[r % RS] = lim;
  }
}
k_end = min(k_end, min(K, k_begin + chunk));

float m[RS];
float l[RS];
float acc[RS][DL];
for (int r = 0; r < RS; ++r) {
  m[r] = -INFINITY;
  l[r] = 0.0f;
  for (int i = 0; i < DL; ++i) {
    acc[r][i] = 0.0f;
  }
}

for (int k0 = k_begin; k0 < k_end; k0 += BK) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = tid; i < BK * D; i += n_threads) {
    const int j = i / D;
    const int d = i % D;
    const int k = k0 + j;
    kv_tile[j * KP + d] =
        k < k_end ? float(k_base[k * keys_strides[2] + d * keys_strides[3]]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const int key = k0 + lane;
  const int until = key < k_end
      ? key_visible_until[b * key_visible_until_strides[0] + key * key_visible_until_strides[1]]
      : 0;
  for (int r = 0; r < RS; ++r) {
    float s = -INFINITY;
    if (key < k_end && memosight_visible(key, slot[r], limit[r], until)) {
      const threadgroup float* qr = q_tile + (sg * RS + r) * D;
      const threadgroup float* kr = kv_tile + lane * KP;
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) {
        dot += qr[d] * kr[d];
      }
      s = dot;
    }
    const float m_new = max(m[r], simd_max(s));
    const float p = s == -INFINITY ? 0.0f : exp(s - m_new);
    const float f = m[r] == -INFINITY ? 0.0f : exp(m[r] - m_new);
    m[r] = m_new;
    l[r] = l[r] * f + p;
    for (int i = 0; i < DL; ++i) {
      acc[r][i] *= f;
    }
    p_tile[(sg * RS + r) * BK + lane] = p;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int i = tid; i < BK * D; i += n_threads) {
    const int j = i / D;
    const int d = i % D;
    const int k = k0 + j;
    kv_tile[j * KP + d] =
        k < k_end ? float(v_base[k * values_strides[2] + d * values_strides[3]]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  for (int r = 0; r < RS; ++r) {
    const threadgroup float* pr = p_tile + (sg * RS + r) * BK;
    for (int j = 0; j < BK; ++j) {
      const float p = pr[j];
      for (int i = 0; i < DL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) {
          acc[r][i] += p * kv_tile[j * KP + d];
        }
      }
    }
  }
}

for (int r = 0; r < RS; ++r) {
  const float l_sum = simd_sum(l[r]);
  const int row = block * R + sg * RS + r;
  if (row < rows) {
    const int q = row / G;
    const int h = kvh * G + row % G;
    const int64_t out_row = (int64_t(b) * Hq + h) * Q + q;
    if (SPLIT) {
      device O* dst = out + (int64_t(split) * B * Hq * Q + out_row) * (D + 2);
      for (int i = 0; i < DL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) {
          dst[d] = static_cast<O>(acc[r][i]);
        }
      }
      if (lane == 0) {
        dst[D] = static_cast<O>(m[r]);
        dst[D + 1] = static_cast<O>(l_sum);
      }
    } else {
      const float inv = 1.0f / l_sum;
      device O* dst = out + out_row * D;
      for (int i = 0; i < DL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) {
          dst[d] = static_cast<O>(acc[r][i] * inv);
        }
      }
    }
  }
}
