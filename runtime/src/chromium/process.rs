//! Starting and reaping the browser process: its own process group, resource limits, the
//! DevTools pipe on fds 3 and 4, a scrubbed environment inside the temporary profile.
//!
//! This is one of the two places in the crate with `unsafe` (the other is the compiled-module
//! cache): `pre_exec` and a few libc calls. Each block says why it is sound.
#![allow(unsafe_code)]

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Per-process resource limits for the browser and everything it starts (rlimits are
/// inherited across fork and exec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrowserLimits {
    /// `RLIMIT_CPU`: CPU seconds per process (SIGXCPU, then SIGKILL).
    pub cpu_seconds: u64,
    /// `RLIMIT_DATA`: private writable memory per process, in bytes. (`RLIMIT_AS` is useless
    /// for Chromium: V8 reserves far more address space than it ever uses.)
    pub data_bytes: u64,
    /// `RLIMIT_FSIZE`: largest file a process may write, in bytes.
    pub file_bytes: u64,
    /// `RLIMIT_NOFILE`: open files per process.
    pub open_files: u64,
}

impl Default for BrowserLimits {
    fn default() -> Self {
        BrowserLimits {
            cpu_seconds: 120,
            data_bytes: 4 * 1024 * 1024 * 1024,
            file_bytes: 512 * 1024 * 1024,
            open_files: 4096,
        }
    }
}

/// A started browser. Dropping it kills its whole process group and reaps it.
#[derive(Debug)]
pub(crate) struct BrowserProcess {
    child: Child,
    pgid: i32,
    reaped: bool,
}

/// The two ends of the DevTools pipe the host keeps.
pub(crate) struct DevToolsPipe {
    /// The host writes commands here (the browser's fd 3).
    pub(crate) to_browser: OwnedFd,
    /// The host reads replies and events here (the browser's fd 4).
    pub(crate) from_browser: OwnedFd,
}

/// Duplicates `fd` to a number ≥ 10 (close-on-exec), so that the `dup2` onto 3 and 4 in the
/// child can never clobber the other pipe end.
fn above_ten(fd: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: `fcntl(F_DUPFD_CLOEXEC)` on a valid, owned descriptor returns a new descriptor
    // or -1; it does not touch memory.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

fn hard_limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes only into `lim`.
    if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
        return u64::MAX;
    }
    lim.rlim_max
}

/// Starts `binary` with `args`: new process group, rlimits, environment limited to the
/// profile directory, stdout discarded, stderr to `<profile>/chromium.log`, and the DevTools
/// pipe on fds 3 (commands in) and 4 (replies out).
pub(crate) fn spawn(
    binary: &Path,
    args: &[String],
    profile: &Path,
    limits: BrowserLimits,
) -> io::Result<(BrowserProcess, DevToolsPipe)> {
    let (browser_reads, host_writes) = io::pipe()?;
    let (host_reads, browser_writes) = io::pipe()?;
    let child_in = above_ten(OwnedFd::from(browser_reads))?;
    let child_out = above_ten(OwnedFd::from(browser_writes))?;
    let (in_fd, out_fd) = (child_in.as_raw_fd(), child_out.as_raw_fd());
    let log = File::create(profile.join("chromium.log"))?;
    for dir in ["config", "cache", "tmp"] {
        std::fs::create_dir_all(profile.join(dir))?;
    }
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env_clear()
        .env("HOME", profile)
        .env("XDG_CONFIG_HOME", profile.join("config"))
        .env("XDG_CACHE_HOME", profile.join("cache"))
        .env("TMPDIR", profile.join("tmp"))
        .env("PATH", "/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .process_group(0);
    // Never above the current hard limit (raising it needs privileges we may not have).
    let rlimits = [
        (libc::RLIMIT_CORE, 0),
        (libc::RLIMIT_CPU, limits.cpu_seconds),
        (libc::RLIMIT_DATA, limits.data_bytes),
        (libc::RLIMIT_FSIZE, limits.file_bytes),
        (libc::RLIMIT_NOFILE, limits.open_files),
    ]
    .map(|(resource, value)| (resource, value.min(hard_limit(resource))));
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (dup2, setrlimit) on values copied in beforehand; it
    // allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(in_fd, 3) < 0 || libc::dup2(out_fd, 4) < 0 {
                return Err(io::Error::last_os_error());
            }
            for (resource, value) in rlimits {
                let lim = libc::rlimit {
                    rlim_cur: value as libc::rlim_t,
                    rlim_max: value as libc::rlim_t,
                };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(child_in);
    drop(child_out);
    let pgid = child.id() as i32;
    Ok((
        BrowserProcess {
            child,
            pgid,
            reaped: false,
        },
        DevToolsPipe {
            to_browser: OwnedFd::from(host_writes),
            from_browser: OwnedFd::from(host_reads),
        },
    ))
}

impl BrowserProcess {
    /// The process group (the browser's pid).
    pub(crate) fn pgid(&self) -> i32 {
        self.pgid
    }

    /// Whether the main process has exited, without reaping it (a zombie leader keeps the
    /// process-group id reserved, so killing the group afterwards cannot hit a stranger).
    fn exited(&self) -> bool {
        // SAFETY: `waitid` writes only into the zeroed `siginfo_t` we pass.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                self.pgid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r == 0 && info.si_pid() != 0
        }
    }

    /// Waits up to `grace` for the main process to exit by itself.
    pub(crate) async fn wait_exit(&self, grace: Duration) -> bool {
        let until = Instant::now() + grace;
        loop {
            if self.exited() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills every process in the group and reaps the main process.
    pub(crate) fn kill_and_reap(&mut self) {
        if self.reaped {
            return;
        }
        // SAFETY: `kill` with a negative pid signals the process group; the group id is our
        // child's pid, still reserved because we have not reaped the child yet.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for BrowserProcess {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Kills every process whose command line names `profile` (a unique temporary directory of
/// ours). Chromium's crash handler double-forks out of the browser's process group; it is
/// found this way.
pub(crate) fn kill_profile_processes(profile: &Path) {
    let needle = profile.as_os_str().as_encoded_bytes();
    if needle.len() < 8 {
        return;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            // SAFETY: plain `kill(2)` of a process running with our unique profile path.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Live (non-zombie) processes whose process group is `pgid`, from `/proc`.
pub fn live_processes_in_group(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces) start after ") ".
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest: state ppid pgrp ...
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
            found.push(pid);
        }
    }
    found
}
