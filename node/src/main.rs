//! The `d402` command: one binary for every role.

use clap::Parser;

/// mimalloc instead of glibc's malloc: the node allocates many small, short-lived buffers
/// across threads (messages, rows, futures), where glibc's arenas cost a sixth of the CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = d402_node::cli::Cli::parse();
    match cli.run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(2)
        }
    }
}
