//! stoker's domain types and its sans-IO allocation engine.
//!
//! No I/O, no async runtime: the engine takes driver commands, backend observations and clock
//! ticks, and returns actions and events. Backends implement [`backend::ExecutorBackend`].

pub mod backend;
pub mod engine;
pub mod error;
pub mod fairshare;
pub mod sizing;
pub mod types;

pub use backend::{
    BackendObservation, ExecutorBackend, LaunchRequest, ObservationSink, RecoveredExecutor,
};
pub use engine::{
    Action, AppPhase, Engine, EngineConfig, Event, EventKind, Executor, ExecutorEvent, Observation,
    ReclaimRequest,
};
pub use error::{EngineError, InvalidInput};
pub use sizing::{
    ExecutorSize, MemoryCause, ProfileUsage, Refused, Resize, ResizePolicy, ResizeSettings, Sizing,
    StepDown, Verdict,
};
pub use types::{
    AppId, DriverIdentity, ExecutorId, ExecutorPhase, ExecutorTemplate, ExitInfo, ExitReason,
    KubernetesSettings, Millis, ProfileId, ResourceProfile, SparkPods, SparkProfilePod,
};
