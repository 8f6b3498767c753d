//! The `pagoda` binary: parses the command line and reports errors as one line, never a panic.

use clap::Parser;

/// The error and its causes as one line, skipping causes whose text the line already holds
/// (many errors include their source in their own message).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

fn main() -> std::process::ExitCode {
    let cli = pagoda::cli::Cli::parse_from(pagoda::cli::vllm_short_flags(std::env::args_os()));
    pagoda::cli::init_logging(cli.log_format);
    match cli.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
