//! `pagoda info`: what this machine offers Pagoda: platform, cloud, the NVIDIA driver and its GPUs
//! (from NVML), the CUDA libraries the dynamic loader would find, and which device
//! `serve --device auto` would pick and why.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::telemetry::gpu::{GpuMetrics, NVML_LIBRARY};
use crate::telemetry::{GIT_COMMIT, VERSION, cloud};

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// Folder with the DMI strings used to detect the cloud.
    #[arg(long, env = "PAGODA_DMI_DIR", default_value = cloud::DMI_DIR)]
    pub dmi_dir: PathBuf,

    /// The appliance's launch environment file (`pagoda metadata` writes it from the instance's
    /// user data), read for the API key the server will be given.
    #[arg(long, default_value = "/run/pagoda/launch.env")]
    pub launch_env: PathBuf,
}

/// Where the server's API key comes from, as far as this environment and the appliance's launch
/// file say; `None` when neither names one.
fn api_key_source(launch_env: &Path) -> Option<String> {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if set("PAGODA_API_KEY").is_some() {
        return Some("PAGODA_API_KEY".into());
    }
    if let Some(file) = set("PAGODA_API_KEY_FILE") {
        return Some(format!("PAGODA_API_KEY_FILE={file}"));
    }
    let launch = crate::metadata::parse_env_lines(&std::fs::read_to_string(launch_env).ok()?).ok()?;
    if let (Some(secret), Some(file)) = (&launch.api_key_secret, &launch.api_key_file) {
        return Some(format!("the secret {secret}, read into {file} ({})", launch_env.display()));
    }
    // `pagoda metadata` refuses a key in the launch configuration itself: a file is the one way.
    launch.api_key_file.filter(|v| !v.trim().is_empty())?;
    Some(format!("PAGODA_API_KEY_FILE in {}", launch_env.display()))
}

/// Libraries a CUDA backend opens, by the names the loader looks for.
const CUDA_LIBRARIES: [&str; 4] = ["libcuda.so.1", "libcublas.so", "libnvrtc.so", "libnvidia-ml.so.1"];

/// Folders the dynamic loader searches, plus where drivers are usually mounted.
fn library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/cuda/lib64",
        "/usr/local/nvidia/lib64",
        "/run/opengl-driver/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

fn find_library(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().find_map(|d| {
        let entries = std::fs::read_dir(d).ok()?;
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with(name)))
    })
}

fn gpus() -> Vec<String> {
    // Without a CUDA backend the driver is not queried; report the device nodes it would use.
    let mut found: Vec<String> = std::fs::read_dir(Path::new("/dev"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("nvidia") && n[6..].chars().all(|c| c.is_ascii_digit()) && n.len() > 6)
                .map(|n| format!("/dev/{n}"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let cloud = cloud::detect(&args.dmi_dir);
    let dirs = library_dirs();
    let libraries: Vec<(&str, Option<PathBuf>)> = CUDA_LIBRARIES.iter().map(|&n| (n, find_library(n, &dirs))).collect();
    let gpu_devices = gpus();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let driver = GpuMetrics::load().driver_report();
    let api_key = api_key_source(&args.launch_env);
    // What `serve --device auto` would do, found the way it finds it (opening the GPU).
    let auto = match crate::launch::auto_device() {
        Ok(handle) => ("cuda", format!("a GPU is present: {}", handle.device().name())),
        Err(why_not) => ("cpu", why_not),
    };
    if args.json {
        let libs: serde_json::Map<String, serde_json::Value> = libraries
            .iter()
            .map(|(n, p)| (n.to_string(), p.as_ref().map(|p| p.display().to_string()).into()))
            .collect();
        let value = serde_json::json!({
            "version": VERSION,
            "git_commit": GIT_COMMIT,
            "platform": {"os": std::env::consts::OS, "arch": std::env::consts::ARCH, "cpus": cpus},
            "cloud": {"provider": cloud.provider, "instance_type": cloud.instance_type},
            "backends": ["cpu", "cuda"],
            "driver": driver.as_ref().map(|d| serde_json::json!({
                "version": d.driver_version,
                "cuda_version": d.cuda_version,
            })),
            "gpus": driver.as_ref().map(|d| d.gpus.clone()).unwrap_or_default(),
            "gpu_devices": gpu_devices,
            "cuda_libraries": libs,
            "auto_device": {"device": auto.0, "reason": auto.1},
            "api_key": {"configured": api_key.is_some(), "source": api_key},
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("pagoda {VERSION} ({GIT_COMMIT})");
    println!("platform: {} {}, {cpus} CPUs", std::env::consts::OS, std::env::consts::ARCH);
    println!("cloud: {} (instance type: {})", cloud.provider, cloud.instance_type);
    println!("backends in this build: cpu, cuda");
    match &driver {
        Some(d) => {
            println!("NVIDIA driver: {} (supports CUDA {})", d.driver_version, d.cuda_version);
            for g in &d.gpus {
                let memory = g
                    .memory_total_bytes
                    .map_or("memory unknown".into(), |b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64));
                let capability = g.compute_capability.as_deref().unwrap_or("unknown");
                println!("GPU {}: {} ({memory}, compute capability {capability}, {})", g.index, g.name, g.uuid);
            }
        }
        None => println!("NVIDIA driver: not found ({NVML_LIBRARY} did not load)"),
    }
    println!("GPU devices: {}", if gpu_devices.is_empty() { "none".to_string() } else { gpu_devices.join(", ") });
    for (name, path) in libraries {
        println!("{name}: {}", path.map_or("not found".to_string(), |p| p.display().to_string()));
    }
    match auto.0 {
        "cuda" => println!("serve --device auto would use: cuda ({})", auto.1),
        _ => println!("serve --device auto would use: cpu, because {}", auto.1),
    }
    match &api_key {
        Some(source) => println!("API key: configured ({source})"),
        None => println!(
            "API key: NONE configured (environment and {}): a server started here accepts every request",
            args.launch_env.display()
        ),
    }
    Ok(())
}
