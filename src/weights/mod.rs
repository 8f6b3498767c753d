//! Model weights on disk: safetensors files, single or sharded, or one GGUF file, memory-mapped.
//!
//! The store maps each file once and hands out [`RawTensor`]s: a name, a dtype, a shape and a byte
//! range inside that mapping. Nothing here copies tensor data in a stored float type; a backend
//! decides whether to use the bytes in place (the CPU) or upload them (a GPU). The one exception is
//! GGUF: a quantized tensor, or one whose rows llama.cpp's converter reordered, is decoded to f32
//! when it is looked up (once per lookup, never cached, so a GPU backend that uploads and drops it
//! holds one such tensor on the host at a time). GGUF tensors are named as in the Hugging Face
//! checkpoint they came from, so the model code reads both formats alike. Every check that can fail on a bad file happens
//! when the store is opened or a tensor is looked up, so a broken checkpoint fails at load with the
//! file and the problem named, never later with a panic.

mod ggml;
pub mod gguf;
mod safetensors;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

pub use self::ggml::GgmlType;
pub use self::gguf::MetaValue;
pub use self::safetensors::serialize;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name safetensors headers use.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// Parses the names `config.json` uses (`torch_dtype` / `dtype`) and vLLM's `--dtype` values.
    pub fn from_config_name(name: &str) -> Option<DType> {
        match name {
            "float32" | "float" | "f32" => Some(DType::F32),
            "float16" | "half" | "f16" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("no weights found in {dir}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("{path}: tensor '{name}' is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor '{name}' has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
}

/// The bytes of one weight file: a read-only memory map, or an owned buffer for weights built in
/// memory (the embedded demo model), or one tensor decoded from a GGUF file.
pub enum Buffer {
    Mapped(Mmap),
    Owned(Vec<u8>),
    Decoded(Vec<f32>),
}

impl Buffer {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Buffer::Mapped(map) => map,
            Buffer::Owned(vec) => vec,
            Buffer::Decoded(values) => bytemuck::cast_slice(values),
        }
    }
}

/// One tensor inside a [`Buffer`], with the file it came from for error messages.
#[derive(Clone)]
pub struct RawTensor {
    buffer: Arc<Buffer>,
    range: Range<usize>,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub name: String,
    pub path: Arc<Path>,
}

impl RawTensor {
    pub fn bytes(&self) -> &[u8] {
        &self.buffer.bytes()[self.range.clone()]
    }

    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values widened to f32. Used for small tensors (norm weights, biases) that backends keep
    /// in their compute type; large matrices are used in place.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.num_elements()];
        convert_to_f32(self.dtype, self.bytes(), &mut out);
        out
    }
}

/// Widens `src` (raw little-endian bytes of `dtype`) into `dst`. Works for any alignment of `src`.
pub fn convert_to_f32(dtype: DType, src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len() * dtype.size_in_bytes());
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(src) {
            Ok(values) => dst.copy_from_slice(values),
            Err(_) => {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
        },
        DType::F16 | DType::BF16 => {
            use half::slice::HalfFloatSliceExt;
            match bytemuck::try_cast_slice::<u8, u16>(src) {
                Ok(bits) if dtype == DType::F16 => {
                    bytemuck::cast_slice::<u16, half::f16>(bits).convert_to_f32_slice(dst)
                }
                Ok(bits) => bytemuck::cast_slice::<u16, half::bf16>(bits).convert_to_f32_slice(dst),
                Err(_) => {
                    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        let bits = u16::from_le_bytes([s[0], s[1]]);
                        *d = if dtype == DType::F16 {
                            half::f16::from_bits(bits).to_f32()
                        } else {
                            half::bf16::from_bits(bits).to_f32()
                        };
                    }
                }
            }
        }
    }
}

struct TensorEntry {
    file_idx: usize,
    /// The dtype a lookup hands out (f32 for a decoded GGUF tensor).
    dtype: DType,
    shape: Vec<usize>,
    range: Range<usize>,
    decode: Option<Decode>,
}

impl TensorEntry {
    /// Bytes a lookup hands out.
    fn num_bytes(&self) -> usize {
        match self.decode {
            None => self.range.len(),
            Some(_) => self.shape.iter().product::<usize>() * self.dtype.size_in_bytes(),
        }
    }
}

/// How a GGUF tensor becomes its checkpoint's tensor: a quantized one dequantized to f32 (f32, f16
/// and bf16 keep their dtype) and, for Llama's query and key projections, its rows put back in the
/// order the converter found them.
#[derive(Clone, Copy, Debug)]
struct Decode {
    from: GgmlType,
    /// Undo llama.cpp's rotary permutation over this many heads.
    unpermute_heads: Option<usize>,
}

struct WeightFile {
    path: Arc<Path>,
    buffer: Arc<Buffer>,
}

/// All tensors of a checkpoint, by their checkpoint names.
pub struct WeightStore {
    files: Vec<WeightFile>,
    tensors: HashMap<String, TensorEntry>,
    /// What error messages call the checkpoint: the index file when sharded, else the one file.
    origin: PathBuf,
}

pub const SINGLE_FILE: &str = "model.safetensors";

/// What `path` is when it exists but is no regular file (following links), or `None`.
fn not_a_file(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let entry = path.symlink_metadata().ok()?;
    let Ok(target) = path.metadata() else {
        let to = std::fs::read_link(path).map(|t| t.display().to_string()).unwrap_or_default();
        return Some(format!("a symbolic link to '{to}', which does not exist"));
    };
    let kind = target.file_type();
    let what = if kind.is_file() {
        return None;
    } else if kind.is_dir() {
        "a folder"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "a pipe or a socket"
    };
    Some(if entry.file_type().is_symlink() { format!("a symbolic link to {what}") } else { what.to_string() })
}
pub const INDEX_FILE: &str = "model.safetensors.index.json";

impl WeightStore {
    /// Opens `model.safetensors.index.json` (sharded) or `model.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<WeightStore, WeightsError> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            return Self::open_sharded(dir, &index_path);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_file(&single);
        }
        // There but not a file (a folder, a device, a link to nothing): say what it is.
        for path in [index_path, single] {
            if let Some(what) = not_a_file(&path) {
                return Err(WeightsError::Invalid { path, message: format!("{what}, not a weights file") });
            }
        }
        Err(WeightsError::NoWeights { dir: dir.to_path_buf() })
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<WeightStore, WeightsError> {
        let mut store = WeightStore { files: Vec::new(), tensors: HashMap::new(), origin: path.to_path_buf() };
        store.add_file(path, Buffer::Mapped(map_file(path)?), None)?;
        Ok(store)
    }

    /// A store over safetensors bytes held in memory; `name` stands in for a path in messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<WeightStore, WeightsError> {
        let path = PathBuf::from(name);
        let mut store = WeightStore { files: Vec::new(), tensors: HashMap::new(), origin: path.clone() };
        store.add_file(&path, Buffer::Owned(bytes), None)?;
        Ok(store)
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<WeightStore, WeightsError> {
        let text = std::fs::read_to_string(index_path)
            .map_err(|source| WeightsError::Io { path: index_path.to_path_buf(), source })?;
        let invalid = |message: String| WeightsError::Invalid { path: index_path.to_path_buf(), message };
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| invalid("no \"weight_map\" object".into()))?;
        // Shard name -> the tensor names the index assigns to it, in a stable order.
        let mut shards: Vec<(String, Vec<String>)> = Vec::new();
        for (tensor, shard) in map {
            let shard =
                shard.as_str().ok_or_else(|| invalid(format!("weight_map entry for '{tensor}' is not a file name")))?;
            if shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(invalid(format!("weight_map names a file outside the model folder: '{shard}'")));
            }
            match shards.iter_mut().find(|(name, _)| name == shard) {
                Some((_, names)) => names.push(tensor.clone()),
                None => shards.push((shard.to_string(), vec![tensor.clone()])),
            }
        }
        if shards.is_empty() {
            return Err(invalid("weight_map is empty".into()));
        }
        shards.sort_by(|a, b| a.0.cmp(&b.0));
        let mut store = WeightStore { files: Vec::new(), tensors: HashMap::new(), origin: index_path.to_path_buf() };
        for (shard, names) in shards {
            let path = dir.join(&shard);
            if !path.is_file() {
                return Err(invalid(format!("shard '{shard}' listed in weight_map does not exist")));
            }
            store.add_file(&path, Buffer::Mapped(map_file(&path)?), Some(&names))?;
        }
        Ok(store)
    }

    /// Parses one file's header and records its tensors. With `expected`, every listed name must be
    /// in this file (the index said so).
    fn add_file(&mut self, path: &Path, buffer: Buffer, expected: Option<&[String]>) -> Result<(), WeightsError> {
        let invalid = |message: String| WeightsError::Invalid { path: path.to_path_buf(), message };
        let header = safetensors::parse_header(buffer.bytes()).map_err(invalid)?;
        let file_idx = self.files.len();
        for t in header {
            if let Some(previous) = self.tensors.get(&t.name) {
                let other = &self.files[previous.file_idx].path;
                return Err(invalid(format!("tensor '{}' is also stored in {}", t.name, other.display())));
            }
            self.tensors
                .insert(t.name, TensorEntry { file_idx, dtype: t.dtype, shape: t.shape, range: t.range, decode: None });
        }
        if let Some(names) = expected {
            for name in names {
                if self.tensors.get(name).is_none_or(|t| t.file_idx != file_idx) {
                    return Err(invalid(format!(
                        "tensor '{name}' is listed for this file in the index but is not in it"
                    )));
                }
            }
        }
        self.files.push(WeightFile { path: Arc::from(path), buffer: Arc::new(buffer) });
        Ok(())
    }

    /// Opens one GGUF file: its tensors under their Hugging Face names (see [`hf_tensor_name`]), and
    /// its metadata for the caller to read the configuration and tokenizer from.
    pub fn open_gguf(path: &Path) -> Result<(WeightStore, HashMap<String, MetaValue>), WeightsError> {
        let invalid = |message: String| WeightsError::Invalid { path: path.to_path_buf(), message };
        let buffer = Buffer::Mapped(map_file(path)?);
        let header = gguf::parse(buffer.bytes()).map_err(invalid)?;
        let meta = &header.metadata;
        let arch = meta.get("general.architecture").and_then(MetaValue::as_str).unwrap_or("");
        // llama.cpp's converter reorders the rows of Llama's query and key projections so that its
        // rotary kernel sees each pair of rotated values side by side; Qwen2 is stored as is.
        let heads = |key: &str| -> Result<usize, WeightsError> {
            let key = format!("{arch}.attention.{key}");
            meta.get(&key)
                .and_then(MetaValue::as_u64)
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| invalid(format!("metadata '{key}' is missing or not a positive integer")))
        };
        let (q_heads, kv_heads) = match arch {
            "llama" => (Some(heads("head_count")?), Some(heads("head_count_kv").or_else(|_| heads("head_count"))?)),
            _ => (None, None),
        };
        let mut store = WeightStore { files: Vec::new(), tensors: HashMap::new(), origin: path.to_path_buf() };
        for t in header.tensors {
            let name = hf_tensor_name(&t.name).unwrap_or_else(|| t.name.clone());
            let unpermute_heads =
                if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") {
                    q_heads
                } else if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.k_proj.bias") {
                    kv_heads
                } else {
                    None
                };
            if let Some(h) = unpermute_heads
                && !t.shape[0].is_multiple_of(2 * h)
            {
                return Err(invalid(format!("tensor '{}': {} rows do not split into {h} heads", t.name, t.shape[0])));
            }
            let (dtype, decode) = match (t.ggml_type.plain_dtype(), unpermute_heads) {
                (Some(dtype), None) => (dtype, None),
                (plain, _) => (plain.unwrap_or(DType::F32), Some(Decode { from: t.ggml_type, unpermute_heads })),
            };
            let entry = TensorEntry { file_idx: 0, dtype, shape: t.shape, range: t.range, decode };
            if store.tensors.insert(name.clone(), entry).is_some() {
                return Err(invalid(format!("tensor '{name}' is stored twice")));
            }
        }
        store.files.push(WeightFile { path: Arc::from(path), buffer: Arc::new(buffer) });
        Ok((store, header.metadata))
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The tensor `name` with whatever shape it has.
    pub fn tensor_any_shape(&self, name: &str) -> Result<RawTensor, WeightsError> {
        let shape = self
            .tensors
            .get(name)
            .map(|t| t.shape.clone())
            .ok_or_else(|| WeightsError::MissingTensor { path: self.origin.clone(), name: name.to_string() })?;
        self.tensor(name, &shape)
    }

    /// The shape of tensor `name`, without reading (or decoding) it.
    pub fn shape(&self, name: &str) -> Result<&[usize], WeightsError> {
        self.tensors
            .get(name)
            .map(|t| t.shape.as_slice())
            .ok_or_else(|| WeightsError::MissingTensor { path: self.origin.clone(), name: name.to_string() })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<RawTensor, WeightsError> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| WeightsError::MissingTensor { path: self.origin.clone(), name: name.to_string() })?;
        let file = &self.files[entry.file_idx];
        if entry.shape != shape {
            return Err(WeightsError::ShapeMismatch {
                path: file.path.to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let (buffer, range) = match entry.decode {
            None => (file.buffer.clone(), entry.range.clone()),
            Some(decode) => {
                let buffer =
                    decode_tensor(decode, entry.dtype, &file.buffer.bytes()[entry.range.clone()], &entry.shape);
                let len = buffer.bytes().len();
                (Arc::new(buffer), 0..len)
            }
        };
        Ok(RawTensor {
            buffer,
            range,
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            name: name.to_string(),
            path: file.path.clone(),
        })
    }

    /// The dtype most of the bytes are stored in: what `--dtype auto` means when the config is silent.
    pub fn dominant_dtype(&self) -> Option<DType> {
        let mut bytes: HashMap<DType, usize> = HashMap::new();
        for t in self.tensors.values() {
            *bytes.entry(t.dtype).or_default() += t.num_bytes();
        }
        bytes.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }

    /// Total bytes of tensor data (what a backend holds if it copies every weight).
    pub fn num_bytes(&self) -> usize {
        self.tensors.values().map(TensorEntry::num_bytes).sum()
    }
}

/// The Hugging Face name of a tensor llama.cpp's converter renamed (`blk.3.attn_q.weight` is
/// `model.layers.3.self_attn.q_proj.weight`); `None` for names with no counterpart.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// A GGUF tensor of row-major `shape` as `dtype`: dequantized to f32 when quantized (else its bytes
/// as stored), with the rotary row permutation undone.
fn decode_tensor(decode: Decode, dtype: DType, bytes: &[u8], shape: &[usize]) -> Buffer {
    let rows = shape.first().copied().unwrap_or(1);
    let heads = decode.unpermute_heads;
    if decode.from.plain_dtype().is_some() {
        // Only a permuted tensor is decoded when plain: one copy, in the checkpoint's row order.
        let row_bytes = bytes.len() / rows.max(1);
        return Buffer::Owned(heads.map_or_else(|| bytes.to_vec(), |h| unpermute_rows(bytes, row_bytes, rows, h)));
    }
    debug_assert_eq!(dtype, DType::F32, "a quantized tensor is decoded to f32");
    let mut values = vec![0f32; shape.iter().product()];
    ggml::dequantize(decode.from, bytes, &mut values);
    let cols = values.len() / rows.max(1);
    Buffer::Decoded(match heads {
        Some(h) => unpermute_rows(&values, cols, rows, h),
        None => values,
    })
}

/// Undoes llama.cpp's rotary row permutation of `rows` rows of `width` values each: within each of
/// `heads` heads of `d` rows, stored row `2j + h` is the checkpoint's row `h * d/2 + j`.
fn unpermute_rows<T: Copy + Default>(values: &[T], width: usize, rows: usize, heads: usize) -> Vec<T> {
    let head_rows = rows / heads;
    let half = head_rows / 2;
    let mut out = vec![T::default(); values.len()];
    for h in 0..heads {
        for j in 0..half {
            for part in 0..2 {
                let stored = h * head_rows + 2 * j + part;
                let original = h * head_rows + part * half + j;
                out[original * width..(original + 1) * width]
                    .copy_from_slice(&values[stored * width..(stored + 1) * width]);
            }
        }
    }
    out
}

fn map_file(path: &Path) -> Result<Mmap, WeightsError> {
    let file = File::open(path).map_err(|source| WeightsError::Io { path: path.to_path_buf(), source })?;
    // SAFETY: the map is read-only and the model folder is ours while we serve. If another process
    // truncated the file under us, reads would fault; model sync never rewrites a file in place
    // (it renames finished files into position), which is the invariant this relies on.
    unsafe { Mmap::map(&file) }.map_err(|source| WeightsError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_model(dir: &Path, file: &str, tensors: &[(&str, DType, Vec<usize>)]) {
        let owned: Vec<(String, DType, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, d, s)| (n.to_string(), *d, s.clone(), vec![0u8; s.iter().product::<usize>() * d.size_in_bytes()]))
            .collect();
        std::fs::write(dir.join(file), serialize(&owned)).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pagoda-weights-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn opens_single_file_and_checks_shapes() {
        let dir = temp_dir("single");
        write_model(&dir, SINGLE_FILE, &[("a", DType::F32, vec![2, 3]), ("b", DType::BF16, vec![5])]);
        let store = WeightStore::open(&dir).unwrap();
        let a = store.tensor("a", &[2, 3]).unwrap();
        assert_eq!(a.bytes().len(), 24);
        let err = store.tensor("b", &[4]).err().unwrap().to_string();
        assert!(err.contains("tensor 'b' has shape [5], expected [4]"), "{err}");
        let err = store.tensor("c", &[1]).err().unwrap().to_string();
        assert!(err.ends_with("model.safetensors: tensor 'c' is missing"), "{err}");
        assert_eq!(store.dominant_dtype(), Some(DType::F32));
    }

    #[test]
    fn opens_sharded_checkpoints_through_the_index() {
        let dir = temp_dir("sharded");
        write_model(&dir, "model-00001-of-00002.safetensors", &[("a", DType::F16, vec![4])]);
        write_model(&dir, "model-00002-of-00002.safetensors", &[("b", DType::F16, vec![2])]);
        let index = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
        std::fs::write(dir.join(INDEX_FILE), index).unwrap();
        let store = WeightStore::open(&dir).unwrap();
        assert_eq!(store.tensor("b", &[2]).unwrap().path.file_name().unwrap(), "model-00002-of-00002.safetensors");

        let index =
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00003-of-00003.safetensors"}}"#;
        std::fs::write(dir.join(INDEX_FILE), index).unwrap();
        let err = WeightStore::open(&dir).err().unwrap().to_string();
        assert!(err.contains("shard 'model-00003-of-00003.safetensors' listed in weight_map does not exist"), "{err}");
    }

    #[test]
    fn converts_every_dtype_to_f32() {
        let values = [1.5f32, -2.0, 0.25];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        for (dtype, bytes) in [(DType::F32, f32_bytes), (DType::BF16, bf16_bytes), (DType::F16, f16_bytes)] {
            let mut out = [0f32; 3];
            convert_to_f32(dtype, &bytes, &mut out);
            assert_eq!(out, values);
            // Misaligned input takes the byte-wise path and gives the same values.
            let mut shifted = vec![0u8];
            shifted.extend_from_slice(&bytes);
            convert_to_f32(dtype, &shifted[1..], &mut out);
            assert_eq!(out, values);
        }
    }

    /// Llama's query and key rows in a GGUF file come back in the checkpoint's order in their own
    /// dtype (bf16 stays bf16: the model's bytes are not doubled), and quantized ones as f32.
    #[test]
    fn gguf_query_and_key_rows_are_unpermuted_in_their_own_dtype() {
        use gguf::MetaValue;
        // Two heads of four rows, three columns: value = 10 × row + column in the checkpoint.
        let (rows, cols, heads) = (8, 3, 2);
        let original: Vec<f32> = (0..rows * cols).map(|i| (10 * (i / cols) + i % cols) as f32).collect();
        let mut stored = vec![0f32; rows * cols];
        for h in 0..heads {
            for part in 0..2 {
                for j in 0..2 {
                    let (from, to) = (h * 4 + part * 2 + j, h * 4 + 2 * j + part);
                    stored[to * cols..(to + 1) * cols].copy_from_slice(&original[from * cols..(from + 1) * cols]);
                }
            }
        }
        let bf16 = |v: &[f32]| v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect::<Vec<u8>>();
        let q8 = {
            // One Q8_0 block per row of 32: scale 1, then the values as i8 (columns padded to 32).
            let mut out = Vec::new();
            for r in 0..rows {
                out.extend(half::f16::from_f32(1.0).to_le_bytes());
                out.extend((0..32).map(|c| if c < cols { stored[r * cols + c] as i8 as u8 } else { 0 }));
            }
            out
        };
        let meta = [
            ("general.architecture", MetaValue::String("llama".into())),
            ("llama.attention.head_count", MetaValue::Int(heads as i64)),
            ("llama.attention.head_count_kv", MetaValue::Int(heads as i64)),
        ];
        let tensors = [
            ("blk.0.attn_q.weight".to_string(), vec![rows, cols], GgmlType::BF16, bf16(&stored)),
            ("blk.0.attn_v.weight".to_string(), vec![rows, cols], GgmlType::BF16, bf16(&stored)),
            ("blk.1.attn_k.weight".to_string(), vec![rows, 32], GgmlType::Q8_0, q8),
        ];
        let dir = temp_dir("gguf-unpermute");
        let path = dir.join("m.gguf");
        std::fs::write(&path, gguf::serialize(&meta, &tensors)).unwrap();
        let (store, _) = WeightStore::open_gguf(&path).unwrap();
        let q = store.tensor("model.layers.0.self_attn.q_proj.weight", &[rows, cols]).unwrap();
        assert_eq!(q.dtype, DType::BF16);
        assert_eq!(q.bytes(), bf16(&original), "rows back in the checkpoint's order, as stored");
        let v = store.tensor("model.layers.0.self_attn.v_proj.weight", &[rows, cols]).unwrap();
        assert_eq!(v.bytes(), bf16(&stored), "other tensors are not reordered");
        let k = store.tensor("model.layers.1.self_attn.k_proj.weight", &[rows, 32]).unwrap();
        assert_eq!(k.dtype, DType::F32);
        let k = k.to_f32_vec();
        for r in 0..rows {
            assert_eq!(&k[r * 32..r * 32 + cols], &original[r * cols..(r + 1) * cols], "row {r}");
        }
        assert_eq!(store.num_bytes(), 2 * rows * cols * 2 + rows * 32 * 4);
    }
}
