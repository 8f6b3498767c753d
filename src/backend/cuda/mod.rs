//! The CUDA backend: the [`Backend`] operations as cuBLAS GEMMs and the kernels of `kernels/*.cu`,
//! over a [`Device`] that is either a real GPU ([`driver::CudaDevice`]) or, in tests, the CPU
//! emulation ([`emulated::EmulatedDevice`], feature `cuda-emu`). Nothing above the device seam
//! knows which, so every line here runs in CI without a GPU.
//!
//! Activations, weights and the KV cache are in one dtype (`--dtype`, the checkpoint's by
//! default), with f32 arithmetic inside every kernel and GEMM. A batch's metadata (token ids,
//! positions, slots, each token's sequence, the block tables) goes to the device in one copy.
//! Activation buffers come from a pool, so a warmed-up step allocates no device memory.

pub mod device;
pub mod driver;
#[cfg(feature = "cuda-emu")]
pub mod emulated;
pub mod geometry;
#[cfg(all(test, feature = "cuda-emu"))]
mod tests;

use device::{DeviceBuffer, DeviceError, DeviceHandle, DevicePtr, GemmCall, Graph, KernelArg, Transpose};

use super::{AttentionParams, Backend, BackendError, BatchLayout, KvCacheShape, RowLogprobs, RowSampling, SampledRow};
use crate::weights::{DType, RawTensor};

impl From<DeviceError> for BackendError {
    fn from(e: DeviceError) -> BackendError {
        BackendError::Device(e.to_string())
    }
}

/// A 2-D activation `[rows, cols]`, row-major, on the device.
pub struct CudaTensor {
    buf: DeviceBuffer,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

impl CudaTensor {
    fn ptr(&self) -> DevicePtr {
        self.buf.ptr()
    }
}

/// A weight on the device: a vector `[1, cols]` or a matrix `[rows, cols]` (`[out, in]`).
pub struct CudaWeight {
    buf: DeviceBuffer,
    rows: usize,
    cols: usize,
    dtype: DType,
}

pub struct CudaKvCache {
    shape: KvCacheShape,
    /// Per layer, K then V, each `[num_blocks, block_size, num_kv_heads, head_dim]`.
    layers: Vec<(DeviceBuffer, DeviceBuffer)>,
}

/// A batch's metadata on the device, as `u32` arrays in one buffer, and what the host still needs
/// to check arguments without reading it back.
pub struct CudaBatch {
    meta: DeviceBuffer,
    num_tokens: usize,
    num_seqs: usize,
    /// The most tokens any sequence computes: 1 in a decode step.
    max_query_len: usize,
    max_blocks_per_seq: usize,
    /// The longest context any token attends to.
    max_context: usize,
    max_token_id: u32,
    max_position: u32,
}

impl CudaBatch {
    /// `[num_tokens]` arrays, then `[num_seqs, max_blocks_per_seq]` block tables, then
    /// `[num_seqs + 1]` query starts.
    fn array(&self, idx: usize) -> DevicePtr {
        self.meta.ptr() + (idx * self.num_tokens * 4) as u64
    }
    fn token_ids(&self) -> DevicePtr {
        self.array(0)
    }
    fn positions(&self) -> DevicePtr {
        self.array(1)
    }
    fn slots(&self) -> DevicePtr {
        self.array(2)
    }
    fn token_seq(&self) -> DevicePtr {
        self.array(3)
    }
    fn block_tables(&self) -> DevicePtr {
        self.array(4)
    }
    fn seq_query_start(&self) -> DevicePtr {
        self.block_tables() + (self.num_seqs * self.max_blocks_per_seq * 4) as u64
    }
}

/// A batch's metadata as one array of words, in `CudaBatch`'s order, and its sizes.
struct BatchMeta {
    num_tokens: usize,
    num_seqs: usize,
    max_query_len: usize,
    max_blocks_per_seq: usize,
    max_context: usize,
    max_token_id: u32,
    max_position: u32,
}

impl BatchMeta {
    fn of(layout: &BatchLayout) -> (Vec<u32>, BatchMeta) {
        let n = layout.num_tokens();
        let max_blocks_per_seq = layout.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0).max(1);
        let mut words: Vec<u32> = Vec::with_capacity(4 * n + layout.seqs.len() * (max_blocks_per_seq + 1) + 1);
        words.extend(&layout.token_ids);
        words.extend(&layout.positions);
        words.extend(&layout.slot_mapping);
        for (idx, seq) in layout.seqs.iter().enumerate() {
            words.extend(std::iter::repeat_n(idx as u32, seq.query_len));
        }
        for seq in &layout.seqs {
            words.extend(&seq.block_table);
            // Entries past a sequence's blocks are never read; 0 keeps them inside the cache.
            words.extend(std::iter::repeat_n(0, max_blocks_per_seq - seq.block_table.len()));
        }
        words.extend(layout.seqs.iter().map(|s| s.query_start as u32));
        words.push(n as u32);
        let meta = BatchMeta {
            num_tokens: n,
            num_seqs: layout.seqs.len(),
            max_query_len: layout.seqs.iter().map(|s| s.query_len).max().unwrap_or(0),
            max_blocks_per_seq,
            max_context: layout.seqs.iter().map(|s| s.context_len).max().unwrap_or(0),
            max_token_id: layout.token_ids.iter().copied().max().unwrap_or(0),
            max_position: layout.positions.iter().copied().max().unwrap_or(0),
        };
        (words, meta)
    }

    fn with(self, meta: DeviceBuffer) -> CudaBatch {
        CudaBatch {
            meta,
            num_tokens: self.num_tokens,
            num_seqs: self.num_seqs,
            max_query_len: self.max_query_len,
            max_blocks_per_seq: self.max_blocks_per_seq,
            max_context: self.max_context,
            max_token_id: self.max_token_id,
            max_position: self.max_position,
        }
    }
}

/// Checks that the attention kernels cover a model's head shape, for a clear error at load.
pub fn check_attention_shape(
    dtype: DType,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> Result<(), String> {
    let group = num_heads / num_kv_heads.max(1);
    if geometry::attention_kernel(dtype, head_dim, group).is_none() {
        return Err(format!(
            "the CUDA backend has attention kernels for head_dim {:?} with up to {} query heads per KV head; \
             this model has head_dim {head_dim} and {group}",
            geometry::ATTENTION_HEAD_DIMS,
            geometry::ATTENTION_GROUP_BUCKETS[geometry::ATTENTION_GROUP_BUCKETS.len() - 1],
        ));
    }
    Ok(())
}

/// Encodes f32 values in `dtype`, little-endian.
pub(crate) fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        DType::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    }
}

pub struct CudaBackend {
    handle: DeviceHandle,
    dtype: DType,
}

impl CudaBackend {
    /// A backend computing in `dtype` on `handle`'s device.
    pub fn new(handle: DeviceHandle, dtype: DType) -> CudaBackend {
        CudaBackend { handle, dtype }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device_name(&self) -> String {
        self.handle.device().name()
    }

    /// An activation holding `data` `[rows, cols]`, rounded to the backend's dtype.
    pub fn tensor_from_f32(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor, BackendError> {
        self.tensor_in(data, rows, cols, self.dtype)
    }

    /// An f32 tensor holding `data` `[rows, cols]`, as logits are.
    pub fn logits_from_f32(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor, BackendError> {
        self.tensor_in(data, rows, cols, DType::F32)
    }

    fn tensor_in(&self, data: &[f32], rows: usize, cols: usize, dtype: DType) -> Result<CudaTensor, BackendError> {
        if data.len() != rows * cols {
            return Err(BackendError::Batch(format!("{} values for a [{rows}, {cols}] tensor", data.len())));
        }
        let buf = self.handle.upload(&encode(data, dtype))?;
        Ok(CudaTensor { buf, rows, cols, dtype })
    }

    /// Fills every cache slot with NaN (all-ones bits in every dtype), so that a kernel reading
    /// a slot no sequence owns poisons its output. For tests.
    pub fn poison_kv_cache(&self, cache: &mut CudaKvCache) -> Result<(), BackendError> {
        for (k, v) in &cache.layers {
            self.handle.device().memset(k.ptr(), 0xff, k.num_bytes())?;
            self.handle.device().memset(v.ptr(), 0xff, v.num_bytes())?;
        }
        Ok(())
    }

    /// A weight's values, widened to f32.
    pub fn weight_to_host(&self, w: &CudaWeight) -> Result<Vec<f32>, BackendError> {
        let bytes = w.buf.to_host()?;
        let mut out = vec![0f32; w.rows * w.cols];
        crate::weights::convert_to_f32(w.dtype, &bytes[..out.len() * w.dtype.size_in_bytes()], &mut out);
        Ok(out)
    }

    /// Fills every K and V entry with dummy values (for benchmarks).
    pub fn fill_kv_cache_random(&self, cache: &mut CudaKvCache, seed: u64) -> Result<(), BackendError> {
        for (idx, (k, v)) in cache.layers.iter().enumerate() {
            for (part, buf) in [k, v].into_iter().enumerate() {
                let len = buf.num_bytes() / self.dtype.size_in_bytes();
                self.fill_random(buf.ptr(), len, seed ^ ((idx * 2 + part) as u64) << 32)?;
            }
        }
        Ok(())
    }

    /// `len` dummy values of stream `seed` at `ptr`, in launches of at most 2^31 elements.
    fn fill_random(&self, ptr: DevicePtr, len: usize, seed: u64) -> Result<(), BackendError> {
        let elem = self.dtype.size_in_bytes();
        let mut start = 0;
        while start < len {
            let count = (len - start).min(1 << 31);
            self.launch(
                "fill_uniform",
                geometry::elementwise(count),
                &[
                    KernelArg::Ptr(ptr + (start * elem) as u64),
                    KernelArg::U32(count as u32),
                    KernelArg::U64(start as u64),
                    KernelArg::U64(seed),
                    KernelArg::F32(super::DUMMY_WEIGHT_RANGE),
                ],
            )?;
            start += count;
        }
        Ok(())
    }

    fn new_tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor, BackendError> {
        let buf = self.handle.buffer(rows * cols * self.dtype.size_in_bytes())?;
        Ok(CudaTensor { buf, rows, cols, dtype: self.dtype })
    }

    /// `x [m, k] · w[n, k]ᵀ` through cuBLAS, the output in `out_dtype`.
    fn matmul(&self, x: &CudaTensor, w: &CudaWeight, out_dtype: DType) -> Result<CudaTensor, BackendError> {
        let (m, k, n) = (x.rows, x.cols, w.rows);
        if w.cols != k {
            return Err(BackendError::Batch(format!("linear: input width {k} but weight is [{n}, {}]", w.cols)));
        }
        let buf = self.handle.buffer(m * n * out_dtype.size_in_bytes())?;
        let out = CudaTensor { buf, rows: m, cols: n, dtype: out_dtype };
        if m == 0 {
            return Ok(out);
        }
        // Row-major y[m, n] = x[m, k] · w[n, k]ᵀ is column-major yᵀ[n, m] = w · xᵀ: cuBLAS reads w
        // (column-major [k, n], ld k) transposed and x (column-major [k, m], ld k) as stored.
        self.handle.device().gemm(&GemmCall {
            transa: Transpose::Yes,
            transb: Transpose::No,
            m: n,
            n: m,
            k,
            alpha: 1.0,
            a: w.buf.ptr(),
            lda: k,
            b: x.ptr(),
            ldb: k,
            beta: 0.0,
            c: out.ptr(),
            ldc: n,
            dtype: self.dtype,
            c_dtype: out_dtype,
        })?;
        Ok(out)
    }

    /// `pagoda_add_rms_norm`: RMSNorm of `residual`, after adding `delta` into it when given.
    fn norm(
        &self,
        residual: &CudaTensor,
        delta: Option<&CudaTensor>,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor, BackendError> {
        check_vector(weight, residual.cols, "rms_norm")?;
        let out = self.new_tensor(residual.rows, residual.cols)?;
        if residual.rows > 0 {
            self.launch(
                "add_rms_norm",
                geometry::add_rms_norm(residual.rows),
                &[
                    KernelArg::Ptr(residual.ptr()),
                    KernelArg::Ptr(delta.map_or(0, CudaTensor::ptr)),
                    KernelArg::Ptr(out.ptr()),
                    KernelArg::Ptr(weight.buf.ptr()),
                    KernelArg::I32(residual.cols as i32),
                    KernelArg::F32(eps),
                ],
            )?;
        }
        Ok(out)
    }

    fn kernel(&self, op: &str) -> String {
        format!("pagoda_{op}_{}", geometry::dtype_suffix(self.dtype))
    }

    fn launch(&self, op: &str, config: device::LaunchConfig, args: &[KernelArg]) -> Result<(), BackendError> {
        Ok(self.handle.device().launch(&self.kernel(op), config, args)?)
    }

    /// The fused rotary / KV-write kernel with the parts that `q`, `k` and `cache` name.
    #[allow(clippy::too_many_arguments)]
    fn launch_rotary_write_kv(
        &self,
        q: Option<(&CudaTensor, usize)>,
        k: Option<&CudaTensor>,
        v: Option<&CudaTensor>,
        cache: Option<(&CudaKvCache, usize)>,
        cos_sin: Option<&CudaWeight>,
        batch: &CudaBatch,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Result<(), BackendError> {
        if let Some(table) = cos_sin {
            if table.dtype != DType::F32 || table.cols != head_dim {
                return Err(BackendError::Batch("rotary: the table must be f32 [positions, head_dim]".into()));
            }
            if batch.max_position as usize >= table.rows {
                return Err(BackendError::Batch(format!(
                    "position {} is beyond the rotary table of {}",
                    batch.max_position, table.rows
                )));
            }
        }
        let ptr = |t: Option<&CudaTensor>| KernelArg::Ptr(t.map_or(0, |t| t.ptr()));
        let (k_cache, v_cache) = match cache {
            Some((c, layer)) => (c.layers[layer].0.ptr(), c.layers[layer].1.ptr()),
            None => (0, 0),
        };
        self.launch(
            "rotary_write_kv",
            geometry::rotary_write_kv(batch.num_tokens),
            &[
                ptr(q.map(|(t, _)| t)),
                ptr(k),
                ptr(v),
                KernelArg::Ptr(k_cache),
                KernelArg::Ptr(v_cache),
                KernelArg::Ptr(cos_sin.map_or(0, |t| t.buf.ptr())),
                KernelArg::Ptr(batch.positions()),
                KernelArg::Ptr(batch.slots()),
                KernelArg::I32(q.map_or(0, |(_, heads)| heads) as i32),
                KernelArg::I32(num_kv_heads as i32),
                KernelArg::I32(head_dim as i32),
            ],
        )
    }
}

fn check_shape(t: &CudaTensor, rows: usize, cols: usize, op: &str) -> Result<(), BackendError> {
    if t.rows != rows || t.cols != cols {
        return Err(BackendError::Batch(format!("{op}: expected [{rows}, {cols}], got [{}, {}]", t.rows, t.cols)));
    }
    Ok(())
}

fn check_vector(w: &CudaWeight, len: usize, op: &str) -> Result<(), BackendError> {
    if w.rows != 1 || w.cols != len {
        return Err(BackendError::Batch(format!("{op}: weight [{}, {}] is not a vector of {len}", w.rows, w.cols)));
    }
    Ok(())
}

/// The sampling rules of a step as `kernels/sampling.cu` reads them, packed into one upload of
/// 32-bit words: per row a rule of [`RULE_WORDS`] (temperature (0: greedy), min_p, top_p, uniform,
/// top_k, the forced token or [`NOT_FORCED`]), then the edits (row, token, add, repetition,
/// subtract), then the rows whose logprobs are asked for. Empty when every row is a plain greedy
/// pick (the argmax kernel needs no rules).
/// Words of one row's rule in the upload, and the forced-token word of a row that picks.
const RULE_WORDS: usize = 6;
const NOT_FORCED: u32 = u32::MAX;

struct SamplingUpload {
    words: Vec<u32>,
    edits_at: usize,
    num_edits: usize,
    logprob_rows_at: usize,
    logprob_rows: Vec<u32>,
    /// The most top logprobs any row asks for (capped at the vocabulary); each row gets this many.
    max_logprobs: usize,
    /// Rows with a token mask: their indices at `masks_at`, then each one's bitmask of
    /// `mask_words` words.
    masks_at: usize,
    num_masks: usize,
    mask_words: usize,
}

impl SamplingUpload {
    fn new(sampling: &[RowSampling], vocab: usize) -> SamplingUpload {
        let logprob_rows: Vec<u32> =
            (0..sampling.len() as u32).filter(|&r| sampling[r as usize].logprobs.is_some()).collect();
        let max_logprobs = sampling.iter().filter_map(|r| r.logprobs).max().unwrap_or(0).min(vocab as u32) as usize;
        let mask_words = vocab.div_ceil(32);
        let plain = sampling
            .iter()
            .all(|r| r.draw.is_none() && r.edits.is_empty() && r.allowed.is_none() && r.forced.is_none())
            && logprob_rows.is_empty();
        if plain {
            return SamplingUpload {
                words: Vec::new(),
                edits_at: 0,
                num_edits: 0,
                logprob_rows_at: 0,
                logprob_rows,
                max_logprobs,
                masks_at: 0,
                num_masks: 0,
                mask_words,
            };
        }
        let mut words = Vec::with_capacity(RULE_WORDS * sampling.len() + logprob_rows.len());
        for rule in sampling {
            let draw = match rule.draw {
                None => [0; 5],
                Some(d) => {
                    [d.temperature.to_bits(), d.min_p.to_bits(), d.top_p.to_bits(), d.uniform.to_bits(), d.top_k]
                }
            };
            words.extend(draw);
            words.push(rule.forced.unwrap_or(NOT_FORCED));
        }
        let edits_at = words.len();
        for (row, rule) in sampling.iter().enumerate() {
            for e in &rule.edits {
                words.extend([row as u32, e.token, e.add.to_bits(), e.repetition.to_bits(), e.subtract.to_bits()]);
            }
        }
        let num_edits = (words.len() - edits_at) / 5;
        let logprob_rows_at = words.len();
        words.extend(&logprob_rows);
        let masks_at = words.len();
        let masked: Vec<(u32, &Vec<u32>)> =
            sampling.iter().enumerate().filter_map(|(r, rule)| Some((r as u32, rule.allowed.as_ref()?))).collect();
        words.extend(masked.iter().map(|m| m.0));
        for (_, mask) in &masked {
            // A mask shorter than the vocabulary allows nothing past its end.
            words.extend(mask.iter().copied().chain(std::iter::repeat(0)).take(mask_words));
        }
        SamplingUpload {
            words,
            edits_at,
            num_edits,
            logprob_rows_at,
            logprob_rows,
            max_logprobs,
            masks_at,
            num_masks: masked.len(),
            mask_words,
        }
    }

    /// Words per logprobs row of the output: the token's logprob and rank, then (id, logprob) pairs.
    fn logprob_width(&self) -> usize {
        2 + 2 * self.max_logprobs
    }

    fn unpack(&self, sampling: &[RowSampling], tokens: &[u32], logprobs: &[u32]) -> Vec<SampledRow> {
        let mut rows = logprobs.chunks_exact(self.logprob_width());
        tokens
            .iter()
            .zip(sampling)
            .map(|(&token, rule)| SampledRow {
                token,
                logprobs: rule.logprobs.map(|k| {
                    let row = rows.next().unwrap_or_default();
                    let word = |i: usize| row.get(i).copied().unwrap_or(0);
                    let top = row.get(2..).unwrap_or_default().chunks_exact(2).take(k as usize);
                    let top = top.map(|p| (p[0], f32::from_bits(p[1]))).collect();
                    RowLogprobs { logprob: f32::from_bits(word(0)), rank: word(1), top }
                }),
            })
            .collect()
    }
}

impl CudaBackend {
    /// `out`'s rows are the rows of `x` whose indices (u32, `out.rows` of them, in bounds) are on
    /// the device at `indices`.
    fn launch_gather_rows(&self, out: &CudaTensor, x: &CudaTensor, indices: DevicePtr) -> Result<(), BackendError> {
        self.handle.device().launch(
            &format!("pagoda_gather_rows_{}", geometry::dtype_suffix(x.dtype)),
            geometry::gather_rows(out.rows),
            &[
                KernelArg::Ptr(out.ptr()),
                KernelArg::Ptr(x.ptr()),
                KernelArg::Ptr(indices),
                KernelArg::I32(x.cols as i32),
            ],
        )?;
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;
    type Batch = CudaBatch;
    type Graph = Graph;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn load_weight(&self, raw: &RawTensor) -> Result<CudaWeight, BackendError> {
        let (rows, cols) = crate::backend::weight_dims(&raw.name, &raw.shape)?;
        // Stored bytes go up as they are when the dtypes agree (the usual case: --dtype auto).
        let converted;
        let bytes = if raw.dtype == self.dtype {
            raw.bytes()
        } else {
            converted = encode(&raw.to_f32_vec(), self.dtype);
            &converted
        };
        let buf = self.handle.buffer_exact(bytes.len()).map_err(|e| BackendError::Weight {
            name: raw.name.clone(),
            message: format!("does not fit on the GPU: {e}"),
        })?;
        self.handle.device().copy_to_device(buf.ptr(), bytes)?;
        Ok(CudaWeight { buf, rows, cols, dtype: self.dtype })
    }

    fn random_weight(&self, name: &str, shape: &[usize], seed: u64) -> Result<CudaWeight, BackendError> {
        let (rows, cols) = crate::backend::weight_dims(name, shape)?;
        let len = rows * cols;
        let buf = self.handle.buffer_exact(len * self.dtype.size_in_bytes()).map_err(|e| BackendError::Weight {
            name: name.to_string(),
            message: format!("does not fit on the GPU: {e}"),
        })?;
        // The values are made on the device: no host copy of the model ever exists.
        self.fill_random(buf.ptr(), len, seed)?;
        Ok(CudaWeight { buf, rows, cols, dtype: self.dtype })
    }

    fn stack_weights(&self, parts: Vec<CudaWeight>) -> Result<CudaWeight, BackendError> {
        let first = parts.first().ok_or_else(|| BackendError::Batch("stack_weights: no parts".into()))?;
        let (cols, dtype) = (first.cols, first.dtype);
        let vectors = parts.iter().all(|p| p.rows == 1);
        // Matrices must share their width; vectors (biases) are concatenated whatever their length.
        if parts.iter().any(|p| (!vectors && p.cols != cols) || p.dtype != dtype) {
            return Err(BackendError::Batch("stack_weights: the parts differ in width or dtype".into()));
        }
        let bytes: Vec<usize> = parts.iter().map(|p| p.rows * p.cols * dtype.size_in_bytes()).collect();
        let buf = self.handle.buffer_exact(bytes.iter().sum())?;
        let mut offset = 0;
        for (part, &len) in parts.iter().zip(&bytes) {
            self.handle.device().copy_on_device(buf.ptr() + offset as u64, part.buf.ptr(), len)?;
            offset += len;
        }
        // The parts are freed here; the stacked copy is the only one left.
        let (rows, cols) =
            if vectors { (1, parts.iter().map(|p| p.cols).sum()) } else { (parts.iter().map(|p| p.rows).sum(), cols) };
        Ok(CudaWeight { buf, rows, cols, dtype })
    }

    fn split_columns(&self, x: &CudaTensor, widths: &[usize]) -> Result<Vec<CudaTensor>, BackendError> {
        crate::backend::check_split(widths, x.cols)?;
        let mut first = 0;
        let mut parts = Vec::with_capacity(widths.len());
        for &width in widths {
            let buf = self.handle.buffer(x.rows * width * x.dtype.size_in_bytes())?;
            let part = CudaTensor { buf, rows: x.rows, cols: width, dtype: x.dtype };
            if x.rows > 0 && width > 0 {
                self.handle.device().launch(
                    &format!("pagoda_copy_columns_{}", geometry::dtype_suffix(x.dtype)),
                    geometry::copy_columns(x.rows, width),
                    &[
                        KernelArg::Ptr(part.ptr()),
                        KernelArg::Ptr(x.ptr()),
                        KernelArg::I32(x.cols as i32),
                        KernelArg::I32(first as i32),
                        KernelArg::I32(width as i32),
                    ],
                )?;
            }
            parts.push(part);
            first += width;
        }
        Ok(parts)
    }

    fn weight_from_f32(&self, data: Vec<f32>, shape: [usize; 2]) -> Result<CudaWeight, BackendError> {
        if data.len() != shape[0] * shape[1] {
            return Err(BackendError::Weight {
                name: "host".into(),
                message: format!("{} values for shape {shape:?}", data.len()),
            });
        }
        // Host-computed tables (rotary) stay in f32.
        let bytes: &[u8] = bytemuck::cast_slice(&data);
        let buf = self.handle.buffer_exact(bytes.len())?;
        self.handle.device().copy_to_device(buf.ptr(), bytes)?;
        Ok(CudaWeight { buf, rows: shape[0], cols: shape[1], dtype: DType::F32 })
    }

    fn kv_cache_dtype(&self) -> DType {
        self.dtype
    }

    fn new_kv_cache(&self, shape: KvCacheShape) -> Result<CudaKvCache, BackendError> {
        if shape.dtype != self.dtype {
            return Err(BackendError::Batch(format!(
                "a KV cache of {} on a backend computing in {}",
                shape.dtype, self.dtype
            )));
        }
        let per_layer =
            shape.num_blocks * shape.block_size * shape.num_kv_heads * shape.head_dim * self.dtype.size_in_bytes();
        let total = shape.bytes_per_block() * shape.num_blocks;
        let alloc = || -> Result<DeviceBuffer, BackendError> {
            let buf = self
                .handle
                .buffer_exact(per_layer)
                .map_err(|e| BackendError::KvCacheAllocation { num_bytes: total, message: e.to_string() })?;
            // Zeroed, so that what a step leaves unwritten is never garbage.
            self.handle.device().memset(buf.ptr(), 0, per_layer)?;
            Ok(buf)
        };
        let layers = (0..shape.num_layers).map(|_| Ok((alloc()?, alloc()?))).collect::<Result<_, BackendError>>()?;
        Ok(CudaKvCache { shape, layers })
    }

    fn prepare_batch(&self, layout: &BatchLayout) -> Result<CudaBatch, BackendError> {
        let (words, batch) = BatchMeta::of(layout);
        Ok(batch.with(self.handle.upload(bytemuck::cast_slice(&words))?))
    }

    fn update_batch(&self, batch: &mut CudaBatch, layout: &BatchLayout) -> Result<(), BackendError> {
        let (words, meta) = BatchMeta::of(layout);
        let same_shape = meta.num_tokens == batch.num_tokens
            && meta.num_seqs == batch.num_seqs
            && meta.max_blocks_per_seq == batch.max_blocks_per_seq
            && words.len() * 4 <= batch.meta.num_bytes();
        if !same_shape {
            return Err(BackendError::Batch("update_batch: the layout does not have the batch's shape".into()));
        }
        self.handle.device().copy_to_device(batch.meta.ptr(), bytemuck::cast_slice(&words))?;
        batch.max_query_len = meta.max_query_len;
        batch.max_context = meta.max_context;
        batch.max_token_id = meta.max_token_id;
        batch.max_position = meta.max_position;
        Ok(())
    }

    fn capture<T>(
        &self,
        capture: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<Option<(Graph, T)>, BackendError> {
        Ok(Some(self.handle.capture(capture)?))
    }

    fn replay(&self, graph: &Graph) -> Result<(), BackendError> {
        Ok(graph.replay()?)
    }

    fn embedding(&self, table: &CudaWeight, batch: &CudaBatch) -> Result<CudaTensor, BackendError> {
        if batch.num_tokens > 0 && batch.max_token_id as usize >= table.rows {
            return Err(BackendError::Batch(format!(
                "token id {} is outside the vocabulary of {}",
                batch.max_token_id, table.rows
            )));
        }
        let out = self.new_tensor(batch.num_tokens, table.cols)?;
        if batch.num_tokens > 0 {
            self.launch(
                "gather_rows",
                geometry::gather_rows(batch.num_tokens),
                &[
                    KernelArg::Ptr(out.ptr()),
                    KernelArg::Ptr(table.buf.ptr()),
                    KernelArg::Ptr(batch.token_ids()),
                    KernelArg::I32(table.cols as i32),
                ],
            )?;
        }
        Ok(out)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight, bias: Option<&CudaWeight>) -> Result<CudaTensor, BackendError> {
        let out = self.matmul(x, w, self.dtype)?;
        if let Some(bias) = bias {
            let (m, n) = (out.rows, out.cols);
            check_vector(bias, n, "linear bias")?;
            if m > 0 {
                self.launch(
                    "add_bias",
                    geometry::elementwise(m * n),
                    &[
                        KernelArg::Ptr(out.ptr()),
                        KernelArg::Ptr(bias.buf.ptr()),
                        KernelArg::U32((m * n) as u32),
                        KernelArg::U32(n as u32),
                    ],
                )?;
            }
        }
        Ok(out)
    }

    fn logits(&self, x: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor, BackendError> {
        self.matmul(x, w, DType::F32)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaWeight, eps: f32) -> Result<CudaTensor, BackendError> {
        self.norm(x, None, weight, eps)
    }

    fn add_rms_norm(
        &self,
        hidden: &mut CudaTensor,
        delta: &CudaTensor,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor, BackendError> {
        check_shape(delta, hidden.rows, hidden.cols, "add_rms_norm")?;
        // The kernel adds `delta` into `hidden` in place before normalizing.
        self.norm(hidden, Some(delta), weight, eps)
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<(), BackendError> {
        check_shape(y, x.rows, x.cols, "add")?;
        let len = x.rows * x.cols;
        if len > 0 {
            self.launch(
                "add",
                geometry::elementwise(len),
                &[KernelArg::Ptr(x.ptr()), KernelArg::Ptr(y.ptr()), KernelArg::U32(len as u32)],
            )?;
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor, BackendError> {
        check_shape(up, gate.rows, gate.cols, "silu_mul")?;
        let out = self.new_tensor(gate.rows, gate.cols)?;
        let len = gate.rows * gate.cols;
        if len > 0 {
            self.launch(
                "silu_mul",
                geometry::elementwise(len),
                &[
                    KernelArg::Ptr(out.ptr()),
                    KernelArg::Ptr(gate.ptr()),
                    KernelArg::Ptr(up.ptr()),
                    KernelArg::U32(len as u32),
                ],
            )?;
        }
        Ok(out)
    }

    fn rotary(
        &self,
        x: &mut CudaTensor,
        num_heads: usize,
        head_dim: usize,
        cos_sin: &CudaWeight,
        batch: &CudaBatch,
    ) -> Result<(), BackendError> {
        check_shape(x, batch.num_tokens, num_heads * head_dim, "rotary")?;
        if batch.num_tokens == 0 {
            return Ok(());
        }
        self.launch_rotary_write_kv(Some((x, num_heads)), None, None, None, Some(cos_sin), batch, 0, head_dim)
    }

    fn write_kv_cache(
        &self,
        cache: &mut CudaKvCache,
        layer: usize,
        k: &CudaTensor,
        v: &CudaTensor,
        batch: &CudaBatch,
    ) -> Result<(), BackendError> {
        let s = cache.shape;
        check_shape(k, batch.num_tokens, s.num_kv_heads * s.head_dim, "write_kv_cache")?;
        check_shape(v, batch.num_tokens, s.num_kv_heads * s.head_dim, "write_kv_cache")?;
        if batch.num_tokens == 0 {
            return Ok(());
        }
        self.launch_rotary_write_kv(
            None,
            Some(k),
            Some(v),
            Some((cache, layer)),
            None,
            batch,
            s.num_kv_heads,
            s.head_dim,
        )
    }

    fn rotary_write_kv_cache(
        &self,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
        v: &CudaTensor,
        cache: &mut CudaKvCache,
        layer: usize,
        cos_sin: &CudaWeight,
        batch: &CudaBatch,
        params: &AttentionParams,
    ) -> Result<(), BackendError> {
        let s = cache.shape;
        check_shape(q, batch.num_tokens, params.num_heads * s.head_dim, "rotary_write_kv_cache")?;
        check_shape(k, batch.num_tokens, s.num_kv_heads * s.head_dim, "rotary_write_kv_cache")?;
        check_shape(v, batch.num_tokens, s.num_kv_heads * s.head_dim, "rotary_write_kv_cache")?;
        if batch.num_tokens == 0 {
            return Ok(());
        }
        self.launch_rotary_write_kv(
            Some((q, params.num_heads)),
            Some(k),
            Some(v),
            Some((cache, layer)),
            Some(cos_sin),
            batch,
            s.num_kv_heads,
            s.head_dim,
        )
    }

    fn paged_attention(
        &self,
        q: &CudaTensor,
        cache: &CudaKvCache,
        layer: usize,
        batch: &CudaBatch,
        params: &AttentionParams,
    ) -> Result<CudaTensor, BackendError> {
        let AttentionParams { num_heads, num_kv_heads, head_dim, scale, sliding_window } = *params;
        let shape = cache.shape;
        if num_kv_heads != shape.num_kv_heads || head_dim != shape.head_dim || num_heads % num_kv_heads != 0 {
            return Err(BackendError::Batch("paged_attention: shapes do not match the cache".into()));
        }
        check_shape(q, batch.num_tokens, num_heads * head_dim, "paged_attention")?;
        let group = num_heads / num_kv_heads;
        let kernel = geometry::attention_kernel(self.dtype, head_dim, group).ok_or_else(|| {
            BackendError::Batch(check_attention_shape(self.dtype, num_heads, num_kv_heads, head_dim).unwrap_err())
        })?;
        let out = self.new_tensor(batch.num_tokens, num_heads * head_dim)?;
        let n = batch.num_tokens;
        if n == 0 {
            return Ok(out);
        }
        let (k_cache, v_cache) = &cache.layers[layer];
        let window = sliding_window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        // Both kernels end with where each query token's keys are and the heads' shape; they
        // differ in how a token finds its sequence (`token_map`).
        let cache_args = |token_map: DevicePtr| {
            [
                KernelArg::Ptr(batch.block_tables()),
                KernelArg::Ptr(token_map),
                KernelArg::Ptr(batch.positions()),
                KernelArg::I32(batch.max_blocks_per_seq as i32),
                KernelArg::I32(shape.block_size as i32),
                KernelArg::I32(num_kv_heads as i32),
                KernelArg::I32(group as i32),
                KernelArg::I32(window),
                KernelArg::F32(scale),
            ]
        };
        if batch.max_query_len > 1 {
            // A step with prompt chunks: query tiles share each key tile.
            let (kernel, bucket) = geometry::prefill_attention_kernel(self.dtype, head_dim, group)
                .ok_or_else(|| BackendError::Batch(format!("no prefill attention kernel for head_dim {head_dim}")))?;
            self.handle.device().launch(
                &kernel,
                geometry::prefill_attention(num_kv_heads, batch.max_query_len, bucket, batch.num_seqs),
                &[
                    &[
                        KernelArg::Ptr(out.ptr()),
                        KernelArg::Ptr(q.ptr()),
                        KernelArg::Ptr(k_cache.ptr()),
                        KernelArg::Ptr(v_cache.ptr()),
                    ][..],
                    &cache_args(batch.seq_query_start()),
                ]
                .concat(),
            )?;
            return Ok(out);
        }
        let splits = geometry::attention_splits(n, num_kv_heads, batch.max_context, self.handle.device().num_sms());
        let partial = if splits > 1 {
            Some((
                self.handle.buffer(n * num_heads * splits * head_dim * 4)?,
                self.handle.buffer(n * num_heads * splits * 4)?,
            ))
        } else {
            None
        };
        self.handle.device().launch(
            &kernel,
            geometry::paged_attention(num_kv_heads, n, splits),
            &[
                &[
                    KernelArg::Ptr(out.ptr()),
                    KernelArg::Ptr(partial.as_ref().map_or(0, |p| p.0.ptr())),
                    KernelArg::Ptr(partial.as_ref().map_or(0, |p| p.1.ptr())),
                    KernelArg::Ptr(q.ptr()),
                    KernelArg::Ptr(k_cache.ptr()),
                    KernelArg::Ptr(v_cache.ptr()),
                ][..],
                &cache_args(batch.token_seq()),
            ]
            .concat(),
        )?;
        if let Some((partial_out, partial_lse)) = &partial {
            self.launch(
                "attention_merge",
                geometry::attention_merge(n, num_heads),
                &[
                    KernelArg::Ptr(out.ptr()),
                    KernelArg::Ptr(partial_out.ptr()),
                    KernelArg::Ptr(partial_lse.ptr()),
                    KernelArg::I32(splits as i32),
                    KernelArg::I32(head_dim as i32),
                ],
            )?;
        }
        Ok(out)
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[u32]) -> Result<CudaTensor, BackendError> {
        if let Some(r) = rows.iter().find(|&&r| r as usize >= x.rows) {
            return Err(BackendError::Batch(format!("row {r} is outside the tensor of {} rows", x.rows)));
        }
        // In the tensor's own dtype: the f32 logits are gathered too.
        let buf = self.handle.buffer(rows.len() * x.cols * x.dtype.size_in_bytes())?;
        let out = CudaTensor { buf, rows: rows.len(), cols: x.cols, dtype: x.dtype };
        if !rows.is_empty() {
            let indices = self.handle.upload(bytemuck::cast_slice(rows))?;
            self.launch_gather_rows(&out, x, indices.ptr())?;
        }
        Ok(out)
    }

    fn sample_rows(&self, x: &CudaTensor, sampling: &[RowSampling]) -> Result<Vec<SampledRow>, BackendError> {
        if x.dtype != DType::F32 {
            return Err(BackendError::Batch("sample_rows: logits must be f32".into()));
        }
        if sampling.len() != x.rows {
            return Err(BackendError::Batch(format!("{} sampling rules for {} rows", sampling.len(), x.rows)));
        }
        if x.rows == 0 {
            return Ok(Vec::new());
        }
        let plan = SamplingUpload::new(sampling, x.cols);
        // One output buffer, downloaded in one copy: the tokens, then each logprobs row.
        let out = self.handle.buffer(4 * (x.rows + plan.logprob_rows.len() * plan.logprob_width()))?;
        let tokens = out.ptr();
        let logprobs_out = tokens + 4 * x.rows as u64;
        let device = self.handle.device();
        if plan.words.is_empty() {
            device.launch(
                "pagoda_argmax_f32",
                geometry::argmax(x.rows),
                &[KernelArg::Ptr(tokens), KernelArg::Ptr(x.ptr()), KernelArg::I32(x.cols as i32)],
            )?;
        } else {
            // Everything the rules say, in one upload: the rules, the edits, the logprob rows.
            let words = self.handle.upload(bytemuck::cast_slice(&plan.words))?;
            let word = |i: usize| words.ptr() + 4 * i as u64;
            // The logprobs describe the raw logits: keep those rows before the edits change them.
            // Their indices are in the upload already.
            let raw = if plan.logprob_rows.is_empty() {
                None
            } else {
                let n = plan.logprob_rows.len();
                let raw =
                    CudaTensor { buf: self.handle.buffer(n * x.cols * 4)?, rows: n, cols: x.cols, dtype: DType::F32 };
                self.launch_gather_rows(&raw, x, word(plan.logprob_rows_at))?;
                Some(raw)
            };
            if plan.num_edits > 0 {
                device.launch(
                    "pagoda_logit_edits_f32",
                    geometry::elementwise(plan.num_edits),
                    &[
                        KernelArg::Ptr(x.ptr()),
                        KernelArg::Ptr(word(plan.edits_at)),
                        KernelArg::I32(plan.num_edits as i32),
                        KernelArg::I32(x.cols as i32),
                    ],
                )?;
            }
            if plan.num_masks > 0 {
                device.launch(
                    "pagoda_token_mask_f32",
                    geometry::elementwise(plan.num_masks * x.cols),
                    &[
                        KernelArg::Ptr(x.ptr()),
                        KernelArg::Ptr(word(plan.masks_at)),
                        KernelArg::I32(plan.num_masks as i32),
                        KernelArg::I32(plan.mask_words as i32),
                        KernelArg::I32(x.cols as i32),
                    ],
                )?;
            }
            device.launch(
                "pagoda_sample_f32",
                geometry::argmax(x.rows),
                &[
                    KernelArg::Ptr(tokens),
                    KernelArg::Ptr(x.ptr()),
                    KernelArg::Ptr(word(0)),
                    KernelArg::I32(x.cols as i32),
                ],
            )?;
            if let Some(raw) = raw {
                device.launch(
                    "pagoda_logprobs_f32",
                    geometry::argmax(raw.rows),
                    &[
                        KernelArg::Ptr(logprobs_out),
                        KernelArg::Ptr(raw.ptr()),
                        KernelArg::Ptr(tokens),
                        KernelArg::Ptr(word(plan.logprob_rows_at)),
                        KernelArg::I32(plan.max_logprobs as i32),
                        KernelArg::I32(x.cols as i32),
                    ],
                )?;
            }
        }
        let mut words = vec![0u32; out.num_bytes() / 4];
        device.copy_to_host(out.ptr(), bytemuck::cast_slice_mut(&mut words))?;
        Ok(plan.unpack(sampling, &words[..x.rows], &words[x.rows..]))
    }

    fn rows(&self, x: &CudaTensor) -> usize {
        x.rows
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>, BackendError> {
        let len = x.rows * x.cols;
        let mut bytes = vec![0u8; len * x.dtype.size_in_bytes()];
        self.handle.device().copy_to_host(x.ptr(), &mut bytes)?;
        let mut out = vec![0f32; len];
        crate::weights::convert_to_f32(x.dtype, &bytes, &mut out);
        Ok(out)
    }
}
