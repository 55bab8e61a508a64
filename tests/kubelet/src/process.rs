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

/// Sends `signal` to process `pid` alone (not its group); a process that is already gone is not
/// an error.
pub fn signal_pid(pid: i32, signal: Signal) {
    match nix::sys::signal::kill(Pid::from_raw(pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(err) => tracing::warn!(pid, %signal, %err, "cannot signal process"),
    }
}

/// One process of `/proc`: its parent, process group and resident memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub rss: u64,
}

/// Every process in `/proc` now.
pub fn processes() -> Vec<Proc> {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096);
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(Ok(pid)) = name.to_str().map(str::parse::<i32>) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(p) = parse_stat(pid, &stat, page) {
            out.push(p);
        }
    }
    out
}

/// A `/proc/<pid>/stat` line: ppid is field 4, pgrp field 5, rss (pages) field 24.
fn parse_stat(pid: i32, stat: &str, page: u64) -> Option<Proc> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let close = stat.rfind(')')?;
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    Some(Proc {
        pid,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        rss: fields.get(21)?.parse::<u64>().ok()? * page,
    })
}

/// The processes of the container whose main process is `leader` (the leader of its own
/// group), as a cgroup would hold them: the group's members and every descendant of them, also
/// those that moved to a process group of their own (PySpark's daemon calls `setpgid(0, 0)`;
/// in a real container it stays in the container's cgroup and counts toward its memory limit).
pub fn container_members(procs: &[Proc], leader: i32) -> Vec<Proc> {
    let mut members: Vec<Proc> = procs.iter().filter(|p| p.pgrp == leader).copied().collect();
    let mut seen: std::collections::BTreeSet<i32> = members.iter().map(|p| p.pid).collect();
    let mut next = 0;
    while next < members.len() {
        let parent = members[next].pid;
        next += 1;
        for p in procs.iter().filter(|p| p.ppid == parent) {
            if seen.insert(p.pid) {
                members.push(*p);
            }
        }
    }
    members
}

/// SIGKILL to every process of the container led by `leader` (its group and its descendants),
/// as a cgroup v2 OOM kill with `memory.oom.group=1` (what the kubelet sets since Kubernetes
/// 1.28) or a runtime stopping the container does.
pub fn kill_container(leader: i32) {
    let members = container_members(&processes(), leader);
    signal_group(leader, Signal::SIGKILL);
    for p in members {
        match nix::sys::signal::kill(Pid::from_raw(p.pid), Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(err) => tracing::warn!(pid = p.pid, %err, "cannot kill a container process"),
        }
    }
}

/// Exit code as a container runtime reports it: the code, or 128 + signal number.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, ppid: i32, pgrp: i32, rss: u64) -> Proc {
        Proc {
            pid,
            ppid,
            pgrp,
            rss,
        }
    }

    #[test]
    fn stat_lines_parse_with_spaces_in_the_name() {
        let line = "42 (python3 -m x) S 7 40 40 0 -1 4194304 1 0 0 0 0 0 0 0 20 0 1 0 1 1000 25 0";
        assert_eq!(parse_stat(42, line, 4096), Some(p(42, 7, 40, 25 * 4096)));
        assert_eq!(parse_stat(1, "garbage", 4096), None);
    }

    #[test]
    fn members_are_the_group_and_all_its_descendants_in_other_groups() {
        let procs = [
            p(10, 1, 10, 100),  // the container's main process (a JVM)
            p(11, 10, 10, 1),   // a thread-like child in its group
            p(20, 10, 20, 30),  // PySpark's daemon: setpgid(0, 0)
            p(21, 20, 20, 700), // its forked worker
            p(22, 21, 22, 5),   // a grandchild in yet another group
            p(30, 1, 30, 999),  // another container
            p(31, 30, 30, 999),
        ];
        let mut pids: Vec<i32> = container_members(&procs, 10)
            .iter()
            .map(|p| p.pid)
            .collect();
        pids.sort_unstable();
        assert_eq!(pids, [10, 11, 20, 21, 22]);
        let rss: u64 = container_members(&procs, 10).iter().map(|p| p.rss).sum();
        assert_eq!(rss, 836);
        assert!(container_members(&procs, 99).is_empty());
    }
}
