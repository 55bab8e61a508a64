//! Containers as local process groups: start (tied to the kubelet's life), signal, measure.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::spec::CommandLine;

/// A started container process (leader of its own process group).
pub struct Started {
    /// The child; `wait()` on it gives the exit status.
    pub child: tokio::process::Child,
    /// Its pid, which is also its process group id.
    pub pid: i32,
}

/// Starts `cl` in its own process group through `<self> exec-guard`, so that it dies with the
/// kubelet; stdout and stderr go to `log`.
pub fn start(
    cl: &CommandLine,
    env: &BTreeMap<String, String>,
    cwd: &Path,
    log: &Path,
) -> std::io::Result<Started> {
    // /proc/self/exe rather than the path: the forked child runs this very binary even when the
    // file was replaced (rebuilt) since the kubelet started.
    let me = std::path::PathBuf::from("/proc/self/exe");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    let mut command = tokio::process::Command::new(me);
    command
        .arg("exec-guard")
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--")
        .arg(&cl.program)
        .args(&cl.args)
        .env_clear()
        .envs(env)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false);
    let child = command.spawn()?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| std::io::Error::other("child has no pid"))?;
    Ok(Started { child, pid })
}

/// Sends `signal` to the process group `pgid`; a group that is already gone is not an error.
pub fn signal_group(pgid: i32, signal: Signal) {
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(err) => tracing::warn!(pgid, %signal, %err, "cannot signal process group"),
    }
}

/// Resident memory in bytes of every process group in `/proc`, keyed by group id.
pub fn rss_by_group() -> BTreeMap<i32, u64> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096);
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // fields[0] is state (field 3); pgrp is field 5, rss is field 24.
        let (Some(pgrp), Some(rss)) = (fields.get(2), fields.get(21)) else {
            continue;
        };
        let (Ok(pgrp), Ok(rss)) = (pgrp.parse::<i32>(), rss.parse::<u64>()) else {
            continue;
        };
        *out.entry(pgrp).or_insert(0) += rss * page;
    }
    out
}

/// Exit code as a container runtime reports it: the code, or 128 + signal number.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}
