//! The server's clock: monotonic milliseconds for the engine, Unix time for people.

use std::time::{SystemTime, UNIX_EPOCH};

use stoker_core::Millis;
use tokio::time::Instant;

/// Monotonic milliseconds since the server started, with the Unix time of that start.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
    start_unix_ms: i64,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        let start_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self {
            start: Instant::now(),
            start_unix_ms,
        }
    }

    /// Milliseconds since start.
    pub fn now(&self) -> Millis {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The Unix time (ms) of a monotonic instant.
    pub fn unix_ms(&self, at: Millis) -> i64 {
        self.start_unix_ms
            .saturating_add(i64::try_from(at).unwrap_or(i64::MAX))
    }

    /// The tokio instant of a monotonic instant.
    pub fn instant(&self, at: Millis) -> Instant {
        self.start + std::time::Duration::from_millis(at)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
