//! Fair share in the server (`stoker serve --queues <file>`): the queue file, loaded at start and
//! read again every few seconds, and the allocator that admits executors to every application.
//!
//! # Flow
//!
//! * **The file.** Read at start: a file that cannot be read or refused by
//!   [`QueueConfig::parse`] stops stoker, naming the line. Then read again every
//!   `reload_interval`; a content that differs from the last one read (a ConfigMap volume
//!   updates by swapping a symlink, so the content is compared, not the modification time) is
//!   parsed: taken when valid, else logged with its line, counted in
//!   `stoker_queue_config_errors_total` and `stoker_queue_config_last_reload_success 0`, and the
//!   configuration in force stays. The same bad content is counted once.
//! * **The allocator.** One task. Each application's actor pokes it when what the allocation
//!   sees of the application changes (its targets, its executors, its executors' size, its
//!   phase), as do registrations, removals and reloads. The task waits `debounce` after a poke,
//!   then reads every application's published summary (no lock held across an await), runs
//!   [`allocate`] and sends each application its admitted counts ([`AppCommand::Admit`]); the
//!   engine creates executors only up to them and tells the driver once per change of message.
//!
//! # Guarantees
//!
//! * Without `--queues` nothing here runs and no engine gets an admission.
//! * With it, an application is admitted nothing until the allocation has seen it, so that no
//!   executor is created beyond what is admitted, even in the first milliseconds.
//! * At most one allocation per `debounce`, whatever the rate of changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use stoker_core::fairshare::{allocate, Allocation, AppDemand, QueueConfig, QueueName, Refusal};
use stoker_core::{AppId, ProfileId};
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info};

use crate::app::{AppCommand, Apps};
use crate::error::ApiError;
use crate::metrics::{Metrics, QueueLabel};

/// How the server runs the fair share.
#[derive(Clone, Debug)]
pub struct QueueSettings {
    /// The queue file.
    pub path: PathBuf,
    /// How often the file is read again.
    pub reload_interval: Duration,
    /// How long the allocator waits after a change before it allocates (changes in between
    /// are taken together).
    pub debounce: Duration,
}

/// Why the queue file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QueueFileError {
    /// It cannot be read.
    // The causes are part of the message (not `source`s), so that a log line that shows only
    // the message still names the line at fault.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// It is not a valid queue file.
    #[error("{}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its line.
        problem: stoker_core::fairshare::ConfigError,
    },
}

/// Reads and validates a queue file; its content is returned to compare later reads with.
pub fn load(path: &Path) -> Result<(QueueConfig, String), QueueFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| QueueFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    let config = QueueConfig::parse(&text).map_err(|problem| QueueFileError::Invalid {
        path: path.to_owned(),
        problem,
    })?;
    Ok((config, text))
}

/// What an application's queue is decided from, kept for the allocator (which decides again at
/// each allocation, so that a reloaded file's rules apply to running applications).
#[derive(Clone, Debug, Default)]
pub struct QueueInputs {
    /// Its namespace (empty on the local backend).
    pub namespace: String,
    /// The driver's authenticated user name.
    pub identity: Option<String>,
    /// `spark.stoker.queue`, if set.
    pub requested: Option<String>,
    /// `spark.dynamicAllocation.minExecutors` (0: none).
    pub min_executors: u32,
}

impl QueueInputs {
    /// The queue under `config`: the one asked for, or the one the rules map to when the one
    /// asked for is gone since (a reload).
    pub fn queue(&self, config: &QueueConfig) -> QueueName {
        let identity = self.identity.as_deref();
        stoker_core::fairshare::queue_for(
            config,
            &self.namespace,
            identity,
            self.requested.as_deref(),
        )
        .unwrap_or_else(|_| config.mapped_queue(&self.namespace, identity).clone())
    }
}

/// What `stoker queues` shows: the last allocation, per queue.
#[derive(Clone, Debug, Default)]
pub struct QueueReport {
    /// The allocation.
    pub allocation: Allocation,
    /// Executors created and not running yet, per queue.
    pub pending: BTreeMap<QueueName, u64>,
}

/// The fair share's state: the configuration in force and the allocator's wake-up.
pub struct Queues {
    settings: QueueSettings,
    config: watch::Sender<Arc<QueueConfig>>,
    /// The content last read, good or bad, and the error it had.
    last_read: RwLock<(String, Option<String>)>,
    wake: Notify,
    report: watch::Sender<Arc<QueueReport>>,
    metrics: Arc<Metrics>,
}

impl Queues {
    /// Loads the file; an error stops the server's start.
    pub fn load(settings: QueueSettings, metrics: Arc<Metrics>) -> Result<Self, QueueFileError> {
        let (config, text) = load(&settings.path)?;
        info!(path = %settings.path.display(), queues = config.queues().len(),
            capacity = %config.capacity(), "fair share: queue file loaded");
        metrics.queue_config_last_reload_success.set(1);
        Ok(Self {
            settings,
            config: watch::channel(Arc::new(config)).0,
            last_read: RwLock::new((text, None)),
            wake: Notify::new(),
            report: watch::channel(Arc::new(QueueReport::default())).0,
            metrics,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<QueueConfig> {
        Arc::clone(&self.config.borrow())
    }

    /// The configuration in force, and each new one.
    pub fn watch_config(&self) -> watch::Receiver<Arc<QueueConfig>> {
        self.config.subscribe()
    }

    /// The last reload's error, while an older configuration is in force.
    pub fn last_error(&self) -> Option<String> {
        self.last_read
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .clone()
    }

    /// The last allocation.
    pub fn report(&self) -> Arc<QueueReport> {
        Arc::clone(&self.report.borrow())
    }

    /// Asks for an allocation soon.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// The queue of a new application, or its refusal as the gRPC error that names the queue.
    pub fn admit(&self, inputs: &QueueInputs) -> Result<QueueName, ApiError> {
        let config = self.config();
        stoker_core::fairshare::queue_for(
            &config,
            &inputs.namespace,
            inputs.identity.as_deref(),
            inputs.requested.as_deref(),
        )
        .map_err(|refusal| match refusal {
            Refusal::UnknownQueue { .. } => ApiError::invalid(
                "queue",
                format!(
                    "{refusal}; the queues are: {}",
                    config
                        .queues()
                        .keys()
                        .map(QueueName::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Refusal::NotAllowed { .. } => ApiError::PermissionDenied(format!("queue: {refusal}")),
        })
    }

    /// Reads the file again: `Ok(true)` when a new configuration is in force, `Ok(false)` when
    /// the content is unchanged, an error (counted once per content) when it is refused.
    pub fn reload(&self) -> Result<bool, QueueFileError> {
        let text =
            std::fs::read_to_string(&self.settings.path).map_err(|error| QueueFileError::Read {
                path: self.settings.path.clone(),
                error,
            })?;
        let mut last = self
            .last_read
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.0 == text {
            // Unchanged; a refused content was counted and logged when it was read first.
            return Ok(false);
        }
        match QueueConfig::parse(&text) {
            Ok(config) => {
                *last = (text, None);
                drop(last);
                self.config.send_replace(Arc::new(config));
                self.metrics.queue_config_last_reload_success.set(1);
                self.poke();
                Ok(true)
            }
            Err(problem) => {
                *last = (text, Some(problem.to_string()));
                drop(last);
                self.metrics.queue_config_errors.inc();
                self.metrics.queue_config_last_reload_success.set(0);
                Err(QueueFileError::Invalid {
                    path: self.settings.path.clone(),
                    problem,
                })
            }
        }
    }
}

/// Reads the queue file every interval until `queues` is dropped or `shutdown` is set.
pub async fn reload_loop(queues: Weak<Queues>, mut shutdown: watch::Receiver<bool>) {
    let Some(interval) = queues.upgrade().map(|q| q.settings.reload_interval) else {
        return;
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    // A missing file is logged when it goes missing, not at every tick.
    let mut unreadable = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let Some(queues) = queues.upgrade() else {
            return;
        };
        let path = queues.settings.path.clone();
        // A small file, read off the async threads.
        let outcome = tokio::task::spawn_blocking(move || {
            let result = queues.reload();
            (queues, result)
        })
        .await;
        let Ok((queues, result)) = outcome else {
            error!("queue file reload task failed");
            continue;
        };
        match result {
            Ok(false) => unreadable = false,
            Ok(true) => {
                unreadable = false;
                let config = queues.config();
                info!(path = %path.display(), queues = config.queues().len(),
                    capacity = %config.capacity(), "fair share: queue file reloaded");
            }
            Err(err @ QueueFileError::Read { .. }) => {
                if !unreadable {
                    error!(error = %err, "queue file unreadable: the configuration in force stays");
                }
                unreadable = true;
            }
            Err(err) => {
                unreadable = false;
                error!(error = %err,
                    "queue file changed but is refused: the last good configuration stays in force");
            }
        }
    }
}

/// Allocates after every poke (at most once per debounce) until the server shuts down.
pub async fn allocate_loop(
    apps: Weak<Apps>,
    queues: Arc<Queues>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = queues.wake.notified() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        // Changes that arrive meanwhile are taken by this allocation (their poke, stored by
        // the Notify, costs one more run at most).
        tokio::time::sleep(queues.settings.debounce).await;
        let Some(apps) = apps.upgrade() else {
            return;
        };
        reallocate(&apps, &queues);
    }
}

/// One allocation over every application, sent to their actors.
pub fn reallocate(apps: &Apps, queues: &Queues) {
    let config = queues.config();
    let handles: Vec<_> = apps
        .registry
        .iter()
        .map(|entry| Arc::clone(entry.value()))
        .collect();
    let mut demands: BTreeMap<AppId, AppDemand> = BTreeMap::new();
    let mut pending: BTreeMap<QueueName, u64> = BTreeMap::new();
    let mut queue_of: BTreeMap<AppId, QueueName> = BTreeMap::new();
    for handle in &handles {
        let Some(inputs) = handle.queue_inputs() else {
            continue;
        };
        let summary = handle.summary.borrow();
        // An ending application's executors are being removed: it asks for nothing more.
        if summary.phase == stoker_core::AppPhase::Ending.as_str() {
            continue;
        }
        let queue = inputs.queue(&config);
        *pending.entry(queue.clone()).or_default() += u64::from(summary.pending);
        queue_of.insert(handle.app_id.clone(), queue.clone());
        demands.insert(
            handle.app_id.clone(),
            AppDemand {
                queue: Some(queue),
                min_executors: inputs.min_executors,
                profiles: summary.demand.clone(),
            },
        );
    }
    let allocation = allocate(Some(&config), &demands);
    for handle in &handles {
        let (Some(app), Some(queue)) = (
            allocation.apps.get(&handle.app_id),
            queue_of.get(&handle.app_id),
        ) else {
            continue;
        };
        let admitted: BTreeMap<ProfileId, u32> = app
            .profiles
            .iter()
            .map(|(&profile, p)| (profile, p.admitted))
            .collect();
        handle.send(AppCommand::Admit {
            admitted,
            message: app.message(),
            reclaim: (
                app.reclaim_reason(),
                app.profiles
                    .iter()
                    .map(|(&profile, p)| (profile, p.reclaim()))
                    .collect(),
            ),
            queue: queue.clone(),
        });
    }
    debug!(
        applications = demands.len(),
        queues = allocation.queues.len(),
        "fair share: allocated"
    );
    for (name, totals) in &allocation.queues {
        let label = QueueLabel {
            queue: name.to_string(),
        };
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        queues
            .metrics
            .queue_admitted
            .get_or_create(&label)
            .set(gauge(totals.admitted.executors));
        queues
            .metrics
            .queue_requested
            .get_or_create(&label)
            .set(gauge(totals.requested.executors));
        queues
            .metrics
            .queue_running
            .get_or_create(&label)
            .set(gauge(totals.running.executors));
    }
    queues.report.send_replace(Arc::new(QueueReport {
        allocation,
        pending,
    }));
}
