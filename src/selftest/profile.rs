//! Where a step's device time goes: [`ProfiledDevice`] forwards every call to the device it wraps
//! and, while [`ProfiledDevice::profile`] runs, times each launch, GEMM and copy on its own
//! (`Device::time`: CUDA events on a GPU, waiting for each operation). The times therefore
//! include each operation's launch latency but none of the overlap between the host and the
//! device; their sum against the step's normal time says how much of the step is host work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::cuda::device::{Device, DeviceError, DevicePtr, GemmCall, KernelArg, LaunchConfig};

/// One kind of operation's share of a profiled run.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// The kernel's name, `GEMM m×n×k` in cuBLAS's terms, or the copy's direction.
    pub name: String,
    pub count: usize,
    pub seconds: f64,
}

pub struct ProfiledDevice {
    inner: Arc<dyn Device>,
    on: AtomicBool,
    samples: Mutex<Vec<(String, f64)>>,
}

impl ProfiledDevice {
    pub fn new(inner: Arc<dyn Device>) -> Arc<ProfiledDevice> {
        Arc::new(ProfiledDevice { inner, on: AtomicBool::new(false), samples: Mutex::default() })
    }

    /// Runs `work` with every operation timed; returns its result and the operations' times by
    /// kind, the most expensive first.
    pub fn profile<T>(&self, work: impl FnOnce() -> T) -> (T, Vec<OpTime>) {
        self.samples.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.on.store(true, Ordering::SeqCst);
        let result = work();
        self.on.store(false, Ordering::SeqCst);
        let samples = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        let mut by_name: HashMap<String, OpTime> = HashMap::new();
        for (name, seconds) in samples {
            let entry = by_name.entry(name.clone()).or_insert(OpTime { name, count: 0, seconds: 0.0 });
            entry.count += 1;
            entry.seconds += seconds;
        }
        let mut ops: Vec<OpTime> = by_name.into_values().collect();
        ops.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then_with(|| a.name.cmp(&b.name)));
        (result, ops)
    }

    fn timed(
        &self,
        name: impl FnOnce() -> String,
        op: &mut dyn FnMut() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        if !self.on.load(Ordering::SeqCst) {
            return op();
        }
        let seconds = self.inner.time(op)?;
        self.samples.lock().unwrap_or_else(|e| e.into_inner()).push((name(), seconds));
        Ok(())
    }
}

impl Device for ProfiledDevice {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn num_sms(&self) -> usize {
        self.inner.num_sms()
    }
    fn memory_info(&self) -> Result<(usize, usize), DeviceError> {
        self.inner.memory_info()
    }
    fn alloc(&self, num_bytes: usize) -> Result<DevicePtr, DeviceError> {
        self.inner.alloc(num_bytes)
    }
    fn free(&self, ptr: DevicePtr) {
        self.inner.free(ptr)
    }
    fn copy_to_device(&self, dst: DevicePtr, src: &[u8]) -> Result<(), DeviceError> {
        self.timed(|| "copy to the device".into(), &mut || self.inner.copy_to_device(dst, src))
    }
    fn copy_to_host(&self, src: DevicePtr, dst: &mut [u8]) -> Result<(), DeviceError> {
        self.timed(|| "copy to the host".into(), &mut || self.inner.copy_to_host(src, dst))
    }
    fn memset(&self, dst: DevicePtr, value: u8, num_bytes: usize) -> Result<(), DeviceError> {
        self.timed(|| "memset".into(), &mut || self.inner.memset(dst, value, num_bytes))
    }
    fn copy_on_device(&self, dst: DevicePtr, src: DevicePtr, num_bytes: usize) -> Result<(), DeviceError> {
        self.timed(|| "copy on the device".into(), &mut || self.inner.copy_on_device(dst, src, num_bytes))
    }
    fn time(&self, run: &mut dyn FnMut() -> Result<(), DeviceError>) -> Result<f64, DeviceError> {
        self.inner.time(run)
    }
    fn launch(&self, kernel: &str, config: LaunchConfig, args: &[KernelArg]) -> Result<(), DeviceError> {
        self.timed(|| kernel.to_string(), &mut || self.inner.launch(kernel, config, args))
    }
    fn gemm(&self, call: &GemmCall) -> Result<(), DeviceError> {
        self.timed(
            || format!("GEMM m {} n {} k {} ({} → {})", call.m, call.n, call.k, call.dtype, call.c_dtype),
            &mut || self.inner.gemm(call),
        )
    }
    fn synchronize(&self) -> Result<(), DeviceError> {
        self.inner.synchronize()
    }
    fn begin_capture(&self) -> Result<(), DeviceError> {
        self.inner.begin_capture()
    }
    fn end_capture(&self) -> Result<u64, DeviceError> {
        self.inner.end_capture()
    }
    fn replay(&self, graph: u64) -> Result<(), DeviceError> {
        self.timed(|| "CUDA graph replay".into(), &mut || self.inner.replay(graph))
    }
    fn destroy_graph(&self, graph: u64) {
        self.inner.destroy_graph(graph)
    }
}
