//! The d402 node: roles, the libp2p node, the gateway's HTTP API, state, and the `d402`
//! command's implementation. The `d402` binary is a thin wrapper over [`cli`].

pub mod capstore;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod group_commit;
pub mod journal;
pub mod keys;
pub mod market;
pub mod net;
pub mod state;

/// Tests that need a process to die: the test binary re-runs one of its own tests in a
/// child process.
#[cfg(test)]
pub(crate) mod test_child {
    /// Runs test `name` (its full path) of this binary alone in a child process with
    /// `var` set to `value` (the test sees it and plays the child), and returns what the
    /// child did.
    pub fn rerun(name: &str, var: &str, value: &std::path::Path) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(var, value)
            .output()
            .expect("the child test process")
    }
}
