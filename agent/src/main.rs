//! `edgefleet-agent`: parses arguments, runs one command, maps errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

/// The static musl device build allocates with mimalloc: musl's allocator hands
/// tract's large per-run buffers back to the kernel on free and faults them in
/// again on the next inference (a third of the CNN's time in the kernel; see
/// docs/benchmarks.md, issue 25). glibc builds keep glibc's allocator; armv7
/// keeps musl's (see agent/Cargo.toml).
#[cfg(all(target_env = "musl", not(target_arch = "arm")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // tract builds `anyhow` errors on hot paths; with RUST_BACKTRACE=1 each captures
    // a backtrace (1.5x slower inference, up to 2x slower loading).
    // SAFETY: first statement of main, before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    match edgefleet_agent::cli::run(edgefleet_agent::cli::Cli::parse()) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
