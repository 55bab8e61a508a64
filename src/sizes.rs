//! Executor sizes remembered across runs (`spark.stoker.sizing.key`): the size a run of a key
//! ended with is where the next run of that key starts, so that runs after the first do not run
//! out of memory again.
//!
//! The sizes are one small text document, one line per key and resource profile: `v2 <key>
//! <profile> <configured heap> <configured overhead> <heap> <overhead> <unix ms> <refused>
//! <refused unix ms>`, tab-separated, where `<refused>` is the smallest total memory in MiB the
//! backend refused to start for the key (a LimitRange's maximum) and `<refused unix ms>` when a
//! run learnt it, both 0 for none; `v1` lines (without them) are still read. A refusal is
//! forgotten [`REFUSED_MAX_AGE_MS`] after it was learnt (runs that never try the size do not
//! renew it), so that a raised LimitRange is found again. Where it is kept is a [`Medium`]:
//!
//! * the local backend: one file in its work directory (`sizes.tsv`, [`SizesFile`]), rewritten
//!   whole through a temporary file and a rename;
//! * the Kubernetes backend: one ConfigMap in stoker's own namespace
//!   (`stoker_k8s::sizes_configmap`), read at start and written by the leader with optimistic
//!   concurrency.
//!
//! Both share the policy here: [`decode`], [`merge`], [`bound`] and [`encode`] are pure. The
//! document is bounded (`max_entries` lines and the medium's byte limit, the least recently
//! written dropped first); of a key written by two runs, the later run's entries are kept.
//!
//! Nothing in it is trusted: a malformed line, an entry whose profile is now configured
//! differently, an entry older than [`MAX_AGE_MS`], smaller than the configured size or above
//! the ceiling is ignored with a warning, never fatal.
//!
//! Recalled when an application registers and remembered when it unregisters, from the
//! caller's thread: the file is small and read or written at once; the ConfigMap store answers
//! from its copy and writes in the background.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use stoker_core::{ExecutorSize, ProfileId, Refused, ResourceProfile};
use stoker_k8s::sizes_configmap::{SizesConfigMap, Update};

use crate::config::Limits;

/// Entries older than this (30 days) are stale.
pub const MAX_AGE_MS: i64 = 30 * 24 * 3_600_000;

/// A refused size is tried again this long (7 days) after a run learnt it.
pub const REFUSED_MAX_AGE_MS: i64 = 7 * 24 * 3_600_000;

const VERSION: &str = "v2";

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    key: String,
    profile: ProfileId,
    configured: ExecutorSize,
    size: ExecutorSize,
    unix_ms: i64,
    /// The smallest total memory the backend refused to start, and when a run learnt it.
    refused: Option<Refused>,
}
impl Entry {
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split('\t').collect();
        let (version, rest) = fields.split_first()?;
        let (fields, refused, refused_unix_ms) = match (*version, rest) {
            ("v1", fields) if fields.len() == 7 => (fields, "0", "0"),
            (VERSION, [fields @ .., refused, since]) if fields.len() == 7 => {
                (fields, *refused, *since)
            }
            _ => return None,
        };
        let [key, profile, conf_heap, conf_overhead, heap, overhead, unix_ms] = fields else {
            return None;
        };
        if key.is_empty() {
            return None;
        }
        let refused_mib: u64 = refused.parse().ok()?;
        let refused_unix_ms: i64 = refused_unix_ms.parse().ok()?;
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
            refused: (refused_mib > 0).then_some(Refused {
                total_mib: refused_mib,
                since_unix_ms: Some(refused_unix_ms),
            }),
        })
    }

    fn line(&self) -> String {
        format!(
            "{VERSION}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            self.key,
            self.profile,
            self.configured.heap_mib,
            self.configured.overhead_mib,
            self.size.heap_mib,
            self.size.overhead_mib,
            self.unix_ms,
            self.refused.map_or(0, |r| r.total_mib),
            self.refused.and_then(|r| r.since_unix_ms).unwrap_or(0)
        )
    }
}

/// Whether a sizing key can be stored: 1..=253 printable characters without tabs.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 253 && !key.chars().any(char::is_control)
}

/// The entries of a document, and how many of its lines are malformed.
fn decode(document: Option<&str>) -> (Vec<Entry>, usize) {
    let mut malformed = 0;
    let entries = document
        .unwrap_or_default()
        .lines()
        .filter(|line| !line.is_empty())
        .filter_map(|line| {
            let entry = Entry::parse(line);
            malformed += usize::from(entry.is_none());
            entry
        })
        .collect();
    (entries, malformed)
}

/// `stored` with `key`'s entries replaced by `ours`, the entries of one run written at
/// `unix_ms`, unless `stored` holds a later run of the key (another writer's), which stays.
fn merge(mut stored: Vec<Entry>, key: &str, ours: &[Entry], unix_ms: i64) -> Vec<Entry> {
    if stored.iter().any(|e| e.key == key && e.unix_ms > unix_ms) {
        return stored;
    }
    stored.retain(|e| e.key != key);
    stored.extend(ours.iter().cloned());
    stored
}

/// The most recently written entries, at most `max_entries` of them and `max_bytes` encoded.
fn bound(mut entries: Vec<Entry>, max_entries: usize, max_bytes: usize) -> Vec<Entry> {
    // Most recent first; ties in a fixed order, so that every writer keeps the same ones.
    entries.sort_by(|a, b| {
        b.unix_ms
            .cmp(&a.unix_ms)
            .then_with(|| a.key.cmp(&b.key))
            .then_with(|| a.profile.cmp(&b.profile))
    });
    let mut bytes = 0usize;
    let kept = entries
        .iter()
        .take(max_entries)
        .take_while(|e| {
            bytes = bytes.saturating_add(e.line().len());
            bytes <= max_bytes
        })
        .count();
    entries.truncate(kept);
    entries
}

/// The document of `entries`.
fn encode(entries: &[Entry]) -> String {
    entries.iter().map(Entry::line).collect()
}

/// Where the document of remembered sizes is kept.
pub trait Medium: Send + Sync + fmt::Debug {
    /// Where, for messages.
    fn describe(&self) -> String;
    /// The largest document it holds, in bytes.
    fn max_bytes(&self) -> usize;
    /// The document (`None`: none yet).
    fn read(&self) -> std::io::Result<Option<String>>;
    /// Replaces the document by `update` of it.
    fn update(&self, update: Update) -> std::io::Result<()>;
}

/// A [`Medium`] shared by the server's settings; two are equal when they are the same one.
#[derive(Clone, Debug)]
pub struct SharedMedium(pub Arc<dyn Medium>);

impl PartialEq for SharedMedium {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedMedium {}

/// The local backend's file of remembered sizes.
#[derive(Debug)]
pub struct SizesFile {
    path: PathBuf,
    /// Serialises read-modify-write of the file between applications.
    lock: Mutex<()>,
}

impl SizesFile {
    /// The file at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
        }
    }

    fn read_now(&self) -> std::io::Result<Option<String>> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(Some(text)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }
}

impl Medium for SizesFile {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn max_bytes(&self) -> usize {
        usize::MAX
    }

    fn read(&self) -> std::io::Result<Option<String>> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.read_now()
    }

    fn update(&self, update: Update) -> std::io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        // An unreadable file is replaced, as a malformed one is.
        let document = update(self.read_now().ok().flatten().as_deref());
        let tmp = self.path.with_extension("tsv.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(document.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

impl Medium for SizesConfigMap {
    fn describe(&self) -> String {
        SizesConfigMap::describe(self)
    }

    fn max_bytes(&self) -> usize {
        stoker_k8s::sizes_configmap::MAX_DOCUMENT_BYTES
    }

    fn read(&self) -> std::io::Result<Option<String>> {
        Ok(self.document())
    }

    fn update(&self, update: Update) -> std::io::Result<()> {
        SizesConfigMap::update(self, update);
        Ok(())
    }
}

/// What [`SizeStore::recall`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recalled {
    /// Sizes to start at, per profile.
    pub sizes: BTreeMap<ProfileId, ExecutorSize>,
    /// Per profile, the smallest total memory an earlier run could not start, and when.
    pub refused: BTreeMap<ProfileId, Refused>,
    /// Entries ignored, with why (for the driver and the log).
    pub warnings: Vec<String>,
}

/// The sizes remembered across runs, on a [`Medium`]. See the module documentation.
#[derive(Debug)]
pub struct SizeStore {
    medium: Arc<dyn Medium>,
    max_entries: usize,
}

impl SizeStore {
    /// A store in the file `path` keeping at most `max_entries` lines.
    pub fn new(path: PathBuf, max_entries: usize) -> Self {
        Self::on(Arc::new(SizesFile::new(path)), max_entries)
    }

    /// A store on `medium` keeping at most `max_entries` lines.
    pub fn on(medium: Arc<dyn Medium>, max_entries: usize) -> Self {
        Self {
            medium,
            max_entries,
        }
    }

    /// The store the server's limits name: the backend's medium, else the file; none when
    /// sizes are not remembered.
    pub fn from_limits(limits: &Limits) -> Option<Self> {
        if let Some(SharedMedium(medium)) = &limits.sizes_medium {
            return Some(Self::on(Arc::clone(medium), limits.max_remembered_sizes));
        }
        let path = limits.sizes_file.clone()?;
        Some(Self::new(path, limits.max_remembered_sizes))
    }

    /// The sizes remembered for `key` that still fit `profiles` and `ceiling_mib`.
    pub fn recall(
        &self,
        key: &str,
        profiles: &BTreeMap<ProfileId, ResourceProfile>,
        ceiling_mib: u64,
        now_unix_ms: i64,
    ) -> Recalled {
        let mut recalled = Recalled::default();
        let document = match self.medium.read() {
            Ok(document) => document,
            Err(err) => {
                recalled.warnings.push(format!(
                    "the sizes remembered in {} cannot be read: {err}",
                    self.medium.describe()
                ));
                None
            }
        };
        let (entries, malformed) = decode(document.as_deref());
        if malformed > 0 {
            recalled.warnings.push(format!(
                "{} has {malformed} malformed line(s); they are ignored",
                self.medium.describe()
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
            } else {
                if entry.size != configured {
                    recalled.sizes.insert(entry.profile, entry.size);
                }
                let Some(refused) = entry.refused else {
                    continue;
                };
                let learnt = refused.since_unix_ms.unwrap_or(entry.unix_ms);
                let why = if refused.total_mib <= total {
                    format!(
                        "{} MiB is not above the size to start at, {total} MiB",
                        refused.total_mib
                    )
                } else if now_unix_ms.saturating_sub(learnt) > REFUSED_MAX_AGE_MS {
                    "it was learnt more than 7 days ago; a bigger size will be tried again"
                        .to_owned()
                } else {
                    recalled.refused.insert(entry.profile, refused);
                    continue;
                };
                recalled.warnings.push(format!(
                    "the refused size remembered for spark.stoker.sizing.key {key:?}, profile \
                     {}, is ignored: {why}",
                    entry.profile
                ));
            }
        }
        recalled
    }

    /// Records the sizes a run of `key` ended with and the sizes the backend refused,
    /// replacing the key's earlier entries.
    pub fn remember(
        &self,
        key: &str,
        sizes: &BTreeMap<ProfileId, ExecutorSize>,
        refused: &BTreeMap<ProfileId, Refused>,
        profiles: &BTreeMap<ProfileId, ResourceProfile>,
        now_unix_ms: i64,
    ) -> std::io::Result<()> {
        let ours: Vec<Entry> = sizes
            .iter()
            .filter_map(|(&profile, &size)| {
                Some(Entry {
                    key: key.to_owned(),
                    profile,
                    configured: profiles.get(&profile).map(ExecutorSize::of)?,
                    size,
                    unix_ms: now_unix_ms,
                    // Learnt in this run: now.
                    refused: refused.get(&profile).map(|r| Refused {
                        total_mib: r.total_mib,
                        since_unix_ms: Some(r.since_unix_ms.unwrap_or(now_unix_ms)),
                    }),
                })
            })
            .collect();
        let (key, max_entries, max_bytes) =
            (key.to_owned(), self.max_entries, self.medium.max_bytes());
        // Applied to whatever the medium holds when it writes (again, after a conflict).
        self.medium.update(Arc::new(move |stored| {
            let (entries, _) = decode(stored);
            let merged = merge(entries, &key, &ours, now_unix_ms);
            encode(&bound(merged, max_entries, max_bytes))
        }))
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
        s.remember("etl", &grown(), &BTreeMap::new(), &profiles(), 1)
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
        s.remember("etl", &grown(), &BTreeMap::new(), &profiles(), 1)
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
        s.remember("etl", &grown(), &BTreeMap::new(), &profiles(), 1)
            .expect("written");
        assert_eq!(
            s.recall("etl", &profiles(), 4_096, 2),
            Recalled {
                sizes: grown(),
                ..Recalled::default()
            }
        );
    }

    #[test]
    fn the_file_keeps_the_most_recent_entries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = store(&dir, 2);
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            s.remember(key, &grown(), &BTreeMap::new(), &profiles(), i as i64)
                .expect("written");
        }
        assert!(s.recall("a", &profiles(), 4_096, 3).sizes.is_empty());
        assert_eq!(s.recall("c", &profiles(), 4_096, 3).sizes, grown());
        let lines = std::fs::read_to_string(dir.path().join("sizes.tsv")).expect("read");
        assert_eq!(lines.lines().count(), 2);
    }

    fn entry(key: &str, profile: ProfileId, unix_ms: i64) -> Entry {
        Entry {
            key: key.to_owned(),
            profile,
            configured: ExecutorSize {
                heap_mib: 512,
                overhead_mib: 384,
            },
            size: ExecutorSize {
                heap_mib: 512,
                overhead_mib: 576,
            },
            unix_ms,
            refused: None,
        }
    }

    #[test]
    fn a_document_decodes_to_what_was_encoded_and_counts_malformed_lines() {
        let mut capped = entry("etl", 1, 4);
        capped.refused = Some(Refused {
            total_mib: 2_112,
            since_unix_ms: Some(3),
        });
        let entries = vec![entry("nightly etl", 0, 5), capped];
        let document = encode(&entries);
        assert!(document.ends_with("\t4\t2112\t3\n"), "{document}");
        assert_eq!(decode(Some(&document)), (entries.clone(), 0));
        assert_eq!(decode(None), (Vec::new(), 0));
        // An unknown version, a v2 line without its refused size, a v1 line that does not parse.
        let damaged = format!(
            "{document}v3\tetl\t0\t1\t2\t3\t4\t5\t0\t0\nv2\tetl\t0\t1\t2\t3\t4\t5\t0\n\
             v1\tetl\tx\t1\t2\t3\t4\t5\n"
        );
        assert_eq!(decode(Some(&damaged)), (entries, 3));
        // A line an earlier stoker wrote (v1) is read, with no refused size.
        let v1 = "v1\tetl\t0\t512\t384\t768\t576\t7\n";
        let (read, malformed) = decode(Some(v1));
        assert_eq!(malformed, 0);
        assert_eq!(
            (read[0].size.heap_mib, read[0].unix_ms, read[0].refused),
            (768, 7, None)
        );
    }

    #[test]
    fn a_run_replaces_its_keys_entries_unless_a_later_run_wrote_them() {
        let stored = vec![
            entry("etl", 0, 10),
            entry("etl", 1, 10),
            entry("other", 0, 3),
        ];
        let ours = [entry("etl", 0, 20)];
        let merged = merge(stored.clone(), "etl", &ours, 20);
        assert_eq!(merged, vec![entry("other", 0, 3), entry("etl", 0, 20)]);
        // Another writer recorded a later run of the key: its entries stay, ours are dropped.
        let later = vec![entry("etl", 0, 30), entry("other", 0, 3)];
        assert_eq!(merge(later.clone(), "etl", &ours, 20), later);
        // Applying the same update twice (the local copy, then the stored document) is the
        // same as once.
        assert_eq!(merge(merged.clone(), "etl", &ours, 20), merged);
    }

    #[test]
    fn bounds_keep_the_most_recent_entries_within_count_and_bytes() {
        let entries: Vec<Entry> = (0..10).map(|i| entry(&format!("k{i}"), 0, i)).collect();
        let kept = bound(entries.clone(), 3, usize::MAX);
        assert_eq!(
            kept.iter().map(|e| e.unix_ms).collect::<Vec<_>>(),
            [9, 8, 7]
        );
        let line = entries[0].line().len();
        let kept = bound(entries.clone(), 100, 4 * line + 1);
        assert_eq!(kept.len(), 4);
        assert!(encode(&kept).len() <= 4 * line + 1);
        assert!(bound(entries, 100, line - 1).is_empty());
        // A ConfigMap's worth of the longest keys stays under the limit.
        let long: Vec<Entry> = (0..5_000)
            .map(|i| entry(&format!("{i:0>253}"), 0, i))
            .collect();
        let max = stoker_k8s::sizes_configmap::MAX_DOCUMENT_BYTES;
        let kept = bound(long, 100_000, max);
        assert!(
            encode(&kept).len() <= max && kept.len() > 3_000,
            "{}",
            kept.len()
        );
    }

    #[test]
    fn ties_are_kept_in_the_same_order_whatever_the_input_order() {
        let a = vec![entry("b", 0, 1), entry("a", 1, 1), entry("a", 0, 1)];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(bound(a, 2, usize::MAX), bound(b, 2, usize::MAX));
    }

    /// A medium that keeps the document in memory, as the ConfigMap store's copy does.
    #[derive(Debug, Default)]
    struct InMemory(Mutex<Option<String>>);

    impl Medium for InMemory {
        fn describe(&self) -> String {
            "memory".to_owned()
        }
        fn max_bytes(&self) -> usize {
            // Two entries of one-letter keys (27 bytes each).
            60
        }
        fn read(&self) -> std::io::Result<Option<String>> {
            Ok(self
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone())
        }
        fn update(&self, update: Update) -> std::io::Result<()> {
            let mut document = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            *document = Some(update(document.as_deref()));
            Ok(())
        }
    }

    #[test]
    fn any_medium_shares_the_policy_and_its_byte_bound() {
        let medium = Arc::new(InMemory::default());
        let s = SizeStore::on(Arc::clone(&medium) as Arc<dyn Medium>, 1_000);
        for (i, key) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            s.remember(key, &grown(), &BTreeMap::new(), &profiles(), i as i64)
                .expect("written");
        }
        let document = medium.read().expect("read").unwrap_or_default();
        assert_eq!(document.lines().count(), 2, "{document}");
        assert_eq!(s.recall("e", &profiles(), 4_096, 5).sizes, grown());
        assert!(s.recall("a", &profiles(), 4_096, 5).sizes.is_empty());
        // Garbage written by someone else is a warning, and is replaced at the next write.
        *medium.0.lock().unwrap_or_else(PoisonError::into_inner) = Some("{not: tsv}".to_owned());
        let recalled = s.recall("e", &profiles(), 4_096, 5);
        assert!(recalled.sizes.is_empty());
        assert!(
            recalled.warnings[0].starts_with("memory has 1 malformed"),
            "{recalled:?}"
        );
        s.remember("e", &grown(), &BTreeMap::new(), &profiles(), 6)
            .expect("written");
        assert_eq!(
            s.recall("e", &profiles(), 4_096, 7),
            Recalled {
                sizes: grown(),
                ..Recalled::default()
            }
        );
    }

    #[test]
    fn a_refused_size_is_remembered_with_when_it_was_learnt_and_forgotten_after_a_week() {
        let dir = tempfile::tempdir().expect("temp dir");
        let s = store(&dir, 10);
        let learnt_now = |total_mib| -> BTreeMap<ProfileId, Refused> {
            [(
                0,
                Refused {
                    total_mib,
                    since_unix_ms: None,
                },
            )]
            .into()
        };
        let learnt_at = |total_mib, at| Refused {
            total_mib,
            since_unix_ms: Some(at),
        };
        // Profile 0 ended at its configured size after the backend refused 1344 MiB (at 1).
        let configured: BTreeMap<ProfileId, ExecutorSize> =
            [(0, ExecutorSize::of(&profiles()[&0]))].into();
        s.remember("etl", &configured, &learnt_now(1_344), &profiles(), 1)
            .expect("written");
        let recalled = s.recall("etl", &profiles(), 4_096, 2);
        assert!(
            recalled.sizes.is_empty(),
            "the configured size: nothing to start at"
        );
        assert_eq!(recalled.refused, [(0, learnt_at(1_344, 1))].into());
        assert!(recalled.warnings.is_empty(), "{recalled:?}");
        // A later run that carries the refusal on keeps when it was learnt: a week after that
        // it is forgotten, though the entry is newer.
        s.remember("etl", &configured, &recalled.refused, &profiles(), 5)
            .expect("written");
        let week_later = s.recall("etl", &profiles(), 4_096, 2 + REFUSED_MAX_AGE_MS);
        assert!(week_later.refused.is_empty(), "{week_later:?}");
        assert!(
            week_later.warnings[0].contains("learnt more than 7 days ago"),
            "{week_later:?}"
        );
        // A refused size not above the size to start at cannot be true: ignored, said why.
        s.remember("etl", &grown(), &learnt_now(1_344), &profiles(), 6)
            .expect("written");
        let recalled = s.recall("etl", &profiles(), 4_096, 7);
        assert_eq!(recalled.sizes, grown());
        assert!(recalled.refused.is_empty());
        assert!(
            recalled.warnings[0].contains("1344 MiB is not above the size to start at, 1344 MiB"),
            "{recalled:?}"
        );
    }

    #[test]
    fn keys_with_control_characters_are_not_stored() {
        assert!(valid_key("nightly etl"));
        assert!(!valid_key(""));
        assert!(!valid_key("a\tb"));
        assert!(!valid_key(&"k".repeat(254)));
    }
}
