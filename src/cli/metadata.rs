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

    /// Where the API key read from `api_key_secret` is written (readable by its owner only; the
    /// launch environment then names it as PAGODA_API_KEY_FILE).
    #[arg(long, default_value = "/run/pagoda/api-key")]
    pub api_key_output: PathBuf,

    /// Base URL replacing the secret store's own (a private endpoint; tests).
    #[arg(long, hide = true)]
    pub secrets_endpoint: Option<String>,

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
    let mut config = match &user_data {
        Some(text) => metadata::parse_user_data(text)?,
        None => None,
    };
    if let Some(c) = config.as_mut()
        && let Some(secret) = &c.api_key_secret
    {
        // The key is written before the environment file that names it; a secret that cannot be
        // read fails the unit, so the server never starts without the key it was meant to have.
        let secret = metadata::secrets::SecretRef::parse(secret).map_err(metadata::MetadataError::Invalid)?;
        let key = runtime.block_on(metadata::fetch_api_key(
            provider,
            &endpoint,
            Duration::from_secs(args.timeout),
            &secret,
            args.secrets_endpoint.as_deref(),
            c.env.get("AZURE_CLIENT_ID").map(String::as_str),
        ))?;
        let output = std::path::absolute(&args.api_key_output)?;
        metadata::write_atomically(&output, &key)?;
        tracing::info!(store = secret.store(), output = %output.display(), "API key read from the secret store");
        c.api_key_file = Some(output.display().to_string());
    }
    if user_data.is_some() && config.is_none() {
        tracing::info!("the user data is not for Pagoda (cloud-config or a script); nothing taken from it");
    }
    metadata::write_atomically(&args.output, &metadata::render_env_file(config.as_ref(), provider.name()))?;
    tracing::info!(output = %args.output.display(), model = ?config.as_ref().and_then(|c| c.model.as_deref()), "launch configuration written");
    Ok(())
}
