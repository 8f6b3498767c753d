//! Launch geometry: one function per kernel of `kernels/*.cu`, used by every launch on a GPU and
//! under emulation alike, and the host-side choices that shape launches (kernel variants, split
//! counts). Plain functions of sizes, unit-tested as such.

use super::device::LaunchConfig;
use crate::weights::DType;

/// Threads per block of the per-row kernels (gathers, rotary) and of the attention kernels.
const ROW_THREADS: u32 = 128;
/// Threads per block of RMSNorm (a multiple of 32, for its block reduction).
const NORM_THREADS: u32 = 256;
/// Threads per block of the elementwise kernels, one element each.
const ELEMENTWISE_THREADS: u32 = 256;

/// Head sizes and query-head group buckets `kernels/attention.cu` is instantiated for.
pub const ATTENTION_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];
pub const ATTENTION_GROUP_BUCKETS: [usize; 4] = [1, 2, 4, 8];

/// Split counts for attention over long contexts in small batches. A fixed set keeps the number of
/// distinct launches (and captured graphs) small.
pub const SPLIT_BUCKETS: [usize; 5] = [1, 2, 4, 8, 16];
/// Each split reads at least this many keys, so that its fixed costs stay small.
const MIN_KEYS_PER_SPLIT: usize = 256;

fn config(grid: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

fn dim(n: usize) -> u32 {
    u32::try_from(n).expect("grid dimension fits in u32")
}

/// `pagoda_gather_rows_*`: one block per output row.
pub fn gather_rows(num_rows: usize) -> LaunchConfig {
    config((dim(num_rows), 1, 1), ROW_THREADS)
}

/// `pagoda_copy_columns_*`: a block per row and 128 columns (grid.y allows 65,535 blocks: widths
/// up to 8,388,480).
pub fn copy_columns(num_rows: usize, width: usize) -> LaunchConfig {
    config((dim(num_rows), dim(width.div_ceil(ROW_THREADS as usize)), 1), ROW_THREADS)
}

/// `pagoda_add_rms_norm_*`: one block per row.
pub fn add_rms_norm(num_rows: usize) -> LaunchConfig {
    config((dim(num_rows), 1, 1), NORM_THREADS)
}

/// `pagoda_add_*`, `pagoda_add_bias_*`, `pagoda_silu_mul_*`, `pagoda_logit_edits_f32`,
/// `pagoda_token_mask_f32`: one thread per element.
pub fn elementwise(len: usize) -> LaunchConfig {
    config((dim(len.div_ceil(ELEMENTWISE_THREADS as usize)), 1, 1), ELEMENTWISE_THREADS)
}

/// `pagoda_rotary_write_kv_*`: one block per token.
pub fn rotary_write_kv(num_tokens: usize) -> LaunchConfig {
    config((dim(num_tokens), 1, 1), ROW_THREADS)
}

/// `pagoda_paged_attention_*`: one block per (KV head, query token, split).
pub fn paged_attention(num_kv_heads: usize, num_tokens: usize, num_splits: usize) -> LaunchConfig {
    config((dim(num_kv_heads), dim(num_tokens), dim(num_splits)), ROW_THREADS)
}

/// Query rows (tokens × query heads of one KV head) of a `pagoda_prefill_attention_*` block, as
/// `PREFILL_ROWS` in `kernels/attention.cu`.
const PREFILL_ROWS: usize = 32;

/// `pagoda_prefill_attention_*`: one block per (KV head, tile of a sequence's query tokens,
/// sequence); a sequence with fewer tiles than the longest leaves its extra blocks idle.
pub fn prefill_attention(
    num_kv_heads: usize,
    max_query_len: usize,
    group_bucket: usize,
    num_seqs: usize,
) -> LaunchConfig {
    let tiles = max_query_len.div_ceil(PREFILL_ROWS / group_bucket);
    config((dim(num_kv_heads), dim(tiles), dim(num_seqs)), ROW_THREADS)
}

/// `pagoda_attention_merge_*`: one block per (query token, head).
pub fn attention_merge(num_tokens: usize, num_heads: usize) -> LaunchConfig {
    config((dim(num_tokens), dim(num_heads), 1), ROW_THREADS)
}

/// `pagoda_argmax_f32` and `pagoda_sample_f32`: one block per row.
pub fn argmax(num_rows: usize) -> LaunchConfig {
    config((dim(num_rows), 1, 1), NORM_THREADS)
}

/// The kernel-name suffix of an activation dtype.
pub fn dtype_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

/// The attention kernel for a head size and a number of query heads per KV head: the smallest
/// group bucket that holds `group`. `None` when no instantiation fits.
pub fn attention_kernel(dtype: DType, head_dim: usize, group: usize) -> Option<String> {
    let bucket = group_bucket(head_dim, group)?;
    Some(format!("pagoda_paged_attention_h{head_dim}_g{bucket}_{}", dtype_suffix(dtype)))
}

/// The prefill attention kernel, instantiated for the same shapes as [`attention_kernel`], and
/// the group bucket its tiles are laid out for.
pub fn prefill_attention_kernel(dtype: DType, head_dim: usize, group: usize) -> Option<(String, usize)> {
    let bucket = group_bucket(head_dim, group)?;
    Some((format!("pagoda_prefill_attention_h{head_dim}_g{bucket}_{}", dtype_suffix(dtype)), bucket))
}

/// The group bucket the attention kernels serve `group` query heads per KV head with.
fn group_bucket(head_dim: usize, group: usize) -> Option<usize> {
    if !ATTENTION_HEAD_DIMS.contains(&head_dim) {
        return None;
    }
    ATTENTION_GROUP_BUCKETS.iter().copied().find(|&b| b >= group && group > 0)
}

/// How many splits the keys of each query token are cut into. One while the batch alone gives
/// every multiprocessor two blocks; otherwise the largest bucket that still leaves every split
/// at least [`MIN_KEYS_PER_SPLIT`] keys of the longest context, without making more than four
/// blocks per multiprocessor.
pub fn attention_splits(num_tokens: usize, num_kv_heads: usize, max_context: usize, num_sms: usize) -> usize {
    let blocks = num_tokens * num_kv_heads;
    if blocks >= 2 * num_sms {
        return 1;
    }
    SPLIT_BUCKETS
        .iter()
        .copied()
        .filter(|&s| s == 1 || (max_context / s >= MIN_KEYS_PER_SPLIT && blocks * s <= 4 * num_sms))
        .max()
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_kernels_round_the_group_up_to_a_bucket() {
        assert_eq!(attention_kernel(DType::BF16, 128, 4).unwrap(), "pagoda_paged_attention_h128_g4_bf16");
        assert_eq!(attention_kernel(DType::F16, 64, 3).unwrap(), "pagoda_paged_attention_h64_g4_f16");
        assert_eq!(attention_kernel(DType::F32, 16, 1).unwrap(), "pagoda_paged_attention_h16_g1_f32");
        assert_eq!(attention_kernel(DType::BF16, 128, 7).unwrap(), "pagoda_paged_attention_h128_g8_bf16");
        assert_eq!(attention_kernel(DType::BF16, 128, 9), None);
        assert_eq!(attention_kernel(DType::BF16, 96, 1), None);
        assert_eq!(attention_kernel(DType::BF16, 128, 0), None);
    }

    #[test]
    fn splits_only_when_the_batch_cannot_fill_the_device() {
        // 132 SMs (H200), 8 KV heads.
        assert_eq!(attention_splits(64, 8, 8192, 132), 1, "512 blocks fill the device");
        assert_eq!(attention_splits(1, 8, 8192, 132), 16, "one long sequence: as many splits as allowed");
        assert_eq!(attention_splits(1, 8, 100, 132), 1, "short contexts never split");
        assert_eq!(attention_splits(1, 8, 512, 132), 2, "every split keeps 256 keys");
        assert_eq!(attention_splits(16, 8, 8192, 132), 4, "at most four blocks per SM");
        assert_eq!(attention_splits(33, 8, 8192, 132), 1, "two blocks per SM already");
        for tokens in 1..200 {
            let s = attention_splits(tokens, 8, 4096, 132);
            assert!(SPLIT_BUCKETS.contains(&s));
        }
    }

    #[test]
    fn grids_cover_every_element_once() {
        for len in [1, 255, 256, 257, 100_000] {
            let c = elementwise(len);
            let threads = c.grid_dim.0 as usize * c.block_dim.0 as usize;
            assert!(threads >= len && threads < len + 256);
        }
        assert_eq!(paged_attention(8, 5, 2).grid_dim, (8, 5, 2));
        assert_eq!(attention_merge(5, 32).grid_dim, (5, 32, 1));
        // Tiles of 32 / group tokens: a 33-token chunk with groups of 4 needs 5 tiles of 8.
        assert_eq!(prefill_attention(8, 33, 4, 3).grid_dim, (8, 5, 3));
        assert_eq!(prefill_attention(8, 32, 1, 1).grid_dim, (8, 1, 1));
        assert_eq!(prefill_attention(2, 1, 8, 7).grid_dim, (2, 1, 7));
        assert_eq!(add_rms_norm(7).block_dim.0 % 32, 0);
    }
}
