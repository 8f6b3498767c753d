//! ggml's tensor types as GGUF stores them, and their dequantization to f32.
//!
//! A quantized type packs a fixed number of values (a block) into a fixed number of bytes: f16
//! scales and small integers. Each supported format is decoded here block by block exactly as
//! ggml defines it, in f32 arithmetic (what llama.cpp's reference dequantization and gguf-py
//! compute), and tested against values gguf-py produced.

use half::f16;

/// The ggml types Pagoda reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
}

/// ggml's type ids and names, for messages about the types Pagoda does not read.
const NAMES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
];

pub const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K";

impl GgmlType {
    /// The dtype of an unquantized type, whose bytes are used as stored.
    pub fn plain_dtype(self) -> Option<super::DType> {
        match self {
            GgmlType::F32 => Some(super::DType::F32),
            GgmlType::F16 => Some(super::DType::F16),
            GgmlType::BF16 => Some(super::DType::BF16),
            _ => None,
        }
    }

    pub fn from_id(id: u32) -> Result<GgmlType, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            30 => GgmlType::BF16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            other => {
                let name = NAMES.iter().find(|(i, _)| *i == other).map_or("unknown", |(_, n)| n);
                return Err(format!("ggml type {name} (id {other}) is not supported; supported: {SUPPORTED}"));
            }
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::BF16 => 30,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q6K => 14,
        }
    }

    pub fn name(self) -> &'static str {
        NAMES.iter().find(|(i, _)| *i == self.id()).map_or("?", |(_, n)| n)
    }

    /// Values per block (1 for plain floats).
    pub fn block_elements(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q6K => 210,
        }
    }
}

fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Decodes `src` (whole blocks of `ty`) into `dst`, which holds exactly their values.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let (n, size) = (ty.block_elements(), ty.block_bytes());
    assert_eq!(
        src.len() / size * n,
        dst.len(),
        "dequantize: {} bytes of {} for {} values",
        src.len(),
        ty.name(),
        dst.len()
    );
    match ty {
        GgmlType::F32 => super::convert_to_f32(super::DType::F32, src, dst),
        GgmlType::F16 => super::convert_to_f32(super::DType::F16, src, dst),
        GgmlType::BF16 => super::convert_to_f32(super::DType::BF16, src, dst),
        _ => {
            use rayon::prelude::*;
            // Blocks are independent; a large model's tensors decode on every core at load.
            src.par_chunks_exact(size).zip(dst.par_chunks_exact_mut(n)).with_min_len(64).for_each(|(block, out)| {
                match ty {
                    GgmlType::Q4_0 => q4_0(block, out),
                    GgmlType::Q4_1 => q4_1(block, out),
                    GgmlType::Q8_0 => q8_0(block, out),
                    GgmlType::Q4K => q4_k(block, out),
                    GgmlType::Q6K => q6_k(block, out),
                    _ => unreachable!("plain types are handled above"),
                }
            });
        }
    }
}

/// f16 scale, then 32 4-bit values offset by 8: the low nibbles are values 0..16, the high 16..32.
fn q4_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// f16 scale and minimum, then 32 4-bit values laid out as in Q4_0.
fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        out[j] = (q & 0x0f) as f32 * d + m;
        out[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// f16 scale, then 32 signed bytes.
fn q8_0(b: &[u8], out: &mut [f32]) {
    let d = half(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

/// The 6-bit scale and minimum of sub-block `j` (of 8) in a K-quant's 12 packed scale bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Super-block of 256: f16 scale `d` and `dmin`, 12 bytes of eight 6-bit (scale, min) pairs, then
/// 128 bytes of 4-bit values. Each 64 values use 32 bytes: low nibbles first, then high nibbles,
/// each half with its own sub-block's scale and minimum.
fn q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for j in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * j..32 * j + 32];
        let o = &mut out[64 * j..64 * j + 64];
        for l in 0..32 {
            o[l] = d1 * (q[l] & 0x0f) as f32 - min1;
            o[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

/// Super-block of 256: 128 bytes of low 4 bits, 64 bytes of high 2 bits, sixteen signed 8-bit
/// scales (one per 16 values), then the f16 scale `d`. Values are 6-bit, offset by 32.
fn q6_k(b: &[u8], out: &mut [f32]) {
    let d = half(b, 208);
    for half_block in 0..2 {
        let ql = &b[64 * half_block..64 * half_block + 64];
        let qh = &b[128 + 32 * half_block..128 + 32 * half_block + 32];
        let sc = &b[192 + 8 * half_block..192 + 8 * half_block + 8];
        let o = &mut out[128 * half_block..128 * half_block + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let scale = |k: usize| d * (sc[is + k] as i8) as f32;
            o[l] = scale(0) * q1 as f32;
            o[l + 32] = scale(2) * q2 as f32;
            o[l + 64] = scale(4) * q3 as f32;
            o[l + 96] = scale(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `testdata/ggml_blocks.json` (made by `scripts/ggml-block-fixture.py` with gguf-py): for
    /// each type, the bytes of two blocks and the values gguf-py decodes them to.
    #[test]
    fn every_format_decodes_blocks_as_gguf_py_does() {
        let text = include_str!("testdata/ggml_blocks.json");
        let cases: serde_json::Value = serde_json::from_str(text).unwrap();
        let mut seen = Vec::new();
        for case in cases.as_array().unwrap() {
            let id = case["type_id"].as_u64().unwrap() as u32;
            let ty = GgmlType::from_id(id).unwrap();
            let bytes: Vec<u8> = case["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
            let expected: Vec<f32> =
                case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let mut out = vec![f32::NAN; expected.len()];
            dequantize(ty, &bytes, &mut out);
            for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
                assert!(
                    got == want || (got - want).abs() <= 1e-6 * want.abs(),
                    "{}: value {i}: {got} != {want}",
                    ty.name()
                );
            }
            seen.push(ty);
        }
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q6K,
            GgmlType::F16,
            GgmlType::BF16,
        ] {
            assert!(seen.contains(&ty), "no fixture for {}", ty.name());
        }
    }

    #[test]
    fn unsupported_types_are_named() {
        assert_eq!(
            GgmlType::from_id(13).unwrap_err(),
            format!("ggml type Q5_K (id 13) is not supported; supported: {SUPPORTED}")
        );
        assert!(GgmlType::from_id(99).unwrap_err().starts_with("ggml type unknown (id 99)"));
    }
}
