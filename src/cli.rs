//! The `stoker apps`, `stoker queues` and `stoker executors` commands: tables from a running
//! server.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::ClientArgs;
use crate::proto::v1 as pb;
use crate::proto::v1::executor_allocator_client::ExecutorAllocatorClient;

fn token(args: &ClientArgs) -> anyhow::Result<String> {
    if let Some(token) = &args.token {
        return Ok(token.clone());
    }
    let dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/tmp/stoker"));
    // Read only from a directory no other user can write to: there, someone else could have
    // put a token of their own (see crate::secret).
    crate::secret::read_secret(&dir, "admin-token").with_context(|| {
        format!(
            "no --token given and cannot use {}; pass --token or --work-dir",
            dir.join("admin-token").display()
        )
    })
}

async fn client(
    args: &ClientArgs,
) -> anyhow::Result<ExecutorAllocatorClient<tonic::transport::Channel>> {
    let endpoint = endpoint(args)?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to stoker at {}", args.server))?;
    Ok(ExecutorAllocatorClient::new(channel))
}

/// The server's endpoint: plaintext for `http://`, TLS for `https://` (trusting --tls-ca, else
/// the system's trust store; presenting --tls-cert when given).
fn endpoint(args: &ClientArgs) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(args.server.clone())
        .with_context(|| format!("--server {:?} is not a URL", args.server))?;
    let tls_wanted =
        args.tls_ca.is_some() || args.tls_cert.is_some() || args.tls_server_name.is_some();
    match endpoint.uri().scheme_str() {
        Some("https") => {}
        Some("http") if !tls_wanted => return Ok(endpoint),
        Some("http") => bail!(
            "--tls-ca, --tls-cert and --tls-server-name need an https:// --server, not {}",
            args.server
        ),
        _ => bail!(
            "--server {} must start with http:// or https://",
            args.server
        ),
    }
    let mut tls = ClientTlsConfig::new();
    tls = match &args.tls_ca {
        Some(path) => tls.ca_certificate(Certificate::from_pem(read_pem(path, "--tls-ca")?)),
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        tls = tls.identity(Identity::from_pem(
            read_pem(cert, "--tls-cert")?,
            read_pem(key, "--tls-key")?,
        ));
    }
    if let Some(name) = &args.tls_server_name {
        tls = tls.domain_name(name.clone());
    }
    endpoint
        .tls_config(tls)
        .context("cannot configure TLS for the server connection")
}

fn read_pem(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
}

fn status_error(status: tonic::Status, what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} ({:?})", status.message(), status.code())
}

/// A request with the caller's Kubernetes token (`--bearer-token-file`), if it has one.
fn with_bearer<T>(args: &ClientArgs, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(path) = &args.bearer_token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("--bearer-token-file: cannot read {}", path.display()))?;
        let value = format!("Bearer {}", token.trim())
            .parse()
            .with_context(|| format!("--bearer-token-file: {} holds no token", path.display()))?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// The admin (or application) token, unless a Kubernetes token stands in for it.
fn token_or_bearer(args: &ClientArgs) -> anyhow::Result<String> {
    if args.bearer_token_file.is_some() && args.token.is_none() {
        return Ok(String::new());
    }
    token(args)
}

/// `stoker apps`.
pub async fn apps(args: ClientArgs) -> anyhow::Result<String> {
    let admin_token = token_or_bearer(&args)?;
    let mut client = client(&args).await?;
    let response = client
        .list_applications(with_bearer(
            &args,
            pb::ListApplicationsRequest { admin_token },
        )?)
        .await
        .map_err(|s| status_error(s, "cannot list applications"))?
        .into_inner();
    Ok(apps_table(&response.applications))
}

/// Renders the application table.
pub fn apps_table(apps: &[pb::ApplicationInfo]) -> String {
    let mut rows = vec![[
        "APP".to_owned(),
        "NAME".to_owned(),
        "USER".to_owned(),
        "PHASE".to_owned(),
        "TARGET".to_owned(),
        "PENDING".to_owned(),
        "RUNNING".to_owned(),
        "EXITED".to_owned(),
        "FAILURES".to_owned(),
        "LEASE".to_owned(),
        "QUEUE".to_owned(),
        "ADMITTED".to_owned(),
    ]];
    for app in apps {
        let target: i64 = app.targets.iter().map(|t| t.total).sum();
        rows.push([
            app.app_id.clone(),
            app.app_name.clone(),
            app.spark_user.clone(),
            app.phase.clone(),
            target.to_string(),
            app.pending.to_string(),
            app.running.to_string(),
            app.exited.to_string(),
            app.failures.to_string(),
            format!("{:.1}s", app.lease_remaining_ms as f64 / 1000.0),
            app.queue.clone().unwrap_or_else(|| "-".to_owned()),
            app.admitted
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        ]);
    }
    table(&rows)
}

/// `stoker queues`.
pub async fn queues(args: ClientArgs) -> anyhow::Result<String> {
    let admin_token = token_or_bearer(&args)?;
    let mut client = client(&args).await?;
    let response = client
        .list_queues(with_bearer(&args, pb::ListQueuesRequest { admin_token })?)
        .await
        .map_err(|s| status_error(s, "cannot list queues"))?
        .into_inner();
    Ok(queues_table(&response))
}

/// Renders the queue table (executors), with the capacity and any refused reload below it.
pub fn queues_table(response: &pb::ListQueuesResponse) -> String {
    if !response.enabled {
        return "no fair share: the server runs without --queues, every request is admitted\n"
            .to_owned();
    }
    let mut rows = vec![[
        "QUEUE".to_owned(),
        "WEIGHT".to_owned(),
        "GUARANTEED".to_owned(),
        "MAX".to_owned(),
        "ADMITTED".to_owned(),
        "RUNNING".to_owned(),
        "PENDING".to_owned(),
        "REQUESTED".to_owned(),
        "APPLICATIONS".to_owned(),
    ]];
    for q in &response.queues {
        rows.push([
            q.name.clone(),
            q.weight.to_string(),
            q.guaranteed.clone(),
            q.max.clone(),
            q.admitted.to_string(),
            q.running.to_string(),
            q.pending.to_string(),
            q.requested.to_string(),
            q.applications.to_string(),
        ]);
    }
    let mut out = table(&rows);
    let _ = writeln!(out, "capacity: {}", response.capacity);
    if !response.config_error.is_empty() {
        let _ = writeln!(
            out,
            "the queue file's last change was refused (the previous one is in force): {}",
            response.config_error
        );
    }
    out
}

/// `stoker executors <app>`.
pub async fn executors(app_id: String, args: ClientArgs) -> anyhow::Result<String> {
    let token = token_or_bearer(&args)?;
    let mut client = client(&args).await?;
    let info = client
        .get_application(with_bearer(
            &args,
            pb::GetApplicationRequest {
                app_id: app_id.clone(),
                token,
            },
        )?)
        .await
        .map_err(|s| status_error(s, &format!("cannot get application {app_id}")))?
        .into_inner();
    if info.app_id != app_id {
        bail!("server answered for {} instead of {app_id}", info.app_id);
    }
    Ok(executors_table(&info))
}

/// Renders the executor table.
pub fn executors_table(info: &pb::ApplicationInfo) -> String {
    let mut rows = vec![[
        "EXECUTOR".to_owned(),
        "PROFILE".to_owned(),
        "STATE".to_owned(),
        "HOST".to_owned(),
        "BACKEND".to_owned(),
        "DELETING".to_owned(),
        "MEMORY".to_owned(),
    ]];
    for e in &info.executors {
        let state = pb::ExecutorState::try_from(e.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("EXECUTOR_STATE_")
                    .to_owned()
            })
            .unwrap_or_else(|_| e.state.to_string());
        rows.push([
            e.executor_id.clone(),
            e.resource_profile_id.to_string(),
            state,
            e.host.clone(),
            e.backend_name.clone(),
            if e.deleting { "yes" } else { "" }.to_owned(),
            memory(e.heap_mib, e.overhead_mib),
        ]);
    }
    let mut out = table(&rows);
    for size in &info.sizes {
        let _ = writeln!(
            out,
            "profile {}: new executors get {}{}",
            size.resource_profile_id,
            memory(size.heap_mib, size.overhead_mib),
            match info.resizes {
                0 => String::new(),
                n => format!(" ({n} resize(s) of this application so far)"),
            }
        );
    }
    out
}

/// `1536m heap + 640m overhead`, or empty when unknown.
fn memory(heap_mib: u64, overhead_mib: u64) -> String {
    if heap_mib == 0 {
        return String::new();
    }
    format!("{heap_mib}m heap + {overhead_mib}m overhead")
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                let _ = write!(line, "{cell}");
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
