//! Executor sizes remembered across runs (`spark.stoker.sizing.key`): the size a run of a key
//! ended with is where the next run of that key starts, so that runs after the first do not run
//! out of memory again.
//!
//! The local backend keeps them in one file in its work directory (`sizes.tsv`), one line per
//! key and resource profile: `v1 <key> <profile> <configured heap> <configured overhead> <heap>
//! <overhead> <unix ms>`, tab-separated. The file is bounded (`max_entries` lines, the least
//! recently written dropped first) and rewritten whole through a temporary file and a rename.
//!
//! Nothing in it is trusted: a malformed line, an entry whose profile is now configured
//! differently, an entry older than [`MAX_AGE_MS`], smaller than the configured size or above
//! the ceiling is ignored with a warning, never fatal.
//!
//! The file is small (at most `max_entries` short lines) and read or written only when an
//! application registers or unregisters, from the caller's thread.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;

use stoker_core::{ExecutorSize, ProfileId, ResourceProfile};

/// Entries older than this (30 days) are stale.
pub const MAX_AGE_MS: i64 = 30 * 24 * 3_600_000;

const VERSION: &str = "v1";

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    key: String,
    profile: ProfileId,
    configured: ExecutorSize,
    size: ExecutorSize,
    unix_ms: i64,
}

impl Entry {
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split('\t').collect();
        let [version, key, profile, conf_heap, conf_overhead, heap, overhead, unix_ms] =
            fields.as_slice()
        else {
            return None;
        };
        if *version != VERSION || key.is_empty() {
            return None;
        }
        Some(Self {
            key: (*key).to_owned(),
            profile: profile.parse().ok()?,
            configured: ExecutorSize {
                heap_mib: conf_heap.parse().ok()?,
                overhead_mib: conf_overhead.parse().ok()?,
            },
            size: ExecutorSize {
                heap_mib: heap.parse().ok()?,
                overhead_mib: overhead.parse().ok()?,
            },
            unix_ms: unix_ms.parse().ok()?,
        })
    }

    fn line(&self) -> String {
        format!(
            "{VERSION}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            self.key,
            self.profile,
            self.configured.heap_mib,
            self.configured.overhead_mib,
            self.size.heap_mib,
            self.size.overhead_mib,
            self.unix_ms
        )
    }
}

/// Whether a sizing key can be stored: 1..=253 printable characters without tabs.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 253 && !key.chars().any(char::is_control)
}

/// What [`SizeStore::recall`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recalled {
    /// Sizes to start at, per profile.
    pub sizes: BTreeMap<ProfileId, ExecutorSize>,
    /// Entries ignored, with why (for the driver and the log).
    pub warnings: Vec<String>,
}

/// The file of remembered sizes. See the module documentation.
#[derive(Debug)]
pub struct SizeStore {
    path: PathBuf,
    max_entries: usize,
    /// Serialises read-modify-write of the file between applications.
    lock: Mutex<()>,
}

impl SizeStore {
    /// A store in `path` keeping at most `max_entries` lines.
    pub fn new(path: PathBuf, max_entries: usize) -> Self {
        Self {
            path,
            max_entries,
            lock: Mutex::new(()),
        }
    }

    fn read(&self) -> (Vec<Entry>, usize) {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return (Vec::new(), 0);
        };
        let mut malformed = 0;
        let entries = text
            .lines()
            .filter_map(|line| {
                let entry = Entry::parse(line);
                malformed += usize::from(entry.is_none());
                entry
            })
            .collect();
        (entries, malformed)
    }

    /// The sizes remembered for `key` that still fit `profiles` and `ceiling_mib`.
    pub fn recall(
        &self,
        key: &str,
        profiles: &BTreeMap<ProfileId, ResourceProfile>,
        ceiling_mib: u64,
        now_unix_ms: i64,
    ) -> Recalled {
        let _guard = self.lock.lock();
        let (entries, malformed) = self.read();
        let mut recalled = Recalled::default();
        if malformed > 0 {
            recalled.warnings.push(format!(
                "{} has {malformed} malformed line(s); they are ignored",
                self.path.display()
            ));
        }
        for entry in entries.into_iter().filter(|e| e.key == key) {
            let Some(profile) = profiles.get(&entry.profile) else {
                continue;
            };
            let configured = ExecutorSize::of(profile);
            let fixed = profile.off_heap_mib.saturating_add(profile.pyspark_mib);
            let total = entry
                .size
                .heap_mib
                .saturating_add(entry.size.overhead_mib)
                .saturating_add(fixed);
            let ignored = |why: String| {
                format!(
                    "the size remembered for spark.stoker.sizing.key {key:?}, profile {}, is \
                     ignored: {why}",
                    entry.profile
                )
            };
            if entry.configured != configured {
                recalled.warnings.push(ignored(format!(
                    "it was learnt with {} MiB heap + {} MiB overhead configured, now {} + {}",
                    entry.configured.heap_mib,
                    entry.configured.overhead_mib,
                    configured.heap_mib,
                    configured.overhead_mib
                )));
            } else if now_unix_ms.saturating_sub(entry.unix_ms) > MAX_AGE_MS {
                recalled
                    .warnings
                    .push(ignored("it is more than 30 days old".to_owned()));
            } else if entry.size.heap_mib < configured.heap_mib
                || entry.size.overhead_mib < configured.overhead_mib
            {
                recalled
                    .warnings
                    .push(ignored("it is smaller than the configured size".to_owned()));
            } else if total > ceiling_mib {
                recalled.warnings.push(ignored(format!(
                    "{total} MiB is above the ceiling of {ceiling_mib} MiB"
                )));
            } else if entry.size != configured {
                recalled.sizes.insert(entry.profile, entry.size);
            }
        }
        recalled
    }

    /// Records the sizes a run of `key` ended with, replacing the key's earlier entries.
    pub fn remember(
        &self,
        key: &str,
        sizes: &BTreeMap<ProfileId, ExecutorSize>,
        profiles: &BTreeMap<ProfileId, ResourceProfile>,
        now_unix_ms: i64,
    ) -> std::io::Result<()> {
        let _guard = self.lock.lock();
        let (mut entries, _) = self.read();
        entries.retain(|e| e.key != key);
        for (&profile, &size) in sizes {
            let Some(configured) = profiles.get(&profile).map(ExecutorSize::of) else {
                continue;
            };
            entries.push(Entry {
                key: key.to_owned(),
                profile,
                configured,
                size,
                unix_ms: now_unix_ms,
            });
        }
        // Bounded: the most recently written entries stay.
        entries.sort_by_key(|e| std::cmp::Reverse(e.unix_ms));
        entries.truncate(self.max_entries);
        let tmp = self.path.with_extension("tsv.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        for entry in &entries {
            file.write_all(entry.line().as_bytes())?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profiles() -> BTreeMap<ProfileId, ResourceProfile> {
        let profile = ResourceProfile {
            id: 0,
            cores: 1,
            heap_mib: 512,
            overhead_mib: 384,
            ..ResourceProfile::default()
        };
        [(0, profile)].into()
    }

    fn grown() -> BTreeMap<ProfileId, ExecutorSize> {
        [(
            0,
            ExecutorSize {
                heap_mib: 768,
                overhead_mib: 576,
            },
        )]
        .into()
    }

    fn store(dir: &tempfile::TempDir, max_entries: usize) -> SizeStore {
        SizeStore::new(dir.path().join("sizes.tsv"), max_entries)
    }

    #[test]
    fn the_next_run_of_a_key_starts_at_the_size_the_last_one_ended_with() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = store(&dir, 10);
        assert_eq!(s.recall("etl", &profiles(), 4_096, 1), Recalled::default());
        s.remember("etl", &grown(), &profiles(), 1)
            .expect("written");
        let recalled = s.recall("etl", &profiles(), 4_096, 2);
        assert_eq!(recalled.sizes, grown());
        assert!(recalled.warnings.is_empty());
        assert!(s.recall("other", &profiles(), 4_096, 2).sizes.is_empty());
    }

    #[test]
    fn stale_or_wrong_entries_are_ignored_with_a_warning() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = store(&dir, 10);
        s.remember("etl", &grown(), &profiles(), 1)
            .expect("written");
        // The configuration changed.
        let mut changed = profiles();
        if let Some(p) = changed.get_mut(&0) {
            p.heap_mib = 1024;
        }
        let recalled = s.recall("etl", &changed, 8_192, 2);
        assert!(recalled.sizes.is_empty());
        assert!(recalled.warnings[0].contains("configured"), "{recalled:?}");
        // Too old.
        let recalled = s.recall("etl", &profiles(), 8_192, 2 + MAX_AGE_MS);
        assert!(recalled.sizes.is_empty());
        assert!(recalled.warnings[0].contains("30 days"), "{recalled:?}");
        // Above today's ceiling.
        let recalled = s.recall("etl", &profiles(), 1_000, 2);
        assert!(recalled.sizes.is_empty());
        assert!(recalled.warnings[0].contains("ceiling"), "{recalled:?}");
    }

    #[test]
    fn a_corrupt_file_is_ignored_and_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = store(&dir, 10);
        std::fs::write(dir.path().join("sizes.tsv"), "garbage\nv1\tetl\tx\n").expect("write");
        let recalled = s.recall("etl", &profiles(), 4_096, 1);
        assert!(recalled.sizes.is_empty());
        assert!(recalled.warnings[0].contains("2 malformed"), "{recalled:?}");
        s.remember("etl", &grown(), &profiles(), 1)
            .expect("written");
        assert_eq!(
            s.recall("etl", &profiles(), 4_096, 2),
            Recalled {
                sizes: grown(),
                warnings: Vec::new()
            }
        );
    }

    #[test]
    fn the_file_keeps_the_most_recent_entries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = store(&dir, 2);
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            s.remember(key, &grown(), &profiles(), i as i64)
                .expect("written");
        }
        assert!(s.recall("a", &profiles(), 4_096, 3).sizes.is_empty());
        assert_eq!(s.recall("c", &profiles(), 4_096, 3).sizes, grown());
        let lines = std::fs::read_to_string(dir.path().join("sizes.tsv")).expect("read");
        assert_eq!(lines.lines().count(), 2);
    }

    #[test]
    fn keys_with_control_characters_are_not_stored() {
        assert!(valid_key("nightly etl"));
        assert!(!valid_key(""));
        assert!(!valid_key("a\tb"));
        assert!(!valid_key(&"k".repeat(254)));
    }
}
