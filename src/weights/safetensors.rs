//! The safetensors container format: an 8-byte little-endian header length, a JSON header mapping
//! each tensor name to its dtype, shape and byte range in the data section, then the data.
//!
//! Parsed and validated by the `safetensors` crate (Hugging Face's own reader), wrapped so that
//! every error still names the problem precisely: where the crate only says a file is not fully
//! covered or that some tensor's offsets are wrong, the header's entries (the crate's own
//! `TensorInfo`) are read again to name the tensor and the byte counts involved, because a
//! truncated download is the error people meet most.

use std::ops::Range;

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorInfo};

use super::DType;

pub(super) struct ParsedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range within the file.
    pub range: Range<usize>,
}

pub(super) fn parse_header(file: &[u8]) -> Result<Vec<ParsedTensor>, String> {
    let (header_len, metadata) = SafeTensors::read_metadata(file).map_err(|e| explain(file, e))?;
    let data_start = 8 + header_len;
    let mut tensors = Vec::new();
    for name in metadata.offset_keys() {
        let info = metadata.info(&name).expect("offset_keys names the tensors");
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(format!("tensor '{name}': dtype {other} is not supported (expected F32, F16 or BF16)"));
            }
        };
        let (begin, end) = info.data_offsets;
        tensors.push(ParsedTensor {
            name,
            dtype,
            shape: info.shape.clone(),
            range: data_start + begin..data_start + end,
        });
    }
    Ok(tensors)
}

/// The crate's error in the words of someone looking at a broken checkpoint.
fn explain(file: &[u8], error: SafeTensorError) -> String {
    let header_len = file.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    match error {
        SafeTensorError::HeaderTooSmall => {
            format!("not a safetensors file: {} bytes is too short for a header", file.len())
        }
        SafeTensorError::HeaderTooLarge => {
            format!("not a safetensors file: header length {} is implausible", header_len.unwrap_or_default())
        }
        SafeTensorError::InvalidHeaderLength => format!(
            "truncated: the header needs {} bytes but the file has only {} after the length",
            header_len.unwrap_or_default(),
            file.len().saturating_sub(8)
        ),
        SafeTensorError::InvalidHeaderDeserialization(_) if unknown_dtype(file).is_some() => {
            let (name, dtype) = unknown_dtype(file).expect("checked");
            format!("tensor '{name}': dtype {dtype} is not supported (expected F32, F16 or BF16)")
        }
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
            format!("not a safetensors file: the header is not a JSON object of tensors ({error})")
        }
        SafeTensorError::MetadataIncompleteBuffer
        | SafeTensorError::TensorInvalidInfo
        | SafeTensorError::InvalidOffset(_)
        | SafeTensorError::MisalignedSlice => {
            let data_len = file.len().saturating_sub(8 + header_len.unwrap_or_default());
            entries(file)
                .and_then(|entries| {
                    entries.into_iter().find_map(|(name, info)| {
                        let (begin, end) = info.data_offsets;
                        let bits = info.shape.iter().try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d));
                        let Some(needed) = bits.map(|b| b / 8) else {
                            return Some(format!("tensor '{name}': shape {:?} overflows", info.shape));
                        };
                        if end < begin || end - begin != needed {
                            Some(format!(
                                "tensor '{name}': data_offsets [{begin}, {end}] hold {} bytes but shape {:?} of {} needs {needed}",
                                end.saturating_sub(begin),
                                info.shape,
                                info.dtype
                            ))
                        } else if end > data_len {
                            Some(format!(
                                "truncated: tensor '{name}' ends at byte {end} of the data section but the file holds only {data_len} bytes of data"
                            ))
                        } else {
                            None
                        }
                    })
                })
                .unwrap_or_else(|| match error {
                    SafeTensorError::MetadataIncompleteBuffer => format!(
                        "the tensors do not cover the {data_len} bytes of the data section exactly (extra bytes after the last tensor?)"
                    ),
                    other => format!("invalid header: {other}"),
                })
        }
        other => format!("invalid header: {other}"),
    }
}

/// A tensor whose dtype the crate does not know (a newer format's), with that dtype.
fn unknown_dtype(file: &[u8]) -> Option<(String, String)> {
    let len = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let header = file.get(8..8usize.checked_add(len)?)?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    map.into_iter().filter(|(name, _)| name != "__metadata__").find_map(|(name, v)| {
        let dtype = v.get("dtype")?.as_str()?.to_string();
        serde_json::from_value::<Dtype>(serde_json::Value::String(dtype.clone())).is_err().then_some((name, dtype))
    })
}

/// The header's tensor entries (without `__metadata__`), for naming what is wrong.
fn entries(file: &[u8]) -> Option<Vec<(String, TensorInfo)>> {
    let len = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let header = file.get(8..8usize.checked_add(len)?)?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut out: Vec<(String, TensorInfo)> = map
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .filter_map(|(name, v)| Some((name, serde_json::from_value(v).ok()?)))
        .collect();
    out.sort_by_key(|(_, info)| info.data_offsets);
    Some(out)
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
        let mut longer = file.clone();
        longer.extend_from_slice(&[0; 3]);
        let err = parse_header(&longer).err().unwrap();
        assert!(err.contains("do not cover the 19 bytes of the data section exactly"), "{err}");
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
        // A dtype from a newer format than the crate knows is named the same way.
        let header = br#"{"w":{"dtype":"F3","shape":[2],"data_offsets":[0,2]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[0, 0]);
        let err = parse_header(&file).err().unwrap();
        assert_eq!(err, "tensor 'w': dtype F3 is not supported (expected F32, F16 or BF16)");

        let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[0; 4]);
        let err = parse_header(&file).err().unwrap();
        assert_eq!(err, "tensor 'w': data_offsets [0, 4] hold 4 bytes but shape [2] of F32 needs 8");
    }
}
