//! The real [`Device`]: an NVIDIA GPU through the CUDA driver API and cuBLAS, loaded at run time
//! by cudarc (the binary links no CUDA library and runs where none is installed).
//!
//! cudarc panics on the first call into a library that is absent, so every entry point checks
//! the library's presence first and turns its absence into an error. Kernels come from the fatbin
//! build.rs embeds when nvcc was available; otherwise the embedded source is compiled with NVRTC
//! at start, and the PTX is cached on disk by source hash, architecture and driver version.
//!
//! All work runs on one stream of the device's own, created blocking, so the synchronous copies
//! (which run on the legacy default stream) wait for the kernels before them and the kernels wait
//! for the copies; graphs are captured on that stream (the legacy stream cannot be captured).

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::path::PathBuf;
use std::sync::Mutex;

use cudarc::cublas;
use cudarc::driver::{result, sys};

use super::device::{Device, DeviceError, DevicePtr, GemmCall, KernelArg, LaunchConfig, Transpose};
use crate::weights::DType;

/// cuBLAS's workspace (what NVIDIA recommends for Hopper).
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Kernels compiled by nvcc at build time (empty when the build had no nvcc).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));
/// The kernel sources flattened into one translation unit, for NVRTC.
static SOURCE: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.cu"));

fn driver_error(what: &str, e: result::DriverError) -> DeviceError {
    DeviceError::Driver(format!("{what}: {e:?}"))
}

/// What `--device auto` needs to know: the number of CUDA devices, or why there are none. Never
/// panics, whatever is installed.
pub fn device_count() -> Result<usize, DeviceError> {
    // SAFETY: only checks whether the shared library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err(DeviceError::Unavailable(
            "the NVIDIA driver library libcuda.so.1 was not found (no driver installed, or not on the library path)"
                .into(),
        ));
    }
    result::init().map_err(|e| DeviceError::Unavailable(format!("cuInit failed: {e:?}")))?;
    let count = result::device::get_count().map_err(|e| DeviceError::Unavailable(format!("{e:?}")))?;
    Ok(count.max(0) as usize)
}

pub struct CudaDevice {
    context: sys::CUcontext,
    stream: sys::CUstream,
    /// Captured graphs by id: the graph and its executable instance.
    graphs: Mutex<HashMap<u64, (sys::CUgraph, sys::CUgraphExec)>>,
    next_graph: std::sync::atomic::AtomicU64,
    module: sys::CUmodule,
    functions: Mutex<HashMap<String, sys::CUfunction>>,
    blas: Mutex<cublas::sys::cublasHandle_t>,
    name: String,
    num_sms: usize,
}

// SAFETY: the CUDA driver API and a cuBLAS handle may be used from any thread once the context is
// current there (`bind` does that on every call); the cuBLAS handle is used under its mutex, and
// the function cache and the graphs are behind mutexes too.
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    /// Opens GPU `ordinal`: its primary context, the kernels and a cuBLAS handle.
    pub fn open(ordinal: usize) -> Result<CudaDevice, DeviceError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(DeviceError::Unavailable(format!("CUDA device {ordinal} requested, {count} present")));
        }
        let device = result::device::get(ordinal as i32).map_err(|e| driver_error("cuDeviceGet", e))?;
        // SAFETY: `device` was returned by cuDeviceGet.
        let context =
            unsafe { result::primary_ctx::retain(device) }.map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: the context was just retained.
        unsafe { result::ctx::set_current(context) }.map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        let name = result::device::get_name(device).map_err(|e| driver_error("cuDeviceGetName", e))?;
        let attribute = |a| {
            // SAFETY: `device` is valid and `a` a device attribute.
            unsafe { result::device::get_attribute(device, a) }.map_err(|e| driver_error("cuDeviceGetAttribute", e))
        };
        let num_sms = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let major = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let module = load_kernels((major, minor))?;
        // SAFETY: only checks whether the shared library can be opened.
        if !unsafe { cublas::sys::is_culib_present() } {
            return Err(DeviceError::Unavailable(
                "cuBLAS (libcublas.so.13) was not found: install the CUDA 13 runtime libraries".into(),
            ));
        }
        let blas = cublas::result::create_handle().map_err(|e| DeviceError::Driver(format!("cublasCreate: {e:?}")))?;
        let stream = result::stream::create(result::stream::StreamKind::Default)
            .map_err(|e| driver_error("cuStreamCreate", e))?;
        // SAFETY: the handle and the stream were just created.
        unsafe { cublas::result::set_stream(blas, stream as _) }
            .map_err(|e| DeviceError::Driver(format!("cublasSetStream: {e:?}")))?;
        // A workspace of cuBLAS's own, so that a GEMM captured in a graph allocates nothing.
        // SAFETY: the context is current; the allocation is kept for the device's life.
        let workspace =
            unsafe { result::malloc_sync(CUBLAS_WORKSPACE_BYTES) }.map_err(|e| driver_error("cuMemAlloc", e))?;
        // SAFETY: the workspace is a live allocation of that size, kept for the device's life.
        unsafe { cublas::sys::cublasSetWorkspace_v2(blas, workspace as *mut c_void, CUBLAS_WORKSPACE_BYTES) }
            .result()
            .map_err(|e| DeviceError::Driver(format!("cublasSetWorkspace: {e:?}")))?;
        tracing::info!(device = %name, compute_capability = %format!("{major}.{minor}"), num_sms, "CUDA device opened");
        Ok(CudaDevice {
            context,
            stream,
            graphs: Mutex::default(),
            next_graph: std::sync::atomic::AtomicU64::new(1),
            module,
            functions: Mutex::default(),
            blas: Mutex::new(blas),
            name,
            num_sms,
        })
    }

    /// Makes this device's context current on the calling thread.
    fn bind(&self) -> Result<(), DeviceError> {
        // SAFETY: the context is retained for the device's lifetime.
        unsafe { result::ctx::set_current(self.context) }.map_err(|e| driver_error("cuCtxSetCurrent", e))
    }

    fn function(&self, kernel: &str) -> Result<sys::CUfunction, DeviceError> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&f) = functions.get(kernel) {
            return Ok(f);
        }
        let name = CString::new(kernel)
            .map_err(|_| DeviceError::Launch { kernel: kernel.into(), message: "name contains NUL".into() })?;
        // SAFETY: the module is loaded for the device's lifetime.
        let f = unsafe { result::module::get_function(self.module, name) }
            .map_err(|e| DeviceError::Launch { kernel: kernel.into(), message: format!("not in the module: {e:?}") })?;
        functions.insert(kernel.to_string(), f);
        Ok(f)
    }
}

/// The module of all kernels: the embedded fatbin if it has code for this GPU, else NVRTC.
fn load_kernels(capability: (i32, i32)) -> Result<sys::CUmodule, DeviceError> {
    if !FATBIN.is_empty() {
        // cuModuleLoadData wants an aligned image; include_bytes! promises no alignment.
        let mut image = vec![0u64; FATBIN.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut image)[..FATBIN.len()].copy_from_slice(FATBIN);
        // SAFETY: `image` holds the fatbin nvcc wrote, aligned, alive during the call.
        match unsafe { result::module::load_data(image.as_ptr() as *const c_void) } {
            Ok(module) => return Ok(module),
            Err(e) => {
                tracing::warn!(error = ?e, "the embedded kernels do not run on this GPU; compiling them with NVRTC")
            }
        }
    }
    let ptx = compiled_ptx(capability)?;
    let text = CString::new(ptx).map_err(|_| DeviceError::Driver("NVRTC output contains NUL".into()))?;
    // SAFETY: a NUL-terminated PTX text, alive during the call.
    unsafe { result::module::load_data(text.as_ptr() as *const c_void) }
        .map_err(|e| driver_error("loading the kernels' PTX", e))
}

/// The kernels' PTX for `capability`, from the disk cache or from NVRTC.
fn compiled_ptx(capability: (i32, i32)) -> Result<String, DeviceError> {
    // The newest virtual architecture we target that the GPU can run; newer GPUs JIT it.
    let arch: &'static str = match capability {
        (8, 0..=5) => "compute_80",
        (8, 6..=8) => "compute_86",
        (8, _) => "compute_89",
        (major, _) if major >= 9 => "compute_90",
        (major, minor) => {
            return Err(DeviceError::Unavailable(format!(
                "compute capability {major}.{minor} is older than the 8.0 (A100) Pagoda needs"
            )));
        }
    };
    let mut driver_version = 0i32;
    // SAFETY: writes one int; the driver library is loaded (device_count checked it).
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(|e| driver_error("cuDriverGetVersion", e))?;
    let include = cuda_include_dir().ok_or_else(|| {
        DeviceError::Unavailable(
            "this build embeds no precompiled kernels, and NVRTC needs the CUDA headers: set PAGODA_CUDA_INCLUDE_DIR \
             (or CUDA_HOME) to a CUDA 13 include folder, or build with PAGODA_NVCC set"
                .into(),
        )
    })?;
    let key =
        xxhash_rust::xxh3::xxh3_64(format!("{SOURCE}\n{arch}\n{driver_version}\n{}", include.display()).as_bytes());
    let cache = cache_dir().map(|d| d.join(format!("kernels-{key:016x}.ptx")));
    if let Some(ptx) = cache.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok(ptx);
    }
    // SAFETY: only checks whether the shared library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(DeviceError::Unavailable(
            "this build embeds no precompiled kernels and NVRTC (libnvrtc.so.13) was not found".into(),
        ));
    }
    let mut include_paths = vec![include.display().to_string()];
    if include.join("cccl").is_dir() {
        include_paths.push(include.join("cccl").display().to_string());
    }
    let started = std::time::Instant::now();
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(
        SOURCE,
        cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            include_paths,
            options: vec!["--std=c++17".into(), "--use_fast_math".into()],
            ..Default::default()
        },
    )
    .map_err(|e| DeviceError::Driver(format!("NVRTC could not compile the kernels: {e:?}")))?
    .to_src();
    tracing::info!(arch, seconds = started.elapsed().as_secs_f64(), "kernels compiled with NVRTC");
    if let Some(path) = cache {
        // Written whole under a temporary name, then renamed: a reader never sees half a file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = path.parent().map(std::fs::create_dir_all).transpose().and_then(|_| std::fs::write(&tmp, &ptx));
        if written.and_then(|_| std::fs::rename(&tmp, &path)).is_err() {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(path = %path.display(), "could not cache the compiled kernels");
        }
    }
    Ok(ptx)
}

fn cuda_include_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("PAGODA_CUDA_INCLUDE_DIR").map(PathBuf::from),
        std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include")),
        std::env::var_os("CUDA_PATH").map(|h| PathBuf::from(h).join("include")),
        Some(PathBuf::from("/usr/local/cuda/include")),
    ];
    candidates.into_iter().flatten().find(|d| d.join("cuda_bf16.h").is_file())
}

fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("pagoda"))
}

fn cuda_type(dtype: DType) -> cublas::sys::cudaDataType_t {
    match dtype {
        DType::F32 => cublas::sys::cudaDataType_t::CUDA_R_32F,
        DType::F16 => cublas::sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => cublas::sys::cudaDataType_t::CUDA_R_16BF,
    }
}

fn cublas_op(t: Transpose) -> cublas::sys::cublasOperation_t {
    match t {
        Transpose::No => cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        Transpose::Yes => cublas::sys::cublasOperation_t::CUBLAS_OP_T,
    }
}

fn dim(value: usize, what: &str) -> Result<i32, DeviceError> {
    i32::try_from(value).map_err(|_| DeviceError::Gemm(format!("{what} = {value} exceeds cuBLAS's 32-bit sizes")))
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn num_sms(&self) -> usize {
        self.num_sms
    }

    fn memory_info(&self) -> Result<(usize, usize), DeviceError> {
        self.bind()?;
        result::mem_get_info().map_err(|e| driver_error("cuMemGetInfo", e))
    }

    fn alloc(&self, num_bytes: usize) -> Result<DevicePtr, DeviceError> {
        self.bind()?;
        // SAFETY: allocates; the pointer is owned by the caller until `free`.
        match unsafe { result::malloc_sync(num_bytes.max(1)) } {
            Ok(ptr) => Ok(ptr),
            Err(result::DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                let free_bytes = result::mem_get_info().map(|(free, _)| free).unwrap_or(0);
                Err(DeviceError::OutOfMemory { num_bytes, free_bytes })
            }
            Err(e) => Err(driver_error("cuMemAlloc", e)),
        }
    }

    fn free(&self, ptr: DevicePtr) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` came from `alloc` and is freed once (its owner is dropped).
            if let Err(e) = unsafe { result::free_sync(ptr) } {
                tracing::warn!(error = ?e, "cuMemFree failed");
            }
        }
    }

    fn copy_to_device(&self, dst: DevicePtr, src: &[u8]) -> Result<(), DeviceError> {
        self.bind()?;
        // SAFETY: `dst` is a device buffer of at least `src.len()` bytes (the caller's buffer).
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| driver_error("cuMemcpyHtoD", e))
    }

    fn copy_to_host(&self, src: DevicePtr, dst: &mut [u8]) -> Result<(), DeviceError> {
        self.bind()?;
        // SAFETY: `src` is a device buffer of at least `dst.len()` bytes (the caller's buffer).
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| driver_error("cuMemcpyDtoH", e))
    }

    fn memset(&self, dst: DevicePtr, value: u8, num_bytes: usize) -> Result<(), DeviceError> {
        self.bind()?;
        // SAFETY: `dst` is a device buffer of at least `num_bytes` bytes.
        unsafe { result::memset_d8_sync(dst, value, num_bytes) }.map_err(|e| driver_error("cuMemsetD8", e))
    }

    fn copy_on_device(&self, dst: DevicePtr, src: DevicePtr, num_bytes: usize) -> Result<(), DeviceError> {
        self.bind()?;
        // SAFETY: both are device buffers of at least `num_bytes` bytes.
        unsafe { result::memcpy_dtod_sync(dst, src, num_bytes) }.map_err(|e| driver_error("cuMemcpyDtoD", e))
    }

    fn time(&self, run: &mut dyn FnMut() -> Result<(), DeviceError>) -> Result<f64, DeviceError> {
        self.bind()?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let start = result::event::create(flags).map_err(|e| driver_error("cuEventCreate", e))?;
        let end = result::event::create(flags).map_err(|e| driver_error("cuEventCreate", e))?;
        let timed = (|| {
            // SAFETY: the events were just created; the stream is the one all work runs on.
            unsafe { result::event::record(start, self.stream) }.map_err(|e| driver_error("cuEventRecord", e))?;
            run()?;
            // SAFETY: as above.
            unsafe { result::event::record(end, self.stream) }.map_err(|e| driver_error("cuEventRecord", e))?;
            // SAFETY: `end` was recorded above.
            unsafe { result::event::synchronize(end) }.map_err(|e| driver_error("a kernel failed", e))?;
            // SAFETY: both events were recorded and `end` has completed.
            unsafe { result::event::elapsed(start, end) }.map_err(|e| driver_error("cuEventElapsedTime", e))
        })();
        // SAFETY: the events are not used after this.
        unsafe {
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(end);
        }
        Ok(timed? as f64 / 1e3)
    }

    fn launch(&self, kernel: &str, config: LaunchConfig, args: &[KernelArg]) -> Result<(), DeviceError> {
        self.bind()?;
        let f = self.function(kernel)?;
        let mut slots: Vec<u64> = args.iter().map(|a| a.to_slot()).collect();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        // SAFETY: one pointer per kernel parameter, each to an 8-byte slot holding the value in
        // its low bytes (cuLaunchKernel copies the parameter's size from each before returning);
        // the pointer arguments are live device buffers of the sizes the kernel's geometry reads.
        unsafe {
            result::launch_kernel(
                f,
                config.grid_dim,
                config.block_dim,
                config.shared_mem_bytes,
                self.stream,
                &mut params,
            )
        }
        .map_err(|e| DeviceError::Launch { kernel: kernel.to_string(), message: format!("{e:?}") })
    }

    fn gemm(&self, call: &GemmCall) -> Result<(), DeviceError> {
        self.bind()?;
        let (ty, c_ty) = (cuda_type(call.dtype), cuda_type(call.c_dtype));
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: A, B and C are live device buffers covering the extents the sizes and leading
        // dimensions describe (the backend sizes them from the same shapes); alpha and beta are
        // host f32 values, as CUBLAS_COMPUTE_32F expects in the default pointer mode.
        unsafe {
            cublas::result::gemm_ex(
                *blas,
                cublas_op(call.transa),
                cublas_op(call.transb),
                dim(call.m, "m")?,
                dim(call.n, "n")?,
                dim(call.k, "k")?,
                &call.alpha as *const f32 as *const c_void,
                call.a as *const c_void,
                ty,
                dim(call.lda, "lda")?,
                call.b as *const c_void,
                ty,
                dim(call.ldb, "ldb")?,
                &call.beta as *const f32 as *const c_void,
                call.c as *mut c_void,
                c_ty,
                dim(call.ldc, "ldc")?,
                cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| DeviceError::Gemm(format!("{e:?}")))
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.bind()?;
        result::ctx::synchronize().map_err(|e| driver_error("a kernel failed", e))
    }

    fn begin_capture(&self) -> Result<(), DeviceError> {
        self.bind()?;
        // SAFETY: the stream lives as long as the device.
        unsafe { result::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) }
            .map_err(|e| driver_error("cuStreamBeginCapture", e))
    }

    fn end_capture(&self) -> Result<u64, DeviceError> {
        self.bind()?;
        // SAFETY: the stream lives as long as the device; ending a capture that failed part way
        // still returns the stream to normal work.
        let graph =
            unsafe { result::stream::end_capture(self.stream) }.map_err(|e| driver_error("cuStreamEndCapture", e))?;
        // SAFETY: `graph` was just captured.
        let exec = match unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(exec) => exec,
            Err(e) => {
                // SAFETY: the graph is not used after this.
                let _ = unsafe { result::graph::destroy(graph) };
                return Err(driver_error("cuGraphInstantiate", e));
            }
        };
        let id = self.next_graph.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.graphs.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (graph, exec));
        Ok(id)
    }

    fn replay(&self, graph: u64) -> Result<(), DeviceError> {
        self.bind()?;
        let exec = self.graphs.lock().unwrap_or_else(|e| e.into_inner()).get(&graph).map(|g| g.1);
        let exec = exec.ok_or_else(|| DeviceError::Driver(format!("no graph {graph}")))?;
        // SAFETY: `exec` stays instantiated until destroy_graph; the stream is the device's.
        unsafe { result::graph::launch(exec, self.stream) }.map_err(|e| driver_error("cuGraphLaunch", e))
    }

    fn destroy_graph(&self, graph: u64) {
        let removed = self.graphs.lock().unwrap_or_else(|e| e.into_inner()).remove(&graph);
        if let Some((graph, exec)) = removed
            && self.bind().is_ok()
        {
            // SAFETY: removed from the map, so destroyed once; no replay can be in flight on the
            // host side (replays hold no reference), and the driver keeps queued work valid.
            unsafe {
                let _ = result::graph::exec_destroy(exec);
                let _ = result::graph::destroy(graph);
            }
        }
    }
}
