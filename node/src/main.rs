//! The `d402` command: one binary for every role.

use clap::Parser;

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
