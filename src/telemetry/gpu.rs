//! GPU metrics on the server's own `/metrics`, from NVML (`libnvidia-ml.so.1`, loaded at run time
//! from the driver): per GPU, with `gpu` (index) and `uuid` labels, utilisation, memory used and
//! total, temperature, power draw and limit, SM clock, and the clock throttle reasons. A thread of
//! its own reads them every [`REFRESH`] and a scrape serves the last reading, so a slow or failing
//! GPU never holds up `/metrics` (or the probes on the same workers). Without the library or a GPU
//! there are no GPU series, no thread and no error: the CPU appliance serves the same `/metrics`
//! minus these.
//!
//! `gpu` is NVML's index (PCI bus order, every GPU of the machine, whatever `CUDA_VISIBLE_DEVICES`
//! says); `uuid` names the GPU unambiguously.
//!
//! XID errors are not exported: NVML reports them only as events to a listener that waits on them,
//! which a scrape cannot be.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};

/// The library's name as the driver installs it (the unversioned name exists only with the
/// development files).
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// How often the GPUs are read: NVML calls take milliseconds per GPU, and scrapes (from several
/// Prometheus replicas, say) serve the last reading.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The throttle reasons exported, by their label value.
const THROTTLE_REASONS: [(&str, ThrottleReasons); 8] = [
    ("gpu_idle", ThrottleReasons::GPU_IDLE),
    ("applications_clocks_setting", ThrottleReasons::APPLICATIONS_CLOCKS_SETTING),
    ("sw_power_cap", ThrottleReasons::SW_POWER_CAP),
    ("hw_slowdown", ThrottleReasons::HW_SLOWDOWN),
    ("sync_boost", ThrottleReasons::SYNC_BOOST),
    ("sw_thermal_slowdown", ThrottleReasons::SW_THERMAL_SLOWDOWN),
    ("hw_thermal_slowdown", ThrottleReasons::HW_THERMAL_SLOWDOWN),
    ("hw_power_brake_slowdown", ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN),
];

/// One GPU's reading. A field NVML could not give (not supported on this GPU, or an error) is
/// `None` and its series is left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// Percent of the last sample period a kernel was running (0 to 100).
    pub utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<u32>,
    pub power_draw_milliwatts: Option<u32>,
    pub power_limit_milliwatts: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    /// Each exported reason, and whether it is active now.
    pub throttle_reasons: Option<Vec<(&'static str, bool)>>,
}

/// The metric families, in the order they are written: name, help, and a sample's series (labels
/// beyond `gpu` and `uuid`, each starting with a comma, and the value); none where NVML gave nothing.
type Series = fn(&GpuSample) -> Vec<(String, f64)>;
const FAMILIES: [(&str, &str, Series); 9] = [
    ("pagoda_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran on the GPU (NVML).", |s| {
        plain(s.utilization_percent.map(|p| f64::from(p) / 100.0))
    }),
    ("pagoda_gpu_memory_used_bytes", "GPU memory in use.", |s| plain(s.memory_used_bytes.map(|b| b as f64))),
    ("pagoda_gpu_memory_total_bytes", "GPU memory installed.", |s| plain(s.memory_total_bytes.map(|b| b as f64))),
    ("pagoda_gpu_temperature_celsius", "GPU core temperature.", |s| plain(s.temperature_celsius.map(f64::from))),
    ("pagoda_gpu_power_draw_watts", "Power the GPU draws now.", |s| {
        plain(s.power_draw_milliwatts.map(|mw| f64::from(mw) / 1e3))
    }),
    ("pagoda_gpu_power_limit_watts", "Power limit the driver enforces.", |s| {
        plain(s.power_limit_milliwatts.map(|mw| f64::from(mw) / 1e3))
    }),
    ("pagoda_gpu_sm_clock_hertz", "Current SM clock.", |s| plain(s.sm_clock_mhz.map(|mhz| f64::from(mhz) * 1e6))),
    ("pagoda_gpu_info", "The GPU's name, as labels of a gauge at 1.", |s| {
        vec![(format!(",name=\"{}\"", escape(&s.name)), 1.0)]
    }),
    ("pagoda_gpu_throttle_reason", "1 while the reason holds the GPU's clocks down (NVML).", |s| {
        let reasons = s.throttle_reasons.iter().flatten();
        reasons.map(|(reason, active)| (format!(",reason=\"{reason}\""), f64::from(u8::from(*active)))).collect()
    }),
];

/// A series with no labels of its own, where NVML gave a value.
fn plain(value: Option<f64>) -> Vec<(String, f64)> {
    value.map(|v| (String::new(), v)).into_iter().collect()
}

/// Label values escaped as the exposition format wants them.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// NVML's CUDA version number (1000 × major + 10 × minor) as "major.minor".
pub fn cuda_version_text(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

/// The Prometheus text exposition of `samples` (nothing for none).
pub fn render(samples: &[GpuSample]) -> String {
    let mut out = String::new();
    if samples.is_empty() {
        return out;
    }
    let labels = |s: &GpuSample| format!("gpu=\"{}\",uuid=\"{}\"", s.index, escape(&s.uuid));
    for (name, help, series) in FAMILIES {
        let lines: Vec<String> = samples
            .iter()
            .flat_map(|s| series(s).into_iter().map(move |(extra, v)| format!("{name}{{{}{extra}}} {v}\n", labels(s))))
            .collect();
        if lines.is_empty() {
            continue;
        }
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n");
        lines.iter().for_each(|l| out.push_str(l));
    }
    out
}

/// What the driver says of itself and its GPUs (`pagoda info`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DriverReport {
    pub driver_version: String,
    /// The newest CUDA version the driver supports, as "13.0".
    pub cuda_version: String,
    pub gpus: Vec<GpuDescription>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GpuDescription {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_total_bytes: Option<u64>,
    /// As "9.0".
    pub compute_capability: Option<String>,
}

/// NVML, if the driver's library loads.
pub struct GpuMetrics {
    nvml: Option<Nvml>,
}

impl GpuMetrics {
    /// Loads NVML from the driver; without it (no driver, or a CPU machine) the metrics are empty.
    pub fn load() -> GpuMetrics {
        GpuMetrics::load_from(NVML_LIBRARY)
    }

    /// Loads NVML from `library` (a name the loader resolves, or a path).
    pub fn load_from(library: &str) -> GpuMetrics {
        let nvml = match Nvml::builder().lib_path(std::ffi::OsStr::new(library)).init() {
            Ok(nvml) => Some(nvml),
            Err(e) => {
                tracing::debug!(library, error = %e, "NVML is not available: no GPU metrics");
                None
            }
        };
        GpuMetrics { nvml }
    }

    pub fn available(&self) -> bool {
        self.nvml.is_some()
    }

    /// The driver's versions and each GPU's name, memory and compute capability; `None` without
    /// NVML.
    pub fn driver_report(&self) -> Option<DriverReport> {
        let nvml = self.nvml.as_ref()?;
        let cuda = nvml.sys_cuda_driver_version().ok();
        let gpus = (0..nvml.device_count().unwrap_or(0))
            .filter_map(|index| {
                let device = nvml.device_by_index(index).ok()?;
                Some(GpuDescription {
                    index,
                    name: device.name().unwrap_or_default(),
                    uuid: device.uuid().unwrap_or_default(),
                    memory_total_bytes: device.memory_info().ok().map(|m| m.total),
                    compute_capability: device
                        .cuda_compute_capability()
                        .ok()
                        .map(|c| format!("{}.{}", c.major, c.minor)),
                })
            })
            .collect();
        Some(DriverReport {
            driver_version: nvml.sys_driver_version().unwrap_or_default(),
            cuda_version: cuda.map(cuda_version_text).unwrap_or_default(),
            gpus,
        })
    }

    /// Every GPU's reading now.
    pub fn sample(&self) -> Vec<GpuSample> {
        let Some(nvml) = &self.nvml else { return Vec::new() };
        let count = nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let device = nvml.device_by_index(index).ok()?;
                let memory = device.memory_info().ok();
                Some(GpuSample {
                    index,
                    uuid: device.uuid().unwrap_or_default(),
                    name: device.name().unwrap_or_default(),
                    utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
                    memory_used_bytes: memory.as_ref().map(|m| m.used),
                    memory_total_bytes: memory.as_ref().map(|m| m.total),
                    temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                    power_draw_milliwatts: device.power_usage().ok(),
                    power_limit_milliwatts: device.enforced_power_limit().ok(),
                    sm_clock_mhz: device.clock_info(Clock::SM).ok(),
                    throttle_reasons: device
                        .current_throttle_reasons()
                        .ok()
                        .map(|r| THROTTLE_REASONS.iter().map(|(name, flag)| (*name, r.contains(*flag))).collect()),
                })
            })
            .collect()
    }
}

/// The GPUs' exposition, kept fresh by a thread of its own (none without NVML) that ends within
/// [`REFRESH`] of the exporter's drop.
pub struct GpuExporter {
    last: Arc<Mutex<String>>,
}

impl GpuExporter {
    pub fn start(metrics: GpuMetrics) -> GpuExporter {
        let last = Arc::new(Mutex::new(String::new()));
        if metrics.available() {
            // The first reading before the first scrape can ask for it.
            *last.lock().unwrap_or_else(|e| e.into_inner()) = render(&metrics.sample());
            let shared = Arc::downgrade(&last);
            let spawned = std::thread::Builder::new().name("pagoda-gpu-metrics".into()).spawn(move || {
                loop {
                    std::thread::sleep(REFRESH);
                    let text = render(&metrics.sample());
                    let Some(last) = shared.upgrade() else { return };
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = text;
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the GPU metrics thread: the GPU series stay at their first reading");
            }
        }
        GpuExporter { last }
    }

    /// The last reading's exposition (empty without GPUs).
    pub fn render(&self) -> String {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_without_nvml_has_no_gpu_series_and_no_error() {
        let metrics = GpuMetrics::load_from("/nonexistent/libnvidia-ml.so.1");
        assert!(!metrics.available());
        assert_eq!(metrics.driver_report(), None);
        assert!(metrics.sample().is_empty());
        assert_eq!(GpuExporter::start(metrics).render(), "");
        assert_eq!(render(&[]), "");
    }

    #[test]
    fn a_reading_renders_every_family_with_gpu_and_uuid_labels() {
        let h200 = GpuSample {
            index: 0,
            uuid: "GPU-1b2c".into(),
            name: "NVIDIA H200".into(),
            utilization_percent: Some(87),
            memory_used_bytes: Some(120 << 30),
            memory_total_bytes: Some(143_771 << 20),
            temperature_celsius: Some(61),
            power_draw_milliwatts: Some(512_250),
            power_limit_milliwatts: Some(700_000),
            sm_clock_mhz: Some(1980),
            throttle_reasons: Some(vec![("gpu_idle", false), ("sw_power_cap", true)]),
        };
        // A second GPU that reports little (a field NVML does not support is left out).
        let quiet =
            GpuSample { index: 1, uuid: "GPU-\"q\"".into(), name: "Odd \\ name".into(), ..GpuSample::default() };
        let text = render(&[h200, quiet]);
        let expected = "\
# HELP pagoda_gpu_utilization_ratio Fraction of the last sample period a kernel ran on the GPU (NVML).
# TYPE pagoda_gpu_utilization_ratio gauge
pagoda_gpu_utilization_ratio{gpu=\"0\",uuid=\"GPU-1b2c\"} 0.87
# HELP pagoda_gpu_memory_used_bytes GPU memory in use.
# TYPE pagoda_gpu_memory_used_bytes gauge
pagoda_gpu_memory_used_bytes{gpu=\"0\",uuid=\"GPU-1b2c\"} 128849018880
# HELP pagoda_gpu_memory_total_bytes GPU memory installed.
# TYPE pagoda_gpu_memory_total_bytes gauge
pagoda_gpu_memory_total_bytes{gpu=\"0\",uuid=\"GPU-1b2c\"} 150754820096
# HELP pagoda_gpu_temperature_celsius GPU core temperature.
# TYPE pagoda_gpu_temperature_celsius gauge
pagoda_gpu_temperature_celsius{gpu=\"0\",uuid=\"GPU-1b2c\"} 61
# HELP pagoda_gpu_power_draw_watts Power the GPU draws now.
# TYPE pagoda_gpu_power_draw_watts gauge
pagoda_gpu_power_draw_watts{gpu=\"0\",uuid=\"GPU-1b2c\"} 512.25
# HELP pagoda_gpu_power_limit_watts Power limit the driver enforces.
# TYPE pagoda_gpu_power_limit_watts gauge
pagoda_gpu_power_limit_watts{gpu=\"0\",uuid=\"GPU-1b2c\"} 700
# HELP pagoda_gpu_sm_clock_hertz Current SM clock.
# TYPE pagoda_gpu_sm_clock_hertz gauge
pagoda_gpu_sm_clock_hertz{gpu=\"0\",uuid=\"GPU-1b2c\"} 1980000000
# HELP pagoda_gpu_info The GPU's name, as labels of a gauge at 1.
# TYPE pagoda_gpu_info gauge
pagoda_gpu_info{gpu=\"0\",uuid=\"GPU-1b2c\",name=\"NVIDIA H200\"} 1
pagoda_gpu_info{gpu=\"1\",uuid=\"GPU-\\\"q\\\"\",name=\"Odd \\\\ name\"} 1
# HELP pagoda_gpu_throttle_reason 1 while the reason holds the GPU's clocks down (NVML).
# TYPE pagoda_gpu_throttle_reason gauge
pagoda_gpu_throttle_reason{gpu=\"0\",uuid=\"GPU-1b2c\",reason=\"gpu_idle\"} 0
pagoda_gpu_throttle_reason{gpu=\"0\",uuid=\"GPU-1b2c\",reason=\"sw_power_cap\"} 1
";
        assert_eq!(text, expected);
    }

    #[test]
    fn cuda_versions_read_as_nvml_encodes_them() {
        assert_eq!(cuda_version_text(13000), "13.0");
        assert_eq!(cuda_version_text(12080), "12.8");
        assert_eq!(cuda_version_text(11020), "11.2");
    }
}
