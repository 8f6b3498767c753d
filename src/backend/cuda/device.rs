//! The seam between the CUDA backend's host code and a device: memory, copies, kernel launches by
//! name and cuBLAS-style GEMMs. Two implementations: [`super::driver::CudaDevice`] (cudarc on a
//! real GPU) and, with the `cuda-emu` feature, [`super::emulated::EmulatedDevice`] (host memory,
//! the kernels compiled for the CPU, and a CPU implementation of `cublasGemmEx`'s semantics), so
//! every line of the backend above this trait runs in tests without a GPU.
//!
//! Device memory is named by a plain address ([`DevicePtr`]) and owned by [`DeviceBuffer`], which
//! returns activation-sized buffers to a pool on drop so a warmed-up step allocates nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::weights::DType;

/// An address in device memory (a `CUdeviceptr`, or a host address under emulation).
pub type DevicePtr = u64;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no CUDA device: {0}")]
    Unavailable(String),
    #[error("out of device memory allocating {num_bytes} bytes ({free_bytes} free)")]
    OutOfMemory { num_bytes: usize, free_bytes: usize },
    #[error("kernel {kernel}: {message}")]
    Launch { kernel: String, message: String },
    #[error("GEMM: {0}")]
    Gemm(String),
    #[error("CUDA: {0}")]
    Driver(String),
}

/// Grid and block sizes and dynamic shared memory of one launch (cudarc's `LaunchConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid_dim: (u32, u32, u32),
    pub block_dim: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// One kernel parameter, passed by value as CUDA passes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// A device pointer; 0 is `nullptr`.
    Ptr(DevicePtr),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
}

impl KernelArg {
    /// The parameter's bytes, little-endian, in the low bytes of a u64 slot; a launch hands the
    /// kernel a pointer to this slot and the kernel reads as many bytes as its parameter has.
    pub fn to_slot(self) -> u64 {
        match self {
            KernelArg::Ptr(p) => p,
            KernelArg::I32(v) => v as u32 as u64,
            KernelArg::U32(v) => v as u64,
            KernelArg::U64(v) => v,
            KernelArg::F32(v) => v.to_bits() as u64,
        }
    }
}

/// Whether a GEMM operand is read as stored or transposed (cuBLAS's `transa`/`transb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transpose {
    No,
    Yes,
}

/// `C = alpha · op(A) · op(B) + beta · C` with cuBLAS's conventions: every matrix column-major,
/// `op(A)` is `m × k`, `op(B)` is `k × n`, `C` is `m × n`; leading dimensions in elements. A and B
/// share `dtype`, C is in `c_dtype` (the same, or f32 for logits); accumulation is in f32
/// (`CUBLAS_COMPUTE_32F`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmCall {
    pub transa: Transpose,
    pub transb: Transpose,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: DevicePtr,
    pub lda: usize,
    pub b: DevicePtr,
    pub ldb: usize,
    pub beta: f32,
    pub c: DevicePtr,
    pub ldc: usize,
    pub dtype: DType,
    pub c_dtype: DType,
}

/// What a device must do for the backend. Every call is ordered after the ones before it (one
/// stream); copies to the host wait for the work before them.
pub trait Device: Send + Sync {
    /// The device's name, for logs ("NVIDIA H200", "emulated").
    fn name(&self) -> String;
    /// Streaming multiprocessors: how many thread blocks it takes to fill the device.
    fn num_sms(&self) -> usize;
    /// Free and total device memory in bytes.
    fn memory_info(&self) -> Result<(usize, usize), DeviceError>;
    /// `num_bytes` of device memory, aligned to at least 256 bytes; contents undefined.
    fn alloc(&self, num_bytes: usize) -> Result<DevicePtr, DeviceError>;
    /// Frees what `alloc` returned.
    fn free(&self, ptr: DevicePtr);
    fn copy_to_device(&self, dst: DevicePtr, src: &[u8]) -> Result<(), DeviceError>;
    fn copy_to_host(&self, src: DevicePtr, dst: &mut [u8]) -> Result<(), DeviceError>;
    fn memset(&self, dst: DevicePtr, value: u8, num_bytes: usize) -> Result<(), DeviceError>;
    fn copy_on_device(&self, dst: DevicePtr, src: DevicePtr, num_bytes: usize) -> Result<(), DeviceError>;
    /// Seconds the device spends on the work `run` submits (CUDA events on a GPU, the wall clock
    /// under emulation), waiting for it to finish.
    fn time(&self, run: &mut dyn FnMut() -> Result<(), DeviceError>) -> Result<f64, DeviceError>;
    fn launch(&self, kernel: &str, config: LaunchConfig, args: &[KernelArg]) -> Result<(), DeviceError>;
    fn gemm(&self, call: &GemmCall) -> Result<(), DeviceError>;
    /// Waits for all work so far; a failed kernel surfaces here at the latest.
    fn synchronize(&self) -> Result<(), DeviceError>;
    /// Starts recording the launches and GEMMs issued from now on instead of running them (CUDA
    /// stream capture, relaxed mode: allocations are allowed). Copies, memsets, timing and
    /// synchronization are errors until `end_capture`, as they are to CUDA.
    fn begin_capture(&self) -> Result<(), DeviceError>;
    /// Ends the recording and makes it replayable; returns its id. Ends the recording even when it
    /// fails, so the device is usable afterwards.
    fn end_capture(&self) -> Result<u64, DeviceError>;
    /// Runs a recording again, with the same kernel arguments (so the same buffers) it recorded.
    fn replay(&self, graph: u64) -> Result<(), DeviceError>;
    fn destroy_graph(&self, graph: u64);
}

/// Buffers up to this size are pooled by power-of-two size class; larger ones (weights, the KV
/// cache) are allocated exactly and freed on drop.
const MAX_POOLED_BYTES: usize = 1 << 30;

/// Freed activation buffers by size class, reused by later allocations of the same class.
struct BufferPool {
    device: Arc<dyn Device>,
    free: Mutex<HashMap<usize, Vec<DevicePtr>>>,
    /// Buffers handed out while a graph was being captured: the graph's kernels address them, so
    /// they stay allocated (reused by later work, never freed) as long as the pool lives.
    pinned: Mutex<HashSet<DevicePtr>>,
    capturing: AtomicBool,
    /// Graphs alive: when the last one goes, nothing needs the pinned buffers any more.
    live_graphs: AtomicUsize,
}

impl BufferPool {
    /// Frees the idle buffers no captured graph uses.
    fn release(&self) {
        let pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let mut drained = Vec::new();
        for list in free.values_mut() {
            let (keep, gone): (Vec<DevicePtr>, Vec<DevicePtr>) = list.drain(..).partition(|p| pinned.contains(p));
            *list = keep;
            drained.extend(gone);
        }
        drop((free, pinned));
        for ptr in drained {
            self.device.free(ptr);
        }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // Every buffer and graph holds the handle, so the pool goes last: only idle buffers remain.
        self.pinned.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.release();
    }
}

/// A device together with its buffer pool; what the backend holds.
#[derive(Clone)]
pub struct DeviceHandle {
    device: Arc<dyn Device>,
    pool: Arc<BufferPool>,
}

impl DeviceHandle {
    pub fn new(device: Arc<dyn Device>) -> DeviceHandle {
        let pool = Arc::new(BufferPool {
            device: device.clone(),
            free: Mutex::default(),
            pinned: Mutex::default(),
            capturing: AtomicBool::new(false),
            live_graphs: AtomicUsize::new(0),
        });
        DeviceHandle { device, pool }
    }

    pub fn device(&self) -> &dyn Device {
        &*self.device
    }

    /// The device itself, to wrap (the selftest's profiler) or share.
    pub fn shared_device(&self) -> Arc<dyn Device> {
        self.device.clone()
    }

    /// A buffer of at least `num_bytes`, from the pool when one of its size class is free.
    pub fn buffer(&self, num_bytes: usize) -> Result<DeviceBuffer, DeviceError> {
        let num_bytes = num_bytes.max(1);
        let capturing = self.pool.capturing.load(Ordering::Relaxed);
        if num_bytes > MAX_POOLED_BYTES && !capturing {
            return self.buffer_exact(num_bytes);
        }
        let class = num_bytes.next_power_of_two().max(256);
        let reused = self.pool.free.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&class).and_then(Vec::pop);
        let ptr = match reused {
            Some(ptr) => ptr,
            None => match self.device.alloc(class) {
                Ok(ptr) => ptr,
                // Freeing memory is not allowed while capturing: the capture fails instead.
                Err(DeviceError::OutOfMemory { .. }) if !capturing => {
                    // Give the pool's idle buffers back and try once more before failing.
                    self.release_pool();
                    self.device.alloc(class)?
                }
                Err(e) => return Err(e),
            },
        };
        if capturing {
            self.pool.pinned.lock().unwrap_or_else(|e| e.into_inner()).insert(ptr);
        }
        Ok(DeviceBuffer { handle: self.clone(), ptr, num_bytes, size_class: Some(class) })
    }

    /// Records the device work `capture` issues as a graph instead of running it (see
    /// [`Device::begin_capture`]); the buffers it takes stay allocated for the graph's replays.
    pub fn capture<T, E: From<DeviceError>>(&self, capture: impl FnOnce() -> Result<T, E>) -> Result<(Graph, T), E> {
        self.device.begin_capture()?;
        self.pool.capturing.store(true, Ordering::Relaxed);
        let captured = capture();
        self.pool.capturing.store(false, Ordering::Relaxed);
        let ended = self.device.end_capture();
        let value = captured?;
        let id = ended?;
        self.pool.live_graphs.fetch_add(1, Ordering::Relaxed);
        Ok((Graph { handle: self.clone(), id }, value))
    }

    /// A buffer of exactly `num_bytes`, outside the pool: for weights and the KV cache, which live
    /// as long as the model.
    pub fn buffer_exact(&self, num_bytes: usize) -> Result<DeviceBuffer, DeviceError> {
        let num_bytes = num_bytes.max(1);
        let ptr = self.device.alloc(num_bytes)?;
        Ok(DeviceBuffer { handle: self.clone(), ptr, num_bytes, size_class: None })
    }

    /// Frees every idle pooled buffer.
    pub fn release_pool(&self) {
        self.pool.release();
    }

    /// A buffer holding `bytes`.
    pub fn upload(&self, bytes: &[u8]) -> Result<DeviceBuffer, DeviceError> {
        let buf = self.buffer(bytes.len())?;
        self.device.copy_to_device(buf.ptr, bytes)?;
        Ok(buf)
    }
}

/// A captured graph; destroyed on drop.
pub struct Graph {
    handle: DeviceHandle,
    id: u64,
}

impl Graph {
    pub fn replay(&self) -> Result<(), DeviceError> {
        self.handle.device.replay(self.id)
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        self.handle.device.destroy_graph(self.id);
        if self.handle.pool.live_graphs.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.handle.pool.pinned.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

/// Device memory owned by the backend: pooled buffers go back to the pool when dropped (later work
/// on the same stream is ordered after the work that used them), unpooled ones are freed.
pub struct DeviceBuffer {
    handle: DeviceHandle,
    ptr: DevicePtr,
    num_bytes: usize,
    size_class: Option<usize>,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> DevicePtr {
        self.ptr
    }

    pub fn num_bytes(&self) -> usize {
        self.num_bytes
    }

    pub fn to_host(&self) -> Result<Vec<u8>, DeviceError> {
        let mut out = vec![0u8; self.num_bytes];
        self.handle.device.copy_to_host(self.ptr, &mut out)?;
        Ok(out)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        match self.size_class {
            Some(class) => {
                self.handle.pool.free.lock().unwrap_or_else(|e| e.into_inner()).entry(class).or_default().push(self.ptr)
            }
            None => self.handle.device.free(self.ptr),
        }
    }
}
