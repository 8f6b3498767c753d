//! The safetensors container format: an 8-byte little-endian header length, a JSON header mapping
//! each tensor name to its dtype, shape and byte range in the data section, then the data.
//!
//! Read by hand rather than through the `safetensors` crate so that every problem comes back as a
//! message naming the tensor and the byte counts involved (a truncated download is the common one).

use std::ops::Range;

use super::DType;

pub(super) struct ParsedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range within the file.
    pub range: Range<usize>,
}

/// Headers larger than this are refused rather than parsed (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: usize = 100 * 1024 * 1024;

pub(super) fn parse_header(file: &[u8]) -> Result<Vec<ParsedTensor>, String> {
    if file.len() < 8 {
        return Err(format!("not a safetensors file: {} bytes is too short for a header", file.len()));
    }
    let header_len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES as u64 {
        return Err(format!("not a safetensors file: header length {header_len} is implausible"));
    }
    let header_len = header_len as usize;
    let data_start = 8 + header_len;
    if data_start > file.len() {
        return Err(format!(
            "truncated: the header needs {header_len} bytes but the file has only {} after the length",
            file.len() - 8
        ));
    }
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&file[8..data_start])
        .map_err(|e| format!("not a safetensors file: header is not a JSON object ({e})"))?;
    let data_len = file.len() - data_start;
    let mut tensors = Vec::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("tensor '{name}': {what}");
        let dtype_name = info.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype"))?;
        let dtype = match dtype_name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => return Err(bad(&format!("dtype {other} is not supported (expected F32, F16 or BF16)"))),
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
        let offsets: Vec<usize> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|o| o.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .filter(|o: &Vec<usize>| o.len() == 2)
            .ok_or_else(|| bad("data_offsets is not a pair of integers"))?;
        let (begin, end) = (offsets[0], offsets[1]);
        let num_bytes = shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad("shape overflows"))?;
        if end < begin || end - begin != num_bytes {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] hold {} bytes but shape {shape:?} of {dtype_name} needs {num_bytes}",
                end.saturating_sub(begin)
            )));
        }
        if end > data_len {
            return Err(format!(
                "truncated: tensor '{name}' ends at byte {end} of the data section but the file holds only {data_len} bytes of data"
            ));
        }
        tensors.push(ParsedTensor { name, dtype, shape, range: data_start + begin..data_start + end });
    }
    Ok(tensors)
}

/// Writes tensors `(name, dtype, shape, little-endian bytes)` as one safetensors file. Used for the
/// embedded demo model and by tests that build checkpoints.
pub fn serialize(tensors: &[(String, DType, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype.safetensors_name(),
                "shape": shape,
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
    }
    let mut header = serde_json::to_vec(&header).expect("a JSON map serializes");
    // Pad the header so the data section starts 8-byte aligned, as the reference writer does; this
    // lets f32 tensors be used in place.
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_tensor() -> Vec<u8> {
        serialize(&[("w".into(), DType::F32, vec![2, 2], vec![0u8; 16])])
    }

    #[test]
    fn round_trips_and_aligns_data() {
        let file = one_tensor();
        let parsed = parse_header(&file).unwrap();
        assert_eq!(parsed[0].shape, vec![2, 2]);
        assert_eq!(parsed[0].range.start % 8, 0);
        assert_eq!(parsed[0].range.len(), 16);
    }

    #[test]
    fn truncated_file_names_the_tensor_and_the_sizes() {
        let file = one_tensor();
        let err = parse_header(&file[..file.len() - 4]).err().unwrap();
        assert_eq!(
            err,
            "truncated: tensor 'w' ends at byte 16 of the data section but the file holds only 12 bytes of data"
        );
        let err = parse_header(&file[..20]).err().unwrap();
        assert!(err.starts_with("truncated: the header needs"), "{err}");
        let err = parse_header(&file[..3]).err().unwrap();
        assert_eq!(err, "not a safetensors file: 3 bytes is too short for a header");
    }

    #[test]
    fn rejects_unsupported_dtypes_and_inconsistent_offsets() {
        let header = br#"{"w":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[0, 0]);
        let err = parse_header(&file).err().unwrap();
        assert_eq!(err, "tensor 'w': dtype I8 is not supported (expected F32, F16 or BF16)");

        let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[0; 4]);
        let err = parse_header(&file).err().unwrap();
        assert_eq!(err, "tensor 'w': data_offsets [0, 4] hold 4 bytes but shape [2] of F32 needs 8");
    }
}
