//! The GGUF container (llama.cpp's format): a header of typed key/value metadata and tensor
//! descriptions, then the aligned tensor data, each tensor in a ggml type (plain floats or
//! quantized blocks, see [`super::ggml`]).
//!
//! Read by hand: the format is small, and the Rust GGUF readers on crates.io are young,
//! little-used crates that allocate what a header claims before checking it against the file.
//! Here every count and offset is checked against the bytes that are there, so a truncated or
//! hostile file is one message naming the field, never a panic or a huge allocation.

use std::collections::HashMap;
use std::ops::Range;

use super::ggml::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    Int(i64),
    /// u64 values above `i64::MAX` (never seen in practice, kept exact).
    UInt(u64),
    Float(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Int(v) => u64::try_from(*v).ok(),
            MetaValue::UInt(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(v) => Some(*v),
            MetaValue::Int(v) => Some(*v as f64),
            MetaValue::UInt(v) => Some(*v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's description: its ggml type, its shape in row-major order (GGUF lists dimensions
/// fastest first; this is reversed), and its absolute byte range in the file.
pub struct GgufTensor {
    pub name: String,
    pub ggml_type: GgmlType,
    pub shape: Vec<usize>,
    pub range: Range<usize>,
}

/// A parsed GGUF header.
pub struct GgufHeader {
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: Vec<GgufTensor>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            format!("truncated: {what} at byte {} needs {n} bytes, the file has {}", self.pos, self.bytes.len())
        })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items that take at least `min_item_bytes` each: refused when the rest of the
    /// file could not hold that many, so a corrupt count never becomes a huge allocation.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize, String> {
        let n = self.u64(what)?;
        let room = (self.bytes.len() - self.pos) / min_item_bytes.max(1);
        if n > room as u64 {
            return Err(format!("{what} is {n}, more than the rest of the file can hold"));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.count(1, &format!("length of {what}"))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<MetaValue, String> {
        let what = || format!("value of '{key}'");
        Ok(match type_id {
            0 => MetaValue::Int(self.array::<1>(&what())?[0] as i64),
            1 => MetaValue::Int(i8::from_le_bytes(self.array(&what())?) as i64),
            2 => MetaValue::Int(u16::from_le_bytes(self.array(&what())?) as i64),
            3 => MetaValue::Int(i16::from_le_bytes(self.array(&what())?) as i64),
            4 => MetaValue::Int(self.u32(&what())? as i64),
            5 => MetaValue::Int(i32::from_le_bytes(self.array(&what())?) as i64),
            6 => MetaValue::Float(f32::from_le_bytes(self.array(&what())?) as f64),
            7 => match self.array::<1>(&what())?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                other => return Err(format!("'{key}': boolean byte {other} is neither 0 nor 1")),
            },
            8 => MetaValue::String(self.string(&what())?),
            9 => {
                if depth > 0 {
                    return Err(format!("'{key}': arrays of arrays are not supported"));
                }
                let item_type = self.u32(&format!("item type of '{key}'"))?;
                let min_item_bytes = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                let n = self.count(min_item_bytes, &format!("length of '{key}'"))?;
                // Capacity from the bytes the items take, not the (larger) values they become.
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => {
                let v = self.u64(&what())?;
                i64::try_from(v).map(MetaValue::Int).unwrap_or(MetaValue::UInt(v))
            }
            11 => MetaValue::Int(i64::from_le_bytes(self.array(&what())?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.array(&what())?)),
            other => return Err(format!("'{key}': unknown metadata value type {other}")),
        })
    }
}

/// Parses the header of a whole GGUF file held in `file` and checks every tensor's bytes lie
/// inside it.
pub fn parse(file: &[u8]) -> Result<GgufHeader, String> {
    let mut r = Reader { bytes: file, pos: 0 };
    if file.len() < 4 || &file[..4] != MAGIC {
        return Err("not a GGUF file (it does not start with \"GGUF\")".into());
    }
    r.pos = 4;
    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (convert it again with a current llama.cpp)".into()),
        v if v.swap_bytes() <= 3 => return Err("big-endian GGUF files are not supported".into()),
        v => return Err(format!("GGUF version {v} is not supported (2 or 3)")),
    }
    // A tensor description takes at least 8 (name length) + 4 + 4 + 8 bytes; a key/value 8 + 4 + 1.
    let num_tensors = r.count(24, "tensor count")?;
    let num_kv = r.count(13, "metadata count")?;
    let mut metadata = HashMap::with_capacity(num_kv);
    for i in 0..num_kv {
        let key = r.string(&format!("metadata key {i}"))?;
        let type_id = r.u32(&format!("type of '{key}'"))?;
        let value = r.value(type_id, &key, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| *a > 0 && a.is_power_of_two())
            .ok_or_else(|| format!("general.alignment {v:?} is not a power of two"))?,
    };
    let mut described = Vec::with_capacity(num_tensors);
    for i in 0..num_tensors {
        let name = r.string(&format!("name of tensor {i}"))?;
        let n_dims = r.u32(&format!("dimension count of '{name}'"))?;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!("tensor '{name}': {n_dims} dimensions (GGUF allows 1 to 4)"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&format!("dimensions of '{name}'"))?);
        }
        let type_id = r.u32(&format!("type of '{name}'"))?;
        let offset = r.u64(&format!("offset of '{name}'"))?;
        described.push((name, dims, type_id, offset));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(described.len());
    for (name, dims, type_id, offset) in described {
        let ggml_type = GgmlType::from_id(type_id).map_err(|e| format!("tensor '{name}': {e}"))?;
        let num_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= usize::MAX as u64)
            .ok_or_else(|| format!("tensor '{name}': shape {dims:?} overflows"))? as usize;
        if !(dims[0] as usize).is_multiple_of(ggml_type.block_elements()) {
            return Err(format!(
                "tensor '{name}': rows of {} elements are not whole {} blocks of {}",
                dims[0],
                ggml_type.name(),
                ggml_type.block_elements()
            ));
        }
        if offset % alignment != 0 {
            return Err(format!("tensor '{name}': offset {offset} is not aligned to {alignment}"));
        }
        // Decoded tensors take 4 bytes a value: a shape whose f32 size overflows is refused here.
        let num_bytes =
            ((num_elements / ggml_type.block_elements()) as u64).checked_mul(ggml_type.block_bytes() as u64);
        let decoded_fits = (num_elements as u64).checked_mul(4).is_some_and(|b| b <= isize::MAX as u64);
        let (Some(num_bytes), true) = (num_bytes, decoded_fits) else {
            return Err(format!("tensor '{name}': shape {dims:?} overflows"));
        };
        let begin = data_start.checked_add(offset);
        let end = begin.and_then(|b| b.checked_add(num_bytes));
        let (Some(begin), Some(end)) = (begin, end) else {
            return Err(format!("tensor '{name}': offset {offset} overflows"));
        };
        if end > file.len() as u64 {
            return Err(format!(
                "truncated: tensor '{name}' ends at byte {end} but the file has only {} bytes",
                file.len()
            ));
        }
        let shape = dims.iter().rev().map(|&d| d as usize).collect();
        tensors.push(GgufTensor { name, ggml_type, shape, range: begin as usize..end as usize });
    }
    Ok(GgufHeader { version, metadata, tensors })
}

/// Writes a GGUF file (version 3) from metadata and tensors given as (name, row-major shape, ggml
/// type, bytes): what tests use to build small GGUF models.
pub fn serialize(metadata: &[(&str, MetaValue)], tensors: &[(String, Vec<usize>, GgmlType, Vec<u8>)]) -> Vec<u8> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn put_value(out: &mut Vec<u8>, v: &MetaValue, with_type: bool) {
        let (id, bytes): (u32, Vec<u8>) = match v {
            MetaValue::Int(i) => (11, i.to_le_bytes().to_vec()),
            MetaValue::UInt(u) => (10, u.to_le_bytes().to_vec()),
            MetaValue::Float(f) => (12, f.to_le_bytes().to_vec()),
            MetaValue::Bool(b) => (7, vec![*b as u8]),
            MetaValue::String(s) => {
                let mut b = Vec::new();
                put_str(&mut b, s);
                (8, b)
            }
            MetaValue::Array(items) => {
                let mut b = Vec::new();
                let item = items.first().cloned().unwrap_or(MetaValue::Int(0));
                let mut probe = Vec::new();
                put_value(&mut probe, &item, true);
                b.extend_from_slice(&probe[..4]);
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items {
                    put_value(&mut b, it, false);
                }
                (9, b)
            }
        };
        if with_type {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&bytes);
    }
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        put_value(&mut out, value, true);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for (name, shape, ggml_type, bytes) in tensors {
        put_str(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&ggml_type.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + bytes.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    let data_start = (out.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    for ((_, _, _, bytes), offset) in tensors.iter().zip(offsets) {
        out.resize((data_start + offset) as usize, 0);
        out.extend_from_slice(bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_file() -> Vec<u8> {
        let meta = [
            ("general.architecture", MetaValue::String("llama".into())),
            ("llama.block_count", MetaValue::Int(2)),
            (
                "tokenizer.ggml.tokens",
                MetaValue::Array(vec![MetaValue::String("a".into()), MetaValue::String("b".into())]),
            ),
        ];
        let t = |n: &str, shape: Vec<usize>| {
            let bytes = vec![0u8; shape.iter().product::<usize>() * 4];
            (n.to_string(), shape, GgmlType::F32, bytes)
        };
        serialize(&meta, &[t("a", vec![3, 32]), t("b", vec![5])])
    }

    #[test]
    fn reads_metadata_and_tensor_layout() {
        let file = small_file();
        let header = parse(&file).unwrap();
        assert_eq!(header.version, 3);
        assert_eq!(header.metadata["general.architecture"].as_str(), Some("llama"));
        assert_eq!(header.metadata["llama.block_count"].as_u64(), Some(2));
        assert_eq!(header.metadata["tokenizer.ggml.tokens"].as_array().unwrap().len(), 2);
        assert_eq!(header.tensors[0].shape, vec![3, 32]);
        assert_eq!(header.tensors[0].range.len(), 3 * 32 * 4);
        assert_eq!(header.tensors[1].range.start % 32, 0);
        assert_eq!(header.tensors[1].range.end, file.len());
    }

    #[test]
    fn every_truncation_is_an_error_naming_what_is_missing() {
        let file = small_file();
        for len in 0..file.len() {
            let err = match parse(&file[..len]) {
                Ok(_) => panic!("{len} bytes parsed"),
                Err(e) => e,
            };
            assert!(
                err.contains("truncated") || err.contains("not a GGUF") || err.contains("can hold"),
                "{len}: {err}"
            );
        }
    }

    #[test]
    fn implausible_counts_are_refused_before_allocating() {
        let mut file = small_file();
        file[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&file).err().unwrap().contains("tensor count is 18446744073709551615"));
        let mut file = small_file();
        file[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(parse(&file).err().unwrap(), "big-endian GGUF files are not supported");
    }
}
