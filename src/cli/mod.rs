//! The command line: raw flags and environment variables as clap parses them, kept apart from the
//! checked configuration they resolve to (`launch::EngineOptions`). Flag names follow vLLM where
//! the concept is the same; every flag can also be set as `PAGODA_<FLAG_NAME>`.

mod bench;
mod generate;
mod info;
mod metadata;
mod selftest;
mod serve;
mod sync;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::launch::EngineOptions;
use crate::weights::DType;

#[derive(Debug, Parser)]
#[command(
    name = "pagoda",
    version,
    // A flag given twice takes its last value, as in vLLM (lists such as --api-key still add up).
    args_override_self = true,
    about = "An LLM inference appliance: OpenAI-compatible serving with a paged KV cache"
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, env = "PAGODA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible API (the embedded demo model without --model).
    Serve(Box<serve::ServeArgs>),
    /// Copy a model from S3, GCS, Azure Blob or HTTPS into a local folder, or from the Hugging Face
    /// Hub into its cache.
    Sync(sync::SyncArgs),
    /// Generate text for prompts on this machine, without HTTP.
    Generate(generate::GenerateArgs),
    /// Show the platform, the detected cloud, GPUs and the CUDA libraries found.
    Info(info::InfoArgs),
    /// Write the service's launch configuration from the cloud's instance user data.
    Metadata(metadata::MetadataArgs),
    /// Write the embedded demo model (random weights) as a Hugging Face model folder.
    ExportDemo(ExportDemoArgs),
    /// Check the CUDA backend on this machine's GPU against the CPU (and benchmark it).
    Selftest(selftest::SelftestArgs),
    /// Benchmarks: `bench serve` loads any OpenAI-compatible server and reports its throughput and
    /// latencies.
    Bench(bench::BenchArgs),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve(args) => serve::run(*args),
            Command::Sync(args) => sync::run(args),
            Command::Generate(args) => generate::run(args),
            Command::Info(args) => info::run(args),
            Command::Metadata(args) => metadata::run(args),
            Command::Selftest(args) => selftest::run(args),
            Command::Bench(args) => bench::run(args),
            Command::ExportDemo(args) => {
                crate::model::demo::export(&crate::model::demo::DemoSpec::demo(), &args.dir)?;
                println!("wrote {} ({})", args.dir.display(), crate::model::demo::DEMO_MODEL_NAME);
                Ok(())
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct ExportDemoArgs {
    /// The folder to write.
    pub dir: std::path::PathBuf,
}

/// Which model to load and how to size the engine around it.
#[derive(Clone, Debug, Args)]
pub struct EngineArgs {
    /// Hugging Face model folder, a llama.cpp `.gguf` file (its weights are dequantized at load, so
    /// it takes the memory of the unquantized model), or (for serve) a Hugging Face Hub model
    /// (org/name or hf://org/name[@revision], kept in the Hub's cache), or an s3://, gs://, az://
    /// or https:// URI synced into --download-dir first. Without it, the embedded demo model
    /// (random weights) is used.
    #[arg(long, env = "PAGODA_MODEL")]
    pub model: Option<std::path::PathBuf>,

    /// Names clients use for the model; several are aliases of one model, the first one reported
    /// in responses and metrics (default: the --model value, or the demo model's name).
    #[arg(long, env = "PAGODA_SERVED_MODEL_NAME", num_args = 1..)]
    pub served_model_name: Vec<String>,

    /// Longest sequence (prompt and output) in tokens. Default: the model's maximum, lowered to what
    /// the KV cache holds.
    #[arg(long, env = "PAGODA_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,

    /// Most sequences running at once.
    #[arg(long, env = "PAGODA_MAX_NUM_SEQS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,

    /// Token budget of one engine step, shared by prefill chunks and decodes.
    #[arg(long, env = "PAGODA_MAX_NUM_BATCHED_TOKENS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_batched_tokens: u32,

    /// Tokens per KV-cache block.
    #[arg(long, env = "PAGODA_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,

    /// Reuse the KV of shared prompt prefixes (on by default).
    #[arg(long, env = "PAGODA_ENABLE_PREFIX_CACHING", action = ArgAction::Set, num_args = 0..=1,
          default_value_t = true, default_missing_value = "true")]
    pub enable_prefix_caching: bool,

    /// Turn prefix caching off.
    #[arg(long, conflicts_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,

    /// Split long prompts across engine steps (on by default).
    #[arg(long, env = "PAGODA_ENABLE_CHUNKED_PREFILL", action = ArgAction::Set, num_args = 0..=1,
          default_value_t = true, default_missing_value = "true")]
    pub enable_chunked_prefill: bool,

    /// Turn chunked prefill off.
    #[arg(long, conflicts_with = "enable_chunked_prefill")]
    pub no_enable_chunked_prefill: bool,

    /// Exact number of KV-cache blocks, overriding the memory-based size.
    #[arg(long, env = "PAGODA_NUM_GPU_BLOCKS_OVERRIDE")]
    pub num_gpu_blocks_override: Option<usize>,

    /// Memory for the KV cache, in bytes or with a unit (e.g. 4GiB, 512M). CPU default: 4GiB. On
    /// the CPU this is reserved address space: the process only grows by the blocks ever in use at
    /// once (written blocks are reused before new ones; cached prefixes live in those).
    #[arg(long, env = "PAGODA_KV_CACHE_MEMORY_BYTES", value_parser = parse_bytes)]
    pub kv_cache_memory_bytes: Option<usize>,

    /// Compute dtype: auto, float32, bfloat16 or float16. On GPUs, auto is the checkpoint's dtype
    /// (float32 checkpoints run in bfloat16, as vLLM does); the CPU backend always computes in float32.
    #[arg(long, env = "PAGODA_DTYPE", default_value = "auto", value_parser = parse_dtype)]
    pub dtype: DTypeArg,

    /// Where the model runs: auto (a CUDA GPU when a driver and a device are present, else the
    /// CPU; the log says which and why), cpu or cuda.
    #[arg(long, env = "PAGODA_DEVICE", value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,

    /// KV-cache element type: auto (the dtype the model computes in: f32 on the CPU, --dtype on a
    /// GPU), as vLLM's default. Quantized caches (fp8) are refused.
    #[arg(long, env = "PAGODA_KV_CACHE_DTYPE", default_value = "auto", value_parser = parse_kv_cache_dtype)]
    pub kv_cache_dtype: KvCacheDtypeArg,

    /// Run every step eagerly, never from CUDA graphs (vLLM's flag). By default a GPU captures a
    /// graph of the decode step at start for batch sizes 1, 2, 4, … up to --max-num-seqs (at most
    /// 256) and replays it for decode steps of up to that many sequences.
    #[arg(long, env = "PAGODA_ENFORCE_EAGER")]
    pub enforce_eager: bool,

    /// How to load the weights: auto (the checkpoint's files) or dummy (random values of the
    /// model's shapes, made on the device; no weight file is read; for benchmarks).
    #[arg(long, env = "PAGODA_LOAD_FORMAT", value_enum, default_value_t = LoadFormatArg::Auto)]
    pub load_format: LoadFormatArg,

    /// Threads that compute a step on the CPU (matmuls, attention, the rest), as llama.cpp's
    /// --threads. Default: the cores this process may use (its CPU affinity and cgroup quota). The
    /// results do not depend on it: every value is computed in the same order whatever the count.
    #[arg(long, env = "PAGODA_NUM_THREADS", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub num_threads: Option<u32>,

    /// Share of the GPU's memory for weights, activations and the KV cache; the KV cache gets what
    /// the first two leave. Ignored on the CPU.
    #[arg(long, env = "PAGODA_GPU_MEMORY_UTILIZATION", default_value_t = crate::launch::DEFAULT_GPU_MEMORY_UTILIZATION)]
    pub gpu_memory_utilization: f32,

    /// GPUs to split the model over (vLLM's -tp). Only 1: more is refused at start until Pagoda
    /// has tensor parallelism.
    #[arg(long, env = "PAGODA_TENSOR_PARALLEL_SIZE", default_value_t = 1)]
    pub tensor_parallel_size: usize,

    /// Pipeline stages (vLLM's -pp). Only 1.
    #[arg(long, env = "PAGODA_PIPELINE_PARALLEL_SIZE", default_value_t = 1)]
    pub pipeline_parallel_size: usize,

    /// Seed for requests that give none: each draws its seed from a generator seeded with this, in
    /// the order requests reach the engine, so a replay of the same requests gives the same
    /// outputs. Without it, unseeded requests take their randomness from the OS.
    #[arg(long, env = "PAGODA_SEED")]
    pub seed: Option<u64>,

    /// Most top logprobs a request may ask for (`logprobs`, `top_logprobs`); -1: the vocabulary.
    #[arg(long, env = "PAGODA_MAX_LOGPROBS", default_value_t = crate::engine::request::DEFAULT_MAX_LOGPROBS as i64,
          allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(-1..))]
    pub max_logprobs: i64,

    /// A chat template replacing the model's: a file holding it, or the template itself (a value
    /// with '{{' or '{%' that is not a file).
    #[arg(long, env = "PAGODA_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,

    /// Accepted so that vLLM command lines work. Pagoda runs no code from a model's repository
    /// (its architectures are built in), so there is nothing to trust and nothing changes.
    #[arg(long, env = "PAGODA_TRUST_REMOTE_CODE")]
    pub trust_remote_code: bool,
}

/// `--chat-template`: the file's text, or the value itself when it is a template.
pub fn read_chat_template(value: &str) -> anyhow::Result<String> {
    let path = std::path::Path::new(value);
    if path.is_file() {
        return std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--chat-template {value}: {e}"));
    }
    anyhow::ensure!(
        value.contains("{{") || value.contains("{%"),
        "--chat-template {value}: no such file, and not a template (no '{{{{' or '{{%')"
    );
    Ok(value.to_string())
}

/// vLLM's short flags that clap cannot spell (`-tp 2`), rewritten to their long forms.
pub fn vllm_short_flags(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some("-tp") => "--tensor-parallel-size".into(),
            Some("-pp") => "--pipeline-parallel-size".into(),
            _ => a,
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadFormatArg {
    Auto,
    Dummy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
    /// The CUDA backend on the CPU emulation of CUDA (builds with the cuda-emu feature, for tests).
    #[cfg(feature = "cuda-emu")]
    #[value(name = "cuda-emulated", hide = true)]
    CudaEmulated,
}

impl DeviceArg {
    pub fn kind(self) -> crate::launch::DeviceKind {
        match self {
            DeviceArg::Auto => crate::launch::DeviceKind::Auto,
            DeviceArg::Cpu => crate::launch::DeviceKind::Cpu,
            DeviceArg::Cuda => crate::launch::DeviceKind::Cuda,
            #[cfg(feature = "cuda-emu")]
            DeviceArg::CudaEmulated => crate::launch::DeviceKind::EmulatedCuda,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DTypeArg(pub Option<DType>);

fn parse_dtype(s: &str) -> Result<DTypeArg, String> {
    if s == "auto" {
        return Ok(DTypeArg(None));
    }
    DType::from_config_name(s)
        .map(|d| DTypeArg(Some(d)))
        .ok_or_else(|| format!("unknown dtype '{s}' (auto, float32, bfloat16, float16)"))
}

/// `--kv-cache-dtype`: only `auto` is implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheDtypeArg;

fn parse_kv_cache_dtype(s: &str) -> Result<KvCacheDtypeArg, String> {
    match s {
        "auto" => Ok(KvCacheDtypeArg),
        "fp8" | "fp8_e4m3" | "fp8_e5m2" | "fp8_inc" => {
            Err(format!("'{s}': quantized KV caches are not supported yet; use auto (the model's dtype)"))
        }
        other => Err(format!("unknown KV-cache dtype '{other}' (auto)")),
    }
}

/// Parses `123`, `4GiB`, `4G`, `512MiB`, `512M`, `64KiB` (K/M/G are powers of 1000, Ki/Mi/Gi of 1024).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("'{s}' is not a size (e.g. 4GiB, 512M, 1000000)"))?;
    let multiplier: f64 = match unit.trim().trim_end_matches(['B', 'b']) {
        "" => 1.0,
        "K" | "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown unit '{other}' in '{s}' (K, M, G, T, Ki, Mi, Gi, Ti)")),
    };
    Ok((value * multiplier) as usize)
}

impl EngineArgs {
    pub fn to_options(&self) -> anyhow::Result<EngineOptions> {
        Ok(EngineOptions {
            model: self.model.clone(),
            served_model_name: self.served_model_name.first().cloned(),
            max_model_len: self.max_model_len,
            max_num_seqs: self.max_num_seqs as usize,
            max_num_batched_tokens: self.max_num_batched_tokens as usize,
            block_size: self.block_size,
            enable_prefix_caching: self.enable_prefix_caching && !self.no_enable_prefix_caching,
            enable_chunked_prefill: self.enable_chunked_prefill && !self.no_enable_chunked_prefill,
            num_gpu_blocks_override: self.num_gpu_blocks_override,
            kv_cache_memory_bytes: self.kv_cache_memory_bytes,
            dtype: self.dtype.0,
            device: self.device.kind(),
            load_format: match self.load_format {
                LoadFormatArg::Auto => crate::launch::LoadFormat::Auto,
                LoadFormatArg::Dummy => crate::launch::LoadFormat::Dummy,
            },
            gpu_memory_utilization: self.gpu_memory_utilization,
            num_threads: self.num_threads.map(|n| n as usize),
            enforce_eager: self.enforce_eager,
            tensor_parallel_size: self.tensor_parallel_size,
            pipeline_parallel_size: self.pipeline_parallel_size,
            seed: self.seed,
            // -1: as many as the vocabulary has (checked against it per request).
            max_logprobs: usize::try_from(self.max_logprobs).unwrap_or(usize::MAX),
            chat_template: self.chat_template.as_deref().map(read_chat_template).transpose()?,
        })
    }
}

/// Sets up `tracing` output on stderr. The level comes from `PAGODA_LOG` (or `RUST_LOG`), default
/// `info`.
pub fn init_logging(format: LogFormat) {
    let filter =
        std::env::var("PAGODA_LOG").or_else(|_| std::env::var("RUST_LOG")).unwrap_or_else(|_| "info".to_string());
    let filter =
        tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512M"), Ok(512_000_000));
        assert_eq!(parse_bytes("1.5Ki"), Ok(1536));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("4XB").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn boolean_flags_follow_vllm() {
        let parse = |args: &[&str]| {
            let mut full = vec!["pagoda", "generate", "--prompt", "x"];
            full.extend_from_slice(args);
            let Command::Generate(g) = Cli::try_parse_from(full).unwrap().command else { unreachable!() };
            g.engine.to_options().unwrap()
        };
        assert!(parse(&[]).enable_prefix_caching);
        assert!(!parse(&["--no-enable-prefix-caching"]).enable_prefix_caching);
        assert!(!parse(&["--enable-prefix-caching", "false"]).enable_prefix_caching);
        assert!(parse(&["--enable-prefix-caching"]).enable_prefix_caching);
        assert!(!parse(&["--no-enable-chunked-prefill"]).enable_chunked_prefill);
    }

    #[test]
    fn vllm_command_lines_parse_as_vllm_reads_them() {
        let serve = |args: &[&str]| {
            let mut full = vec!["pagoda", "serve"];
            full.extend_from_slice(args);
            let Command::Serve(s) = Cli::try_parse_from(vllm_short_flags(full.into_iter().map(Into::into)))
                .map_err(|e| e.to_string())?
                .command
            else {
                unreachable!()
            };
            Ok::<_, String>(s)
        };
        let s = serve(&["org/model", "--max-num-seqs", "4", "--max-num-seqs", "8", "-tp", "1"]).unwrap();
        assert_eq!(s.model_tag.as_deref(), Some(std::path::Path::new("org/model")));
        assert_eq!((s.engine.max_num_seqs, s.engine.tensor_parallel_size), (8, 1), "the last value wins");
        // Lists still add up when repeated.
        let s = serve(&["--api-key", "a", "--api-key", "b", "--served-model-name", "x", "y"]).unwrap();
        assert_eq!(
            (s.api_key, s.engine.served_model_name),
            (vec!["a".into(), "b".into()], vec!["x".into(), "y".into()])
        );
        let s = serve(&["--trust-remote-code", "--max-logprobs", "-1", "--seed", "3"]).unwrap();
        let opts = s.engine.to_options().unwrap();
        assert_eq!((opts.max_logprobs, opts.seed), (usize::MAX, Some(3)));
        assert!(serve(&["--max-logprobs", "-2"]).is_err());
        assert!(serve(&["m", "--model", "m"]).unwrap_err().contains("cannot be used with"));
        assert!(serve(&["--disable-log-requests", "--enable-log-requests"]).is_err());
    }

    #[test]
    fn every_command_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn a_chat_template_is_a_file_or_a_template() {
        let dir = std::env::temp_dir().join(format!("pagoda-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("t.jinja");
        std::fs::write(&file, "{{ messages }}").unwrap();
        assert_eq!(read_chat_template(file.to_str().unwrap()).unwrap(), "{{ messages }}");
        assert_eq!(
            read_chat_template("{% for m in messages %}{% endfor %}").unwrap(),
            "{% for m in messages %}{% endfor %}"
        );
        assert!(read_chat_template("missing.jinja").unwrap_err().to_string().contains("no such file"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_the_automatic_kv_cache_dtype_is_accepted() {
        let parse = |value: &str| {
            Cli::try_parse_from(["pagoda", "generate", "--prompt", "x", "--kv-cache-dtype", value]).map(|_| ())
        };
        assert!(parse("auto").is_ok());
        let err = parse("fp8").unwrap_err().to_string();
        assert!(err.contains("quantized KV caches are not supported yet"), "{err}");
        assert!(parse("int4").unwrap_err().to_string().contains("unknown KV-cache dtype"));
    }
}
