//! The CPU backend: f32 activations, multi-threaded with rayon, matmuls and attention by our own
//! kernels ([`gemm`], [`attention`]).
//!
//! Matrices are repacked once at load into the matmul's panels, in their stored dtype (bf16 stays
//! bf16): one copy of the model on the heap, which the memory map's pages need not back any more.
//! Vectors and host tables stay as f32.
//!
//! Batch invariance: every output element is produced by the same sequence of floating-point
//! operations whatever else is in the batch. Each matmul output is one fused multiply-add chain in
//! input order, whatever the kernel, blocking or instruction set (see [`gemm`]), and each
//! attention head's result is one defined sequence of operations whatever shares its task (see
//! [`attention`]). A sequence's greedy tokens
//! therefore do not depend on what it was batched or chunked with (pinned by a test).

mod attention;
pub mod gemm;

use rayon::prelude::*;

use attention::{Keys, Scratch, Tile, attend_tile};
pub use gemm::Isa;
use gemm::PackedMatrix;

use super::{AttentionParams, Backend, BackendError, BatchLayout, KvCacheShape, RowSampling, SampledRow};
use crate::weights::{DType, RawTensor};

/// A 2-D f32 activation, row-major. Its buffer goes back to [`pool`] when it is dropped.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    fn zeros(rows: usize, cols: usize) -> CpuTensor {
        CpuTensor { data: pool::take(rows * cols, true), rows, cols }
    }

    /// A tensor whose values are unspecified (a reused buffer's, or zeros): for an output the
    /// caller writes whole, which spares zeroing it first.
    fn for_overwrite(rows: usize, cols: usize) -> CpuTensor {
        CpuTensor { data: pool::take(rows * cols, false), rows, cols }
    }

    fn row(&self, idx: usize) -> &[f32] {
        &self.data[idx * self.cols..(idx + 1) * self.cols]
    }
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        pool::recycle(std::mem::take(&mut self.data));
    }
}

/// Activation buffers kept for reuse. A step allocates and frees the same few large tensors in
/// every layer; from the allocator, each would be fresh pages (the allocator maps large blocks
/// and unmaps or trims them when freed), and the page faults and kernel zeroing cost about a
/// quarter of a long prefill. Kept here, the buffers stay mapped and warm in the caches: the
/// process holds on to its peak activations, as a GPU server holds its activation reserve.
mod pool {
    use std::sync::Mutex;

    /// Buffers below this size come and go through the allocator, which serves them well.
    const MIN_LEN: usize = 16 << 10;
    /// At most this many buffers are kept, the largest ones: a layer's live tensors, with room.
    const MAX_KEPT: usize = 24;

    static FREE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

    /// `len` values, in the smallest kept buffer that holds them if there is one: all zeros if
    /// `zeroed`, else whatever the buffer held (or zeros).
    pub(super) fn take(len: usize, zeroed: bool) -> Vec<f32> {
        if len >= MIN_LEN {
            let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
            let best = (0..free.len()).filter(|&i| free[i].capacity() >= len).min_by_key(|&i| free[i].capacity());
            if let Some(i) = best {
                let mut buf = free.swap_remove(i);
                drop(free);
                if zeroed {
                    buf.clear();
                }
                buf.truncate(len);
                buf.resize(len, 0.0);
                return buf;
            }
        }
        vec![0.0; len]
    }

    /// Keeps `buf` for reuse, dropping the smallest kept buffer if there are too many.
    pub(super) fn recycle(buf: Vec<f32>) {
        if buf.capacity() < MIN_LEN {
            return;
        }
        let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
        free.push(buf);
        if free.len() > MAX_KEPT {
            let smallest = (0..free.len()).min_by_key(|&i| free[i].capacity()).unwrap_or(0);
            let dropped = free.swap_remove(smallest);
            drop(free);
            drop(dropped);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_reused_buffer_comes_back_as_zeros_and_the_pool_stays_bounded() {
            for round in 0..3 * MAX_KEPT {
                let mut buf = take(MIN_LEN + round, true);
                assert!(buf.iter().all(|&v| v == 0.0), "round {round}: a reused buffer was not zeroed");
                buf.fill(f32::NAN);
                recycle(buf);
                assert!(FREE.lock().unwrap().len() <= MAX_KEPT);
            }
            // Below the size the pool keeps, buffers are not kept.
            recycle(vec![1.0; MIN_LEN - 1]);
            assert!(FREE.lock().unwrap().iter().all(|b| b.capacity() >= MIN_LEN));
            // A request smaller than a kept buffer gets exactly its length, all zeros.
            let len = MIN_LEN * 64;
            let mut big = take(len, true);
            big.fill(1.0);
            recycle(big);
            let again = take(len - 7, true);
            assert_eq!(again.len(), len - 7);
            assert!(again.iter().all(|&v| v == 0.0));
            // Not zeroed: exactly the length asked for, longer than the buffer was before.
            recycle(again);
            let longer = take(len - 3, false);
            assert_eq!(longer.len(), len - 3);
        }
    }
}

enum WeightData {
    /// Row-major f32 values: vectors (norms, biases) and tables made on the host (rotary).
    Host(Vec<f32>),
    /// A matrix repacked once into the matmul's panels, in its stored dtype.
    Packed(PackedMatrix),
    /// Matrices stacked by rows (q/k/v, gate/up), multiplied in one parallel section, each into
    /// its own columns of the output.
    Stacked(Vec<CpuWeight>),
}

/// A weight: a vector `[1, cols]` or a matrix `[rows, cols]` (`[out, in]` for linear layers).
pub struct CpuWeight {
    rows: usize,
    cols: usize,
    data: WeightData,
}

impl CpuWeight {
    /// The weight as row-major f32 values, when it is kept that way.
    fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            WeightData::Host(values) => Some(values),
            WeightData::Packed(_) | WeightData::Stacked(_) => None,
        }
    }

    /// Widens row `row` into `out`.
    fn row_to_f32(&self, row: usize, out: &mut [f32]) {
        match &self.data {
            WeightData::Host(values) => out.copy_from_slice(&values[row * self.cols..(row + 1) * self.cols]),
            WeightData::Packed(packed) => packed.row_to_f32(row, out),
            WeightData::Stacked(parts) => {
                let mut first = 0;
                for part in parts {
                    if row < first + part.rows {
                        return part.row_to_f32(row - first, out);
                    }
                    first += part.rows;
                }
            }
        }
    }

    /// The matrix as packed panels (a host table is packed on the spot).
    fn into_packed(self) -> CpuWeight {
        match self.data {
            WeightData::Host(values) => {
                let packed = PackedMatrix::from_f32(&values, self.rows, self.cols);
                CpuWeight { data: WeightData::Packed(packed), ..self }
            }
            _ => self,
        }
    }
}

pub struct CpuKvCache {
    shape: KvCacheShape,
    /// Per layer, K then V, each `[num_blocks, block_size, num_kv_heads, head_dim]`.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

pub struct CpuBatch {
    layout: BatchLayout,
}

#[derive(Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend
    }
}

fn check_same_shape(a: &CpuTensor, b: &CpuTensor, op: &str) -> Result<(), BackendError> {
    if a.rows != b.rows || a.cols != b.cols {
        return Err(BackendError::Batch(format!(
            "{op}: shapes [{}, {}] and [{}, {}] differ",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    Ok(())
}

/// A zero-filled vector from the allocator's zeroed pages, so a large KV cache costs memory only as
/// its blocks are first written. `None` when the allocation fails.
fn zeroed_vec(len: usize) -> Option<Vec<f32>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(len).ok()?;
    // SAFETY: the layout has non-zero size; a non-null result is valid for `len` f32 values whose
    // all-zero bit pattern is 0.0, and `Vec::from_raw_parts` takes ownership with the same element
    // type, length and capacity as the layout it was allocated with.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut f32;
        if ptr.is_null() { None } else { Some(Vec::from_raw_parts(ptr, len, len)) }
    }
}

/// `o = silu(g) · u`, elementwise: `g σ(g) u` through `t = e^-|g|`, which never overflows:
/// `g / (1 + t)` where `g ≥ 0`, `g t / (1 + t)` below. Multiplies, adds, a division and integer
/// operations only, so the loop vectorises and every instruction set gives the same bits.
#[inline(always)]
fn silu_mul_slices(o: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        let t = attention::exp_nonpositive(-g.abs());
        let numerator = if g >= 0.0 { g } else { g * t };
        *o = numerator / (1.0 + t) * u;
    }
}

/// [`silu_mul_slices`] in AVX2 registers (the same operations, eight lanes at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(o: &mut [f32], g: &[f32], u: &[f32]) {
    silu_mul_slices(o, g, u)
}

/// A dot product with a fixed summation order (eight lanes, then a fixed reduction), which the
/// compiler vectorises and which gives the same bits on every call.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks_a = a.chunks_exact(8);
    let mut chunks_b = b.chunks_exact(8);
    for (ca, cb) in (&mut chunks_a).zip(&mut chunks_b) {
        for l in 0..8 {
            lanes[l] += ca[l] * cb[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in chunks_a.remainder().iter().zip(chunks_b.remainder()) {
        tail += x * y;
    }
    lane_sum(&lanes) + tail
}

/// `dot`'s fixed tree over its eight lanes.
#[inline(always)]
fn lane_sum(lanes: &[f32; 8]) -> f32 {
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;
    type Batch = CpuBatch;
    type Graph = ();

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn run_step<T: Send>(work: impl FnOnce() -> T + Send) -> T {
        // From outside the pool this hands `work` to a worker and waits once; on a worker it runs
        // in place.
        rayon::scope(|_| work())
    }

    fn load_weight(&self, raw: &RawTensor) -> Result<CpuWeight, BackendError> {
        let (rows, cols) = super::weight_dims(&raw.name, &raw.shape)?;
        // Vectors (norms, biases) are tiny and used on every token: keep them as f32.
        let data = if rows == 1 {
            WeightData::Host(raw.to_f32_vec())
        } else {
            WeightData::Packed(PackedMatrix::from_stored(raw.dtype, raw.bytes(), rows, cols))
        };
        Ok(CpuWeight { rows, cols, data })
    }

    fn random_weight(&self, name: &str, shape: &[usize], seed: u64) -> Result<CpuWeight, BackendError> {
        let (rows, cols) = super::weight_dims(name, shape)?;
        let data: Vec<f32> = (0..rows * cols).into_par_iter().map(|i| super::dummy_value(seed, i as u64)).collect();
        let weight = CpuWeight { rows, cols, data: WeightData::Host(data) };
        Ok(if rows == 1 { weight } else { weight.into_packed() })
    }

    fn stack_weights(&self, parts: Vec<CpuWeight>) -> Result<CpuWeight, BackendError> {
        if parts.iter().all(|p| p.rows == 1) {
            // Vectors (biases) are concatenated: they are small and read as one slice.
            let mut data = Vec::new();
            for p in &parts {
                data.extend_from_slice(
                    p.as_f32().ok_or_else(|| BackendError::Batch("stack_weights: vector not in f32".into()))?,
                );
            }
            return Ok(CpuWeight { rows: 1, cols: data.len(), data: WeightData::Host(data) });
        }
        let cols = parts.first().map_or(0, |p| p.cols);
        if parts.iter().any(|p| p.cols != cols || matches!(p.data, WeightData::Stacked(_))) {
            return Err(BackendError::Batch("stack_weights: the parts differ in width or are stacked".into()));
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let parts = parts.into_iter().map(CpuWeight::into_packed).collect();
        Ok(CpuWeight { rows, cols, data: WeightData::Stacked(parts) })
    }

    fn split_columns(&self, x: &CpuTensor, widths: &[usize]) -> Result<Vec<CpuTensor>, BackendError> {
        super::check_split(widths, x.cols)?;
        let mut first = 0;
        let mut parts = Vec::with_capacity(widths.len());
        for &width in widths {
            let mut part = CpuTensor::for_overwrite(x.rows, width);
            for (dst, src) in part.data.chunks_exact_mut(width.max(1)).zip(x.data.chunks_exact(x.cols.max(1))) {
                dst.copy_from_slice(&src[first..first + width]);
            }
            parts.push(part);
            first += width;
        }
        Ok(parts)
    }

    fn weight_from_f32(&self, data: Vec<f32>, shape: [usize; 2]) -> Result<CpuWeight, BackendError> {
        if data.len() != shape[0] * shape[1] {
            return Err(BackendError::Weight {
                name: "host".into(),
                message: format!("{} values for shape {shape:?}", data.len()),
            });
        }
        Ok(CpuWeight { rows: shape[0], cols: shape[1], data: WeightData::Host(data) })
    }

    fn kv_cache_commits_on_write(&self) -> bool {
        // Zeroed allocations are mapped lazily: a page takes memory when first written.
        true
    }

    fn kv_cache_dtype(&self) -> DType {
        DType::F32
    }

    fn new_kv_cache(&self, shape: KvCacheShape) -> Result<CpuKvCache, BackendError> {
        let per_layer = shape.num_blocks * shape.block_size * shape.num_kv_heads * shape.head_dim;
        if shape.dtype != DType::F32 {
            return Err(BackendError::Batch(format!("the CPU backend keeps its KV cache in f32, not {}", shape.dtype)));
        }
        let num_bytes = shape.bytes_per_block() * shape.num_blocks;
        let alloc = || {
            zeroed_vec(per_layer)
                .ok_or_else(|| BackendError::KvCacheAllocation { num_bytes, message: "out of memory".into() })
        };
        let layers = (0..shape.num_layers).map(|_| Ok((alloc()?, alloc()?))).collect::<Result<_, BackendError>>()?;
        Ok(CpuKvCache { shape, layers })
    }

    fn prepare_batch(&self, layout: &BatchLayout) -> Result<CpuBatch, BackendError> {
        Ok(CpuBatch { layout: layout.clone() })
    }

    fn update_batch(&self, batch: &mut CpuBatch, layout: &BatchLayout) -> Result<(), BackendError> {
        *batch = self.prepare_batch(layout)?;
        Ok(())
    }

    fn capture<T>(&self, _: impl FnOnce() -> Result<T, BackendError>) -> Result<Option<((), T)>, BackendError> {
        Ok(None)
    }

    fn replay(&self, _: &()) -> Result<(), BackendError> {
        Err(BackendError::Batch("the CPU backend captures no graphs".into()))
    }

    fn embedding(&self, table: &CpuWeight, batch: &CpuBatch) -> Result<CpuTensor, BackendError> {
        let ids = &batch.layout.token_ids;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(BackendError::Batch(format!("token id {bad} is outside the vocabulary of {}", table.rows)));
        }
        let mut out = CpuTensor::zeros(ids.len(), table.cols);
        out.data.par_chunks_mut(table.cols).zip(ids.par_iter()).for_each(|(row, &id)| {
            table.row_to_f32(id as usize, row);
        });
        Ok(out)
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) -> Result<CpuTensor, BackendError> {
        let (m, k, n) = (x.rows, x.cols, w.rows);
        if w.cols != k {
            return Err(BackendError::Batch(format!("linear: input width {k} but weight is [{n}, {}]", w.cols)));
        }
        // Every kernel writes every output element (the gemm tests check it).
        let mut out = CpuTensor::for_overwrite(m, n);
        if m == 0 {
            return Ok(out);
        }
        let host;
        let parts: Vec<&PackedMatrix> = match &w.data {
            WeightData::Host(values) => {
                host = PackedMatrix::from_f32(values, w.rows, w.cols);
                vec![&host]
            }
            WeightData::Packed(packed) => vec![packed],
            WeightData::Stacked(parts) => parts
                .iter()
                .map(|p| match &p.data {
                    WeightData::Packed(packed) => packed,
                    _ => unreachable!("stack_weights packs every part"),
                })
                .collect(),
        };
        gemm::matmul(Isa::detected(), &x.data, m, &parts, &mut out.data, n);
        if let Some(bias) = bias {
            let b = bias.as_f32().ok_or_else(|| BackendError::Batch("bias must be a vector".into()))?;
            if b.len() != n {
                return Err(BackendError::Batch(format!("bias has {} values for {n} outputs", b.len())));
            }
            out.data.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
        }
        Ok(out)
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuWeight, eps: f32) -> Result<CpuTensor, BackendError> {
        let w = weight
            .as_f32()
            .filter(|w| w.len() == x.cols)
            .ok_or_else(|| BackendError::Batch(format!("rms_norm: weight does not match width {}", x.cols)))?;
        let mut out = CpuTensor::for_overwrite(x.rows, x.cols);
        out.data.par_chunks_mut(x.cols).zip(x.data.par_chunks(x.cols)).for_each(|(o, row)| {
            let mean_square = dot(row, row) / row.len() as f32;
            let inv = 1.0 / (mean_square + eps).sqrt();
            for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
                *o = w * (v * inv);
            }
        });
        Ok(out)
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<(), BackendError> {
        check_same_shape(x, y, "add")?;
        x.data.par_chunks_mut(4096).zip(y.data.par_chunks(4096)).for_each(|(a, b)| {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        });
        Ok(())
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor, BackendError> {
        check_same_shape(gate, up, "silu_mul")?;
        let mut out = CpuTensor::for_overwrite(gate.rows, gate.cols);
        let isa = Isa::detected();
        out.data.par_chunks_mut(4096).zip(gate.data.par_chunks(4096).zip(up.data.par_chunks(4096))).for_each(
            |(o, (g, u))| match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::detected` found AVX2 and FMA on this CPU.
                Isa::Avx2 | Isa::Avx512 => unsafe { silu_mul_avx2(o, g, u) },
                _ => silu_mul_slices(o, g, u),
            },
        );
        Ok(out)
    }

    fn rotary(
        &self,
        x: &mut CpuTensor,
        num_heads: usize,
        head_dim: usize,
        cos_sin: &CpuWeight,
        batch: &CpuBatch,
    ) -> Result<(), BackendError> {
        let table = cos_sin.as_f32().ok_or_else(|| BackendError::Batch("rotary table must be f32".into()))?;
        if x.cols != num_heads * head_dim || cos_sin.cols != head_dim {
            return Err(BackendError::Batch("rotary: shapes do not match".into()));
        }
        let positions = &batch.layout.positions;
        if let Some(p) = positions.iter().find(|&&p| p as usize >= cos_sin.rows) {
            return Err(BackendError::Batch(format!("position {p} is beyond the rotary table of {}", cos_sin.rows)));
        }
        let half = head_dim / 2;
        x.data.par_chunks_mut(x.cols).zip(positions.par_iter()).for_each(|(row, &pos)| {
            let entry = &table[pos as usize * head_dim..(pos as usize + 1) * head_dim];
            let (cos, sin) = entry.split_at(half);
            for head in row.chunks_exact_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = b * cos[i] + a * sin[i];
                }
            }
        });
        Ok(())
    }

    fn write_kv_cache(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        batch: &CpuBatch,
    ) -> Result<(), BackendError> {
        let width = cache.shape.num_kv_heads * cache.shape.head_dim;
        check_same_shape(k, v, "write_kv_cache")?;
        if k.cols != width || k.rows != batch.layout.slot_mapping.len() {
            return Err(BackendError::Batch("write_kv_cache: K/V do not match the cache or the batch".into()));
        }
        let (k_cache, v_cache) = &mut cache.layers[layer];
        for (t, &slot) in batch.layout.slot_mapping.iter().enumerate() {
            let dst = slot as usize * width..(slot as usize + 1) * width;
            k_cache[dst.clone()].copy_from_slice(k.row(t));
            v_cache[dst].copy_from_slice(v.row(t));
        }
        Ok(())
    }

    fn paged_attention(
        &self,
        q: &CpuTensor,
        cache: &CpuKvCache,
        layer: usize,
        batch: &CpuBatch,
        params: &AttentionParams,
    ) -> Result<CpuTensor, BackendError> {
        let AttentionParams { num_heads, num_kv_heads, head_dim, scale, sliding_window } = *params;
        let shape = cache.shape;
        if q.cols != num_heads * head_dim || num_kv_heads != shape.num_kv_heads || head_dim != shape.head_dim {
            return Err(BackendError::Batch("paged_attention: shapes do not match the cache".into()));
        }
        let group = num_heads / num_kv_heads;
        let kv_width = num_kv_heads * head_dim;
        let (k_cache, v_cache) = &cache.layers[layer];
        // Which sequence each token belongs to, so tokens can be processed independently.
        let mut token_seq = Vec::with_capacity(q.rows);
        for (s, seq) in batch.layout.seqs.iter().enumerate() {
            token_seq.extend(std::iter::repeat_n(s, seq.query_len));
        }
        // Tasks go sequence by sequence, then KV head by KV head, so a thread reads one head's
        // keys and values over and over from its caches through a sequence's tiles, and the
        // heads of a decoding sequence's keys one after the other, as they lie in memory. A task
        // is a tile of up to `TILE` consecutive tokens of one sequence with all their heads that
        // share the KV head, which read each block of keys and values once together; with too
        // few tokens to occupy every thread, a task is one head of one token. Results land in
        // `by_kv_head`, each sequence's tokens as `[num_kv_heads, query_len, group, head_dim]`
        // after the sequences before it, each task's in one run, then move into place.
        const TILE: usize = 4;
        let tokens = q.rows;
        let few = tokens * num_kv_heads < 4 * rayon::current_num_threads();
        let (tile_len, heads_per_task) = if few { (1, 1) } else { (TILE, group) };
        let mut tasks = Vec::new();
        for seq in &batch.layout.seqs {
            let end = seq.query_start + seq.query_len;
            for kv_head in 0..num_kv_heads {
                for t0 in (seq.query_start..end).step_by(tile_len) {
                    let n = tile_len.min(end - t0);
                    tasks.extend((0..group).step_by(heads_per_task).map(|g| (kv_head, t0, n, g)));
                }
            }
        }
        let mut by_kv_head = CpuTensor::zeros(q.rows, q.cols);
        let mut runs = Vec::with_capacity(tasks.len());
        let mut rest = by_kv_head.data.as_mut_slice();
        for &(_, _, n, _) in &tasks {
            let (run, after) = rest.split_at_mut(n * heads_per_task * head_dim);
            runs.push(run);
            rest = after;
        }
        let isa = Isa::detected();
        tasks.par_iter().zip(runs).for_each_init(Scratch::default, |scratch, (&(kv_head, t0, n, g), outs)| {
            let seq = &batch.layout.seqs[token_seq[t0]];
            let pos = seq.context_len - seq.query_len + (t0 + n - 1 - seq.query_start);
            let first_pos = pos + 1 - n;
            let keys = Keys {
                k_cache,
                v_cache,
                block_table: &seq.block_table,
                block_size: shape.block_size,
                kv_width,
                kv_offset: kv_head * head_dim,
                first: sliding_window.map_or(0, |w| (first_pos + 1).saturating_sub(w)),
                pos,
            };
            let qs = &q.data[t0 * q.cols + (kv_head * group + g) * head_dim..];
            let tile = Tile { keys, tokens: n, window: sliding_window, qs, q_stride: q.cols };
            attend_tile(isa, &tile, heads_per_task, head_dim, scale, scratch, outs);
        });
        let mut out = CpuTensor::for_overwrite(q.rows, q.cols);
        let run = (group * head_dim).max(1);
        out.data.par_chunks_mut(q.cols.max(1)).enumerate().for_each(|(t, row)| {
            let seq = &batch.layout.seqs[token_seq[t]];
            let first = seq.query_start * num_kv_heads + t - seq.query_start;
            for (kv_head, dst) in row.chunks_exact_mut(run).enumerate() {
                dst.copy_from_slice(&by_kv_head.data[(first + kv_head * seq.query_len) * run..][..run]);
            }
        });
        Ok(out)
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[u32]) -> Result<CpuTensor, BackendError> {
        if let Some(r) = rows.iter().find(|&&r| r as usize >= x.rows) {
            return Err(BackendError::Batch(format!("row {r} is outside the tensor of {} rows", x.rows)));
        }
        let mut out = CpuTensor::for_overwrite(rows.len(), x.cols);
        for (dst, &r) in out.data.chunks_exact_mut(x.cols).zip(rows) {
            dst.copy_from_slice(x.row(r as usize));
        }
        Ok(out)
    }

    fn rows(&self, x: &CpuTensor) -> usize {
        x.rows
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>, BackendError> {
        Ok(x.data.clone())
    }

    fn sample_rows(&self, x: &CpuTensor, sampling: &[RowSampling]) -> Result<Vec<SampledRow>, BackendError> {
        if sampling.len() != x.rows {
            return Err(BackendError::Batch(format!("{} sampling rules for {} rows", sampling.len(), x.rows)));
        }
        Ok(x.data
            .par_chunks_exact(x.cols.max(1))
            .zip(sampling)
            .map(|(row, rule)| super::sampling::sample_row_from(row, rule))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqLayout;

    fn weight(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> CpuWeight {
        let data = (0..rows * cols).map(|i| f(i / cols, i % cols)).collect();
        CpuBackend.weight_from_f32(data, [rows, cols]).unwrap()
    }

    #[test]
    fn linear_matches_a_plain_matmul_for_every_dtype() {
        let (m, k, n) = (5, 37, 300);
        let x = CpuTensor { data: (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.25 - 1.5).collect(), rows: m, cols: k };
        let wf = |r: usize, c: usize| (((r * 31 + c * 17) % 23) as f32 - 11.0) * 0.125;
        let expected: Vec<f32> =
            (0..m * n).map(|i| (0..k).map(|j| x.data[(i / n) * k + j] * wf(i % n, j)).sum::<f32>()).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let bytes: Vec<u8> = (0..n * k)
                .flat_map(|i| {
                    let v = wf(i / k, i % k);
                    match dtype {
                        DType::F32 => v.to_le_bytes().to_vec(),
                        DType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                        DType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                    }
                })
                .collect();
            let file = crate::weights::serialize(&[("w".into(), dtype, vec![n, k], bytes)]);
            let store = crate::weights::WeightStore::from_bytes("test", file).unwrap();
            let w = CpuBackend.load_weight(&store.tensor("w", &[n, k]).unwrap()).unwrap();
            let y = CpuBackend.linear(&x, &w, None).unwrap();
            for (a, b) in y.data.iter().zip(&expected) {
                assert!((a - b).abs() < 1e-3, "{dtype}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn linear_rows_do_not_depend_on_the_batch() {
        let (k, n) = (300, 200);
        let w = weight(n, k, |r, c| ((r * 13 + c * 7) % 19) as f32 * 0.01 - 0.09);
        let x =
            CpuTensor { data: (0..40 * k).map(|i| ((i * 11) % 29) as f32 * 0.03 - 0.4).collect(), rows: 40, cols: k };
        let all = CpuBackend.linear(&x, &w, None).unwrap();
        for r in [0, 17, 39] {
            let one = CpuTensor { data: x.row(r).to_vec(), rows: 1, cols: k };
            let y = CpuBackend.linear(&one, &w, None).unwrap();
            assert_eq!(y.data, all.row(r), "row {r} differs between batch sizes");
        }
    }

    #[test]
    fn attention_reads_scattered_blocks_like_contiguous_memory() {
        // One sequence of 5 tokens in blocks [3, 1, 0] of size 2; one head of width 4.
        let shape = KvCacheShape {
            num_layers: 1,
            num_blocks: 4,
            block_size: 2,
            num_kv_heads: 1,
            head_dim: 4,
            dtype: DType::F32,
        };
        let mut cache = CpuBackend.new_kv_cache(shape).unwrap();
        let layout = BatchLayout {
            token_ids: vec![0; 5],
            positions: (0..5).collect(),
            slot_mapping: vec![6, 7, 2, 3, 0],
            seqs: vec![SeqLayout { query_start: 0, query_len: 5, context_len: 5, block_table: vec![3, 1, 0] }],
        };
        layout.validate(&shape).unwrap();
        let batch = CpuBackend.prepare_batch(&layout).unwrap();
        let kv = |t: usize| (0..4).map(|d| ((t * 3 + d) % 5) as f32 * 0.5).collect::<Vec<_>>();
        let k = CpuTensor { data: (0..5).flat_map(kv).collect(), rows: 5, cols: 4 };
        let v = CpuTensor { data: (0..5).flat_map(|t| kv(t + 1)).collect(), rows: 5, cols: 4 };
        CpuBackend.write_kv_cache(&mut cache, 0, &k, &v, &batch).unwrap();
        let q = CpuTensor { data: (0..20).map(|i| (i % 7) as f32 * 0.1).collect(), rows: 5, cols: 4 };
        let params = AttentionParams { num_heads: 1, num_kv_heads: 1, head_dim: 4, scale: 0.5, sliding_window: None };
        let out = CpuBackend.paged_attention(&q, &cache, 0, &batch, &params).unwrap();
        for t in 0..5 {
            let scores: Vec<f32> = (0..=t).map(|j| dot(q.row(t), k.row(j)) * 0.5).collect();
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = scores.iter().map(|s| (s - max).exp()).sum();
            for d in 0..4 {
                let expected: f32 = (0..=t).map(|j| (scores[j] - max).exp() / sum * v.row(j)[d]).sum();
                assert!((out.row(t)[d] - expected).abs() < 1e-6);
            }
        }
    }

    /// SiLU·mul against f64 over the gate's whole range: within 4 ulp of the exact value, or
    /// within 1e-35 below -87, where it flushes to zero (as it did when the library exponential
    /// overflowed); its special values as `g / (1 + e^-g) · u` gives them; and the AVX2 loop equal
    /// to the plain one bit for bit.
    #[test]
    fn silu_mul_is_accurate_and_the_same_on_every_instruction_set() {
        let mut gates: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.05).collect();
        gates.extend([-104.0, -88.0, -87.5, -1e-30, 0.0, -0.0, 1e-30, 88.0, 1e30, -1e30]);
        let up: Vec<f32> = (0..gates.len()).map(|i| 1.0 - (i % 7) as f32 * 0.3).collect();
        let mut plain = vec![0f32; gates.len()];
        silu_mul_slices(&mut plain, &gates, &up);
        for ((&g, &u), &got) in gates.iter().zip(&up).zip(&plain) {
            let exact = g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64;
            let tolerance = (exact.abs() * 4.0 * f32::EPSILON as f64).max(1e-35);
            assert!((got as f64 - exact).abs() <= tolerance, "silu({g}) · {u} = {got}, not {exact}");
        }
        let specials = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        let mut out = [0f32; 3];
        silu_mul_slices(&mut out, &specials, &[2.0; 3]);
        assert_eq!(out[0], f32::INFINITY);
        assert!(out[1].is_nan() && out[2].is_nan(), "{out:?}");
        #[cfg(target_arch = "x86_64")]
        if Isa::available().contains(&Isa::Avx2) {
            let mut vector = vec![0f32; gates.len()];
            // SAFETY: this CPU has AVX2 and FMA.
            unsafe { silu_mul_avx2(&mut vector, &gates, &up) };
            assert_eq!(
                vector.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
