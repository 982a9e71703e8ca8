//! `edgefleet`: parses arguments, runs one command, maps errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // tract builds `anyhow` errors on hot paths; with RUST_BACKTRACE=1 in the
    // environment each captures a backtrace (1.5x slower inference, up to 2x slower
    // loading: ../shared/models/README.md). Library backtraces are off for us;
    // panic backtraces still follow RUST_BACKTRACE.
    // SAFETY: first statement of main, before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = edgefleet::ops::cli::Cli::parse();
    match edgefleet::ops::cli::run(cli) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
