//! A container's volume mounts as a folder tree: `<root>/<mountPath>` is a symlink to the
//! volume's local folder and the folders above it are real, so a program that walks up from a
//! mount path (Spark's `KubernetesLocalDiskShuffleDataIO` takes two parents of
//! `SPARK_LOCAL_DIRS` and lists `spark-*/*/blockmgr-*`) finds the same parents and siblings it
//! would find in a container.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::spec::PathMap;

/// A container path and the local path that stands in for it.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The container path (`mountPath`).
    pub path: String,
    /// The local file or folder (the volume's folder, `subPath` applied).
    pub local: PathBuf,
}

/// `/a/b/` as `a/b`; None for `/` and for paths that are not absolute or have `.`/`..` parts
/// (those are mapped directly, never linked).
fn relative(path: &str) -> Option<PathBuf> {
    let mut components = Path::new(path).components();
    if components.next() != Some(Component::RootDir) {
        return None;
    }
    let mut out = PathBuf::new();
    for c in components {
        match c {
            Component::Normal(part) => out.push(part),
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Why `link` cannot be placed in the tree at `root`, if it cannot: a folder above it is a
/// symlink or a file (another container's mount), or something other than a symlink to
/// `target` is already there.
fn conflict(root: &Path, rel: &Path, target: &Path) -> io::Result<Option<String>> {
    let mut at = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        let last = i + 1 == parts.len();
        match std::fs::symlink_metadata(&at) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
            Ok(md) if last => {
                if md.file_type().is_symlink() && std::fs::read_link(&at)? == target {
                    return Ok(None);
                }
                return Ok(Some(format!(
                    "{} exists and is not a link to {}",
                    at.display(),
                    target.display()
                )));
            }
            Ok(md) if md.file_type().is_symlink() || !md.is_dir() => {
                return Ok(Some(format!("{} is not a plain folder", at.display())));
            }
            Ok(_) => {}
        }
    }
    Ok(None)
}

/// The container's path map: `fixed` mappings (`/opt/spark`) are direct; each mount is a
/// symlink `<root>/<mountPath>` (created here, intermediate folders real) and its mount path
/// maps to that symlink. A mount under another mount's path or under a fixed mapping is mapped
/// directly to its local folder (a link there would land inside the other volume).
///
/// All of a container's links go in `shared_root` (one tree for the pod, as the containers of a
/// pod mounting the same volumes at the same paths share it) unless one of them conflicts with
/// what another container put there; then all go in `own_root`, a tree of this container alone.
/// Creating the links again for a restarted container finds them in place.
pub fn materialise(
    shared_root: &Path,
    own_root: &Path,
    fixed: &[Mapping],
    mounts: &[Mapping],
) -> io::Result<PathMap> {
    let mut paths = PathMap::default();
    for f in fixed {
        paths.add(&f.path, &f.local);
    }
    let all: Vec<Option<PathBuf>> = fixed
        .iter()
        .chain(mounts)
        .map(|m| relative(&m.path))
        .collect();
    let mut links: Vec<(&Mapping, PathBuf)> = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        let rel = match relative(&m.path) {
            Some(rel) => rel,
            None => {
                paths.add(&m.path, &m.local);
                continue;
            }
        };
        let me = fixed.len() + i;
        let nested = all.iter().enumerate().any(|(j, other)| {
            j != me
                && other
                    .as_ref()
                    .is_some_and(|o| rel.starts_with(o) && *o != rel)
        });
        if nested {
            paths.add(&m.path, &m.local);
        } else {
            links.push((m, rel));
        }
    }
    let mut root = shared_root;
    for (m, rel) in &links {
        if conflict(shared_root, rel, &m.local)?.is_some() {
            root = own_root;
            break;
        }
    }
    for (m, rel) in &links {
        if let Some(why) = conflict(root, rel, &m.local)? {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("cannot mount {} at {}: {why}", m.local.display(), m.path),
            ));
        }
        let link = root.join(rel);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(&m.local, &link)?;
        }
        paths.add(&m.path, &link);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "kubelet-mounts-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    fn m(path: &str, local: &Path) -> Mapping {
        Mapping {
            path: path.into(),
            local: local.to_path_buf(),
        }
    }

    #[test]
    fn mounts_become_links_under_real_parents() {
        let dir = scratch("tree");
        let (root, own) = (dir.join("root"), dir.join("own"));
        let vol = dir.join("pv");
        let conf = dir.join("conf");
        std::fs::create_dir_all(&vol).expect("vol");
        let spark = [m("/opt/spark", Path::new("/sh"))];
        let mounts = [
            m("/data/spark-x/executor-x/", &vol),
            m("/opt/spark/conf", &conf),
            m("/data/spark-x/executor-x/nested", &conf),
            m("/", &conf),
            m("/a/../b", &conf),
        ];
        let paths = materialise(&root, &own, &spark, &mounts).expect("tree");
        let link = root.join("data/spark-x/executor-x");
        assert_eq!(std::fs::read_link(&link).expect("link"), vol);
        assert!(!std::fs::symlink_metadata(root.join("data/spark-x"))
            .expect("parent")
            .file_type()
            .is_symlink());
        assert_eq!(
            paths.rewrite("/data/spark-x/executor-x/f"),
            format!("{}/f", link.display())
        );
        // Nested under another mount or under /opt/spark: direct.
        assert_eq!(
            paths.rewrite("/data/spark-x/executor-x/nested/f"),
            format!("{}/f", conf.display())
        );
        assert_eq!(paths.rewrite("/opt/spark/conf"), conf.display().to_string());
        assert_eq!(paths.rewrite("/opt/spark/jars"), "/sh/jars");
        assert!(!root.join("opt").exists());
        assert!(!vol.join("nested").exists());
        assert_eq!(paths.rewrite("/a/../b"), conf.display().to_string());
        // A restart finds its links in place.
        let again = materialise(&root, &own, &spark, &mounts).expect("again");
        assert_eq!(
            again.rewrite("/data/spark-x/executor-x"),
            link.display().to_string()
        );
        assert!(!own.exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_container_whose_mounts_conflict_gets_a_tree_of_its_own() {
        let dir = scratch("conflict");
        let (root, own) = (dir.join("root"), dir.join("own"));
        let (v1, v2) = (dir.join("v1"), dir.join("v2"));
        std::fs::create_dir_all(&v1).expect("v1");
        std::fs::create_dir_all(&v2).expect("v2");
        materialise(&root, &own, &[], &[m("/data", &v1), m("/other/x", &v1)]).expect("first");
        // The same path, another volume.
        let p =
            materialise(&root, &own, &[], &[m("/data", &v2), m("/other/y", &v2)]).expect("second");
        assert_eq!(p.rewrite("/data"), own.join("data").display().to_string());
        assert_eq!(
            p.rewrite("/other/y"),
            own.join("other/y").display().to_string()
        );
        assert_eq!(
            std::fs::read_link(root.join("data")).expect("first link"),
            v1
        );
        // Below another container's link: not inside its volume.
        let dir3 = dir.join("own3");
        let p = materialise(&root, &dir3, &[], &[m("/data/sub", &v2)]).expect("third");
        assert_eq!(
            p.rewrite("/data/sub"),
            dir3.join("data/sub").display().to_string()
        );
        assert!(!v1.join("sub").exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
