//! `--pod-hosts-file`: a host name of its own for every pod, although every pod's IP is
//! 127.0.0.1. The file is a hosts file for the JDK (`-Djdk.net.hosts.file=<file>`): the JVMs
//! given it resolve names through it alone (it replaces /etc/hosts and DNS, and is read again on
//! each lookup that misses the JDK's address cache), so it starts with the machine's own
//! entries. Each pod adds `127.0.0.1 <pod>.<namespace>.pod` before its containers start; an
//! `apache/spark` executor then advertises that name (`--hostname`) while its sockets still bind
//! 127.0.0.1 (`--bind-address`). Several kubelets may share one file: every write is a single
//! append, or the creation of the whole file at once.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The address every pod name maps to: the pods' IP on the test bed.
pub const POD_ADDRESS: &str = "127.0.0.1";

/// The host name of pod `name` in `namespace` (pod names are DNS subdomains, so this is one too).
pub fn pod_host_name(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.pod").to_ascii_lowercase()
}

/// True when a line of the hosts text `content` names `name` (after its address, before a `#`).
pub fn names(content: &str, name: &str) -> bool {
    content.lines().any(|line| {
        let line = line.split('#').next().unwrap_or_default();
        line.split_whitespace()
            .skip(1)
            .any(|n| n.eq_ignore_ascii_case(name))
    })
}

/// What a new hosts file starts with: the machine's `/etc/hosts` (`etc_hosts`), then
/// `127.0.0.1 localhost` and `127.0.0.1 <machine>` when it does not name them (the JDK looks
/// the machine's name up for `InetAddress.getLocalHost`, which Spark calls).
pub fn base(etc_hosts: &str, machine: &str) -> String {
    let mut out = String::new();
    for line in etc_hosts.lines() {
        out.push_str(line);
        out.push('\n');
    }
    for name in ["localhost", machine] {
        if !name.is_empty() && !names(&out, name) {
            out.push_str(&format!("{POD_ADDRESS} {name}\n"));
        }
    }
    out
}

/// One pod's line.
pub fn pod_line(host: &str) -> String {
    format!("{POD_ADDRESS} {host}\n")
}

/// A shared pod hosts file.
#[derive(Debug, Clone)]
pub struct PodHosts {
    path: PathBuf,
}

impl PodHosts {
    /// The file at `path`, created (with [`base`] of this machine) when it does not exist yet.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let etc = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        // gethostname(2), which the JDK asks too (Linux: the test bed's only system).
        let machine = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let machine = machine.trim();
        Self::open_with(path, &base(&etc, machine))
    }

    /// The file at `path`, created with `initial` when it does not exist yet: written to a
    /// temporary file, then linked to `path`, which fails when another kubelet made it first
    /// (that one is kept), so no reader sees a partial file.
    pub fn open_with(path: &Path, initial: &str) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        if !path.exists() {
            let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
            std::fs::write(&tmp, initial)?;
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        // Absolute: the JVMs that read it run in their pods' folders.
        Ok(PodHosts {
            path: std::fs::canonicalize(path)?,
        })
    }

    /// The file's path (for `-Djdk.net.hosts.file`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds `127.0.0.1 <host>` unless the file names `host` already: one append of the whole
    /// line.
    pub fn add(&self, host: &str) -> std::io::Result<()> {
        if names(&std::fs::read_to_string(&self.path)?, host) {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        f.write_all(pod_line(host).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names() {
        assert_eq!(
            pod_host_name("app-1-exec-3", "default"),
            "app-1-exec-3.default.pod"
        );
        assert_eq!(pod_host_name("A", "Ns"), "a.ns.pod");
    }

    #[test]
    fn lines_name_hosts_after_their_address() {
        let text = "127.0.0.1 localhost vm # me\n# 127.0.0.1 commented\n::1 ip6-localhost\n";
        assert!(names(text, "localhost"));
        assert!(names(text, "VM"));
        assert!(names(text, "ip6-localhost"));
        assert!(!names(text, "commented"));
        assert!(!names(text, "me"));
        assert!(!names(text, "127.0.0.1"));
        assert!(!names(text, "local"));
    }

    #[test]
    fn the_base_keeps_etc_hosts_and_adds_what_the_jdk_needs() {
        assert_eq!(
            base("10.0.0.5 box\n", "box"),
            "10.0.0.5 box\n127.0.0.1 localhost\n"
        );
        assert_eq!(base("", "vm"), "127.0.0.1 localhost\n127.0.0.1 vm\n");
        assert_eq!(
            base("127.0.0.1 localhost\n127.0.0.1 vm", "vm"),
            "127.0.0.1 localhost\n127.0.0.1 vm\n"
        );
        assert_eq!(base("", ""), "127.0.0.1 localhost\n");
    }

    #[test]
    fn a_shared_file_is_made_once_and_each_pod_added_once() {
        let dir = std::env::temp_dir().join(format!("pod-hosts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub").join("hosts");
        let a = PodHosts::open_with(&path, "127.0.0.1 localhost\n").expect("created");
        // A second kubelet on the same file keeps what is there.
        let b = PodHosts::open_with(&path, "127.0.0.1 other\n").expect("opened");
        a.add("p-1.default.pod").expect("add");
        b.add("p-1.default.pod").expect("add again");
        b.add("p-2.default.pod").expect("add");
        assert_eq!(
            std::fs::read_to_string(b.path()).expect("read"),
            "127.0.0.1 localhost\n127.0.0.1 p-1.default.pod\n127.0.0.1 p-2.default.pod\n"
        );
        assert_eq!(
            std::fs::read_dir(path.parent().expect("dir"))
                .expect("list")
                .count(),
            1,
            "no temporary file is left"
        );
        std::fs::remove_dir_all(&dir).expect("clean");
    }
}
