//! The `pagoda` binary: parses the command line and reports errors as one line, never a panic.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = pagoda::cli::Cli::parse();
    pagoda::cli::init_logging(cli.log_format);
    match cli.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
