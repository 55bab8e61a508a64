//! Pure translation of a container spec into a local command: quantities, `$(VAR)` expansion,
//! mount-path rewriting and the official `apache/spark` image's entrypoint roles.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::LifecycleHandler;

/// Why a container cannot be turned into a command.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// Neither `command` nor `args`, and the image's entrypoint is not one we know.
    #[error("image {image:?} has no entrypoint known to the test-bed kubelet; give the container a command")]
    UnknownEntrypoint {
        /// The container image.
        image: String,
    },
    /// An environment variable the entrypoint needs is missing.
    #[error("the {role} role of image {image:?} needs the environment variable {var}")]
    MissingEnv {
        /// The entrypoint role (`executor`).
        role: &'static str,
        /// The image.
        image: String,
        /// The variable.
        var: &'static str,
    },
    /// A resource quantity that does not parse.
    #[error("bad quantity {0:?}")]
    Quantity(String),
}

/// Parses a Kubernetes memory quantity (`512Mi`, `1G`, `1e3`, `2048`) into bytes.
pub fn parse_bytes(q: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::Quantity(q.to_string());
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "m" => 1e-3,
        s if s.starts_with('e') || s.starts_with('E') => {
            let exp: i32 = s[1..].parse().map_err(|_| bad())?;
            10f64.powi(exp)
        }
        _ => return Err(bad()),
    };
    Ok((value * factor).ceil() as u64)
}

/// Parses a CPU quantity (`2`, `500m`, `0.5`) into millicores.
pub fn parse_millicores(q: &str) -> Result<u64, SpecError> {
    let q = q.trim();
    if let Some(m) = q.strip_suffix('m') {
        return m.parse().map_err(|_| SpecError::Quantity(q.to_string()));
    }
    let v: f64 = q.parse().map_err(|_| SpecError::Quantity(q.to_string()))?;
    Ok((v * 1000.0).ceil() as u64)
}

/// Expands `$(NAME)` references against `env` as Kubernetes does: `$$` escapes, unknown
/// references stay as written.
pub fn expand(input: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        if let Some(after) = tail.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(body) = tail.strip_prefix('(') {
            match body.find(')') {
                Some(end) => {
                    let name = &body[..end];
                    match env.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = body;
                }
            }
        } else {
            out.push('$');
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

/// Container paths mapped to local folders, longest first so that nested mounts win.
#[derive(Debug, Default, Clone)]
pub struct PathMap {
    entries: Vec<(String, PathBuf)>,
}

impl PathMap {
    /// Adds a mapping of `container_path` to `local`.
    pub fn add(&mut self, container_path: &str, local: &Path) {
        let key = container_path.trim_end_matches('/').to_string();
        if key.is_empty() {
            return;
        }
        self.entries.retain(|(k, _)| k != &key);
        self.entries.push((key, local.to_path_buf()));
        self.entries.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
    }

    /// Rewrites every occurrence of a mapped container path that starts a path (at the start,
    /// after `:`, `=`, `,` or a space) and ends at a path boundary.
    pub fn rewrite(&self, value: &str) -> String {
        let mut out = String::with_capacity(value.len());
        let bytes = value.as_bytes();
        let mut i = 0;
        'outer: while i < value.len() {
            let at_start = i == 0 || matches!(bytes[i - 1], b':' | b'=' | b',' | b' ');
            if at_start && bytes[i] == b'/' {
                for (k, local) in &self.entries {
                    if value[i..].starts_with(k.as_str()) {
                        let end = i + k.len();
                        let boundary = end == value.len()
                            || matches!(bytes[end], b'/' | b':' | b',' | b' ' | b';');
                        if boundary {
                            out.push_str(&local.to_string_lossy());
                            i = end;
                            continue 'outer;
                        }
                    }
                }
            }
            // Copy one UTF-8 character.
            let ch_len = value[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&value[i..i + ch_len]);
            i += ch_len;
        }
        out
    }
}

/// True for the official Spark images (`apache/spark`, `spark`, with any registry and tag).
pub fn is_spark_image(image: &str) -> bool {
    let without_digest = image.split('@').next().unwrap_or(image);
    // The tag is after the last ':' that follows the last '/'.
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    let repo_end = without_digest[last_slash..]
        .find(':')
        .map_or(without_digest.len(), |i| last_slash + i);
    let repo = &without_digest[..repo_end];
    repo == "spark" || repo.ends_with("/spark")
}

/// A local command for a container.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandLine {
    /// Program to run.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
}

/// Local installation facts the image's entrypoint relies on.
#[derive(Debug, Clone)]
pub struct Host {
    /// `SPARK_HOME` of the local Spark (stands in for `/opt/spark` of the image).
    pub spark_home: PathBuf,
    /// The `java` to run.
    pub java: String,
}

/// A pod's own host name (`--pod-hosts-file`, see [`crate::hosts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PodHost {
    /// The name, mapped to 127.0.0.1 in `hosts_file`.
    pub name: String,
    /// The hosts file the pod's JVMs resolve names with (`-Djdk.net.hosts.file`).
    pub hosts_file: PathBuf,
}

/// The command a container runs, with the `apache/spark` entrypoint's `executor` role mapped to
/// the same `java … KubernetesExecutorBackend` command the image's `entrypoint.sh` builds. With
/// a `pod_host`, that executor advertises `pod_host.name` instead of `$SPARK_EXECUTOR_POD_IP`
/// (`--hostname`), binds 127.0.0.1 (`--bind-address`) and resolves names with the pod hosts
/// file; other commands are the same either way.
pub fn command_line(
    image: &str,
    command: &[String],
    args: &[String],
    env: &BTreeMap<String, String>,
    host: &Host,
    pod_host: Option<&PodHost>,
) -> Result<CommandLine, SpecError> {
    if command.is_empty()
        && is_spark_image(image)
        && args.first().map(String::as_str) == Some("executor")
    {
        return spark_executor(image, env, host, pod_host);
    }
    let mut all: Vec<String> = command.iter().chain(args).map(|a| expand(a, env)).collect();
    if all.is_empty() {
        return Err(SpecError::UnknownEntrypoint {
            image: image.to_string(),
        });
    }
    let program = all.remove(0);
    Ok(CommandLine { program, args: all })
}

fn spark_executor(
    image: &str,
    env: &BTreeMap<String, String>,
    host: &Host,
    pod_host: Option<&PodHost>,
) -> Result<CommandLine, SpecError> {
    let need = |var: &'static str| {
        env.get(var).cloned().ok_or(SpecError::MissingEnv {
            role: "executor",
            image: image.to_string(),
            var,
        })
    };
    // entrypoint.sh: SPARK_JAVA_OPT_<n> in numeric order of <n>.
    let mut opts: Vec<(u64, &String)> = env
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("SPARK_JAVA_OPT_")
                .and_then(|n| n.parse().ok())
                .map(|n| (n, v))
        })
        .collect();
    opts.sort_by_key(|(n, _)| *n);
    let jars = host.spark_home.join("jars").join("*");
    let mut classpath = env.get("SPARK_CLASSPATH").cloned().unwrap_or_default();
    classpath = format!("{classpath}:{}", jars.display());
    if let Some(extra) = env.get("SPARK_EXTRA_CLASSPATH") {
        classpath = format!("{classpath}:{extra}");
    }
    if let Some(conf) = env.get("HADOOP_CONF_DIR") {
        classpath = format!("{conf}:{classpath}");
    }
    match env.get("SPARK_CONF_DIR") {
        Some(conf) => classpath = format!("{conf}:{classpath}"),
        None => classpath = format!("{}:{classpath}", host.spark_home.join("conf").display()),
    }
    let dist = env.get("SPARK_DIST_CLASSPATH").cloned().unwrap_or_default();
    let memory = need("SPARK_EXECUTOR_MEMORY")?;
    let mut args: Vec<String> = opts.into_iter().map(|(_, v)| v.clone()).collect();
    // After the pod's own options: the last -D of a name wins.
    if let Some(p) = pod_host {
        args.push(format!("-Djdk.net.hosts.file={}", p.hosts_file.display()));
    }
    let hostname = match pod_host {
        Some(p) => p.name.clone(),
        None => need("SPARK_EXECUTOR_POD_IP")?,
    };
    args.extend([
        format!("-Xms{memory}"),
        format!("-Xmx{memory}"),
        "-cp".to_string(),
        format!("{classpath}:{dist}"),
        "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend".to_string(),
        "--driver-url".to_string(),
        need("SPARK_DRIVER_URL")?,
        "--executor-id".to_string(),
        need("SPARK_EXECUTOR_ID")?,
        "--cores".to_string(),
        need("SPARK_EXECUTOR_CORES")?,
        "--app-id".to_string(),
        need("SPARK_APPLICATION_ID")?,
        "--hostname".to_string(),
        hostname,
        "--resourceProfileId".to_string(),
        env.get("SPARK_RESOURCE_PROFILE_ID")
            .cloned()
            .unwrap_or_else(|| "0".to_string()),
        "--podName".to_string(),
        need("SPARK_EXECUTOR_POD_NAME")?,
    ]);
    if pod_host.is_some() {
        // KubernetesExecutorBackend binds `--hostname` unless told: the block manager's server
        // (the executor's listening socket) stays on the pod IP and advertises the name.
        args.extend([
            "--bind-address".to_string(),
            crate::hosts::POD_ADDRESS.to_string(),
        ]);
    }
    Ok(CommandLine {
        program: host.java.clone(),
        args,
    })
}

/// The command of the `apache/spark` image's decommissioning script, the executor container's
/// `preStop` hook under `spark.decommission.enabled=true` (Spark's default
/// `spark.kubernetes.decommission.script`).
pub const SPARK_DECOM_SCRIPT: &str = "/opt/decom.sh";

/// The least time a container gets between the end of its `preStop` hook and SIGKILL, however
/// much of the grace period the hook used (the kubelet's `minimumGracePeriodInSeconds`).
pub const MIN_GRACE_AFTER_HOOK: Duration = Duration::from_secs(2);

/// What a container's `preStop` hook does when its pod is deleted gracefully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreStop {
    /// No hook: SIGTERM at once.
    None,
    /// `/opt/decom.sh` of the `apache/spark` image, which the local Spark does not have; the
    /// kubelet does what it does instead (SIGPWR to the executor JVM, then wait for it to exit).
    SparkDecom,
    /// An exec hook: run this command (no `$(VAR)` expansion, as for the kubelet's exec hooks).
    Exec(Vec<String>),
    /// A hook the test bed does not run (httpGet, sleep, tcpSocket, an empty exec): SIGTERM at
    /// once, as after a failed hook.
    Unsupported(String),
}

/// The `preStop` hook of a container of `image`.
pub fn pre_stop(image: &str, hook: Option<&LifecycleHandler>) -> PreStop {
    let Some(hook) = hook else {
        return PreStop::None;
    };
    if let Some(exec) = &hook.exec {
        let command = exec.command.clone().unwrap_or_default();
        if command.is_empty() {
            return PreStop::Unsupported("an exec hook without a command".into());
        }
        if is_spark_image(image) && command == [SPARK_DECOM_SCRIPT] {
            return PreStop::SparkDecom;
        }
        return PreStop::Exec(command);
    }
    let kind = if hook.http_get.is_some() {
        "httpGet"
    } else if hook.sleep.is_some() {
        "sleep"
    } else if hook.tcp_socket.is_some() {
        "tcpSocket"
    } else {
        "empty"
    };
    PreStop::Unsupported(format!(
        "{kind} hooks are not supported by the test-bed kubelet"
    ))
}

/// When a container whose `preStop` hook ended at `now` is SIGKILLed: at the end of the grace
/// period (`deadline`, counted from the deletion, so the hook's time counts against it), but no
/// sooner than [`MIN_GRACE_AFTER_HOOK`] after the SIGTERM that follows the hook.
pub fn kill_deadline_after_hook<T>(deadline: T, now: T) -> T
where
    T: Ord + std::ops::Add<Duration, Output = T>,
{
    deadline.max(now + MIN_GRACE_AFTER_HOOK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_bytes("1408Mi"), Ok(1408 * 1024 * 1024));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("2048"), Ok(2048));
        assert_eq!(parse_bytes("1e3"), Ok(1000));
        assert!(parse_bytes("12Qi").is_err());
        assert_eq!(parse_millicores("500m"), Ok(500));
        assert_eq!(parse_millicores("2"), Ok(2000));
        assert_eq!(parse_millicores("0.25"), Ok(250));
        assert!(parse_millicores("x").is_err());
    }

    #[test]
    fn expansion() {
        let env: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(A", &env), "$(A");
        assert_eq!(expand("$A", &env), "$A");
    }

    #[test]
    fn path_rewrite() {
        let mut m = PathMap::default();
        m.add("/opt/spark", Path::new("/local/spark"));
        m.add("/opt/spark/conf", Path::new("/pod/conf"));
        m.add("/var/data/spark-1", Path::new("/pod/v1"));
        assert_eq!(m.rewrite("/opt/spark/conf"), "/pod/conf");
        assert_eq!(
            m.rewrite("/opt/spark/conf/x.properties"),
            "/pod/conf/x.properties"
        );
        assert_eq!(m.rewrite("/opt/spark/jars/*"), "/local/spark/jars/*");
        assert_eq!(m.rewrite("/opt/sparkle"), "/opt/sparkle");
        assert_eq!(
            m.rewrite("/var/data/spark-1,/var/data/spark-12"),
            "/pod/v1,/var/data/spark-12"
        );
        assert_eq!(m.rewrite("-Dx=/opt/spark/conf"), "-Dx=/pod/conf");
        assert_eq!(m.rewrite("a/opt/spark"), "a/opt/spark");
    }

    #[test]
    fn spark_images() {
        assert!(is_spark_image("apache/spark:4.2.0"));
        assert!(is_spark_image(
            "docker.io/apache/spark:4.2.0-scala2.13-java17-ubuntu"
        ));
        assert!(is_spark_image("spark"));
        assert!(is_spark_image("registry:5000/spark@sha256:abc"));
        assert!(!is_spark_image("apache/spark-py:v3"));
        assert!(!is_spark_image("busybox"));
    }

    /// An executor container's environment as Spark's pod sets it, plus `more`.
    fn executor_env(memory: &str, more: &[(&str, &str)]) -> BTreeMap<String, String> {
        [
            (
                "SPARK_DRIVER_URL",
                "spark://CoarseGrainedScheduler@127.0.0.1:7078",
            ),
            ("SPARK_EXECUTOR_ID", "3"),
            ("SPARK_EXECUTOR_CORES", "1"),
            ("SPARK_EXECUTOR_MEMORY", memory),
            ("SPARK_APPLICATION_ID", "spark-abc"),
            ("SPARK_EXECUTOR_POD_IP", "127.0.0.1"),
            ("SPARK_EXECUTOR_POD_NAME", "pod-exec-3"),
        ]
        .iter()
        .chain(more)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn test_host() -> Host {
        Host {
            spark_home: PathBuf::from("/sh"),
            java: "java".to_string(),
        }
    }

    #[test]
    fn executor_role_matches_entrypoint() {
        let env = executor_env(
            "1024m",
            &[
                ("SPARK_JAVA_OPT_10", "-Dten"),
                ("SPARK_JAVA_OPT_2", "-Dtwo"),
                ("SPARK_CONF_DIR", "/pod/conf"),
            ],
        );
        let host = test_host();
        let cl = command_line(
            "apache/spark:4.2.0",
            &[],
            &["executor".to_string()],
            &env,
            &host,
            None,
        )
        .expect("executor role");
        assert_eq!(cl.program, "java");
        assert_eq!(&cl.args[..4], ["-Dtwo", "-Dten", "-Xms1024m", "-Xmx1024m"]);
        assert_eq!(cl.args[5], "/pod/conf::/sh/jars/*:");
        assert!(cl.args.contains(&"pod-exec-3".to_string()));
        let at = |flag: &str| cl.args.iter().position(|a| a == flag);
        assert_eq!(
            cl.args[at("--hostname").expect("hostname") + 1],
            "127.0.0.1"
        );
        assert_eq!(at("--bind-address"), None);
        assert!(!cl.args.iter().any(|a| a.contains("jdk.net.hosts.file")));
        let rp = cl
            .args
            .iter()
            .position(|a| a == "--resourceProfileId")
            .expect("rp");
        assert_eq!(cl.args[rp + 1], "0");

        let mut missing = env.clone();
        missing.remove("SPARK_DRIVER_URL");
        assert!(matches!(
            command_line(
                "apache/spark:4.2.0",
                &[],
                &["executor".to_string()],
                &missing,
                &host,
                None
            ),
            Err(SpecError::MissingEnv {
                var: "SPARK_DRIVER_URL",
                ..
            })
        ));
        let other = command_line(
            "busybox",
            &["sh".into()],
            &["-c".into(), "echo $(SPARK_EXECUTOR_ID)".into()],
            &env,
            &host,
            None,
        )
        .expect("plain command");
        assert_eq!(other.args, ["-c", "echo 3"]);
        assert!(command_line("busybox", &[], &[], &env, &host, None).is_err());
    }

    #[test]
    fn with_a_pod_host_the_executor_advertises_it_and_binds_the_pod_ip() {
        let env = executor_env(
            "512m",
            &[("SPARK_JAVA_OPT_0", "-Djdk.net.hosts.file=/pod/own")],
        );
        let host = test_host();
        let pod_host = PodHost {
            name: "pod-exec-3.default.pod".into(),
            hosts_file: PathBuf::from("/tmp/bed/hosts"),
        };
        let executor = ["executor".to_string()];
        let cl = command_line(
            "apache/spark:4.2.0",
            &[],
            &executor,
            &env,
            &host,
            Some(&pod_host),
        )
        .expect("executor role");
        // The kubelet's hosts file comes after the pod's own options, so it wins.
        assert_eq!(
            &cl.args[..3],
            [
                "-Djdk.net.hosts.file=/pod/own",
                "-Djdk.net.hosts.file=/tmp/bed/hosts",
                "-Xms512m"
            ]
        );
        let after = |flag: &str| {
            let i = cl.args.iter().position(|a| a == flag).expect(flag);
            cl.args[i + 1].as_str()
        };
        assert_eq!(after("--hostname"), "pod-exec-3.default.pod");
        assert_eq!(after("--bind-address"), "127.0.0.1");
        assert_eq!(after("--podName"), "pod-exec-3");
        // Other commands are left as they are.
        let other = command_line(
            "apache/spark:4.2.0",
            &["sh".into()],
            &["-c".into(), "true".into()],
            &env,
            &host,
            Some(&pod_host),
        )
        .expect("plain command");
        assert_eq!(
            (other.program.as_str(), other.args),
            ("sh", vec!["-c".to_string(), "true".to_string()])
        );
    }

    #[test]
    fn pre_stop_hooks() {
        let exec = |cmd: &[&str]| LifecycleHandler {
            exec: Some(k8s_openapi::api::core::v1::ExecAction {
                command: Some(cmd.iter().map(ToString::to_string).collect()),
            }),
            ..LifecycleHandler::default()
        };
        let spark = "apache/spark:4.2.0";
        assert_eq!(pre_stop(spark, None), PreStop::None);
        assert_eq!(
            pre_stop(spark, Some(&exec(&["/opt/decom.sh"]))),
            PreStop::SparkDecom
        );
        // Only the image's own script is modelled; another script or image runs as given.
        assert_eq!(
            pre_stop(spark, Some(&exec(&["/opt/x.sh"]))),
            PreStop::Exec(vec!["/opt/x.sh".into()])
        );
        assert_eq!(
            pre_stop("busybox", Some(&exec(&["/opt/decom.sh"]))),
            PreStop::Exec(vec!["/opt/decom.sh".into()])
        );
        assert_eq!(
            pre_stop(spark, Some(&exec(&["sh", "-c", "echo $(A)"]))),
            PreStop::Exec(vec!["sh".into(), "-c".into(), "echo $(A)".into()])
        );
        assert!(matches!(
            pre_stop(spark, Some(&exec(&[]))),
            PreStop::Unsupported(_)
        ));
        let http = LifecycleHandler {
            http_get: Some(k8s_openapi::api::core::v1::HTTPGetAction::default()),
            ..LifecycleHandler::default()
        };
        assert!(
            matches!(pre_stop(spark, Some(&http)), PreStop::Unsupported(w) if w.contains("httpGet"))
        );
        assert!(matches!(
            pre_stop(spark, Some(&LifecycleHandler::default())),
            PreStop::Unsupported(_)
        ));
    }

    #[test]
    fn a_hook_uses_up_the_grace_period_but_leaves_two_seconds_after_it() {
        let s = Duration::from_secs;
        // Deleted at 0 with 30 s of grace: a hook done at 5 s leaves SIGKILL at 30 s.
        assert_eq!(kill_deadline_after_hook(s(30), s(5)), s(30));
        // A hook that used (nearly) all of it, or timed out: 2 s after the SIGTERM.
        assert_eq!(kill_deadline_after_hook(s(30), s(29)), s(31));
        assert_eq!(kill_deadline_after_hook(s(30), s(30)), s(32));
    }
}
