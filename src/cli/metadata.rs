//! `pagoda metadata`: read the instance's user data and write the service's environment file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::metadata::{self, Provider};
use crate::telemetry::cloud;

#[derive(Debug, Args)]
pub struct MetadataArgs {
    /// Which metadata service to ask; auto detects the cloud from DMI.
    #[arg(long, value_enum, default_value_t = ProviderArg::Auto)]
    pub provider: ProviderArg,

    /// Base URL of the metadata service (default: the cloud's own).
    #[arg(long)]
    pub endpoint: Option<String>,

    /// The environment file to write.
    #[arg(long, default_value = "/run/pagoda/launch.env")]
    pub output: PathBuf,

    /// Seconds each request to the metadata service may take.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,

    /// Folder with the DMI strings used to detect the cloud.
    #[arg(long, env = "PAGODA_DMI_DIR", default_value = cloud::DMI_DIR)]
    pub dmi_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProviderArg {
    Auto,
    Aws,
    Gcp,
    Azure,
}

pub fn run(args: MetadataArgs) -> anyhow::Result<()> {
    let provider = match args.provider {
        ProviderArg::Aws => Some(Provider::Aws),
        ProviderArg::Gcp => Some(Provider::Gcp),
        ProviderArg::Azure => Some(Provider::Azure),
        ProviderArg::Auto => match cloud::detect(&args.dmi_dir).provider {
            "aws" => Some(Provider::Aws),
            "gcp" => Some(Provider::Gcp),
            "azure" => Some(Provider::Azure),
            _ => None,
        },
    };
    let Some(provider) = provider else {
        tracing::info!("no cloud detected; the service keeps its built-in configuration");
        metadata::write_atomically(&args.output, &metadata::render_env_file(None, "no cloud (none detected)"))?;
        return Ok(());
    };
    let endpoint = args.endpoint.clone().unwrap_or_else(|| provider.default_endpoint().to_string());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let user_data =
        runtime.block_on(metadata::fetch_user_data(provider, &endpoint, Duration::from_secs(args.timeout)))?;
    let config = match &user_data {
        Some(text) => metadata::parse_user_data(text)?,
        None => None,
    };
    if user_data.is_some() && config.is_none() {
        tracing::info!("the user data is not for Pagoda (cloud-config or a script); nothing taken from it");
    }
    metadata::write_atomically(&args.output, &metadata::render_env_file(config.as_ref(), provider.name()))?;
    tracing::info!(output = %args.output.display(), model = ?config.as_ref().and_then(|c| c.model.as_deref()), "launch configuration written");
    Ok(())
}
