//! The admin token file: written only into a directory no other user can write to, and read
//! only from one.
//!
//! A directory others can write to (a predictable path under `/tmp` that someone else created
//! first, or a world-writable one) would let them plant the file or a symbolic link in its
//! place before stoker writes it, so that the token lands where they can read it or a file of
//! stoker's user is overwritten, or let them swap the token a client reads. So `stoker serve`
//! creates its work directory with mode 0700, and both the server and `stoker apps` refuse a
//! directory that is not this user's (or root's) or that others can write to. The file is
//! written under a fresh name (`O_EXCL`, mode 0600) and renamed into place, which never follows
//! a link. Only the directory itself is checked, not its ancestors.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a secret cannot be kept in, or read from, a place.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file system refused an operation.
    #[error("cannot use {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a directory (or, for the secret itself, not a regular file).
    #[error("{} is not a {kind}", path.display())]
    WrongKind {
        /// The path.
        path: PathBuf,
        /// What it should be.
        kind: &'static str,
    },
    /// The path belongs to another user, who could change it.
    #[error("{} belongs to uid {owner}, not to this user (uid {user}) or root", path.display())]
    ForeignOwner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective user.
        user: u32,
    },
    /// Other users can write to the path.
    #[error("{} is writable by other users (mode {mode:04o})", path.display())]
    WritableByOthers {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (and missing parents) with mode 0700 if it does not exist; an existing
/// directory is left as it is.
pub fn create_private_dir(dir: &Path) -> Result<(), SecretError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Checks that only this user (or root) can change `dir`: it is a directory owned by this user
/// or root, not writable by group or others, and, if it is a symbolic link, the link too belongs
/// to this user or root (another user could point it elsewhere later).
pub fn check_private_dir(dir: &Path) -> Result<(), SecretError> {
    let link = fs::symlink_metadata(dir).map_err(io(dir))?;
    if link.file_type().is_symlink() {
        check_owner(dir, &link)?;
    }
    let meta = fs::metadata(dir).map_err(io(dir))?;
    if !meta.is_dir() {
        return Err(SecretError::WrongKind {
            path: dir.to_owned(),
            kind: "directory",
        });
    }
    check_owner(dir, &meta)?;
    check_not_writable_by_others(dir, &meta)
}

fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), SecretError> {
    let user = nix::unistd::geteuid().as_raw();
    let owner = meta.uid();
    if owner == user || owner == 0 {
        return Ok(());
    }
    Err(SecretError::ForeignOwner {
        path: path.to_owned(),
        owner,
        user,
    })
}

fn check_not_writable_by_others(path: &Path, meta: &fs::Metadata) -> Result<(), SecretError> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 == 0 {
        return Ok(());
    }
    Err(SecretError::WritableByOthers {
        path: path.to_owned(),
        mode,
    })
}

/// Writes `secret` to `dir/name` with mode 0600, replacing any earlier file, after checking
/// that `dir` is private ([`check_private_dir`]). Returns the file's path.
pub fn write_secret(dir: &Path, name: &str, secret: &str) -> Result<PathBuf, SecretError> {
    check_private_dir(dir)?;
    let path = dir.join(name);
    let temp = dir.join(format!(".{name}.{}", &crate::random_token()[..16]));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(secret.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temp, &path)
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&temp);
        return Err(SecretError::Io { path, source });
    }
    Ok(path)
}

/// Reads the secret in `dir/name`, trimmed, after checking that `dir` is private
/// ([`check_private_dir`]) and that the file is a regular file of this user (or root) that
/// others cannot write to.
pub fn read_secret(dir: &Path, name: &str) -> Result<String, SecretError> {
    check_private_dir(dir)?;
    let path = dir.join(name);
    let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
    if !meta.is_file() {
        return Err(SecretError::WrongKind {
            path,
            kind: "regular file",
        });
    }
    check_owner(&path, &meta)?;
    check_not_writable_by_others(&path, &meta)?;
    let secret = fs::read_to_string(&path).map_err(io(&path))?;
    Ok(secret.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    #[test]
    fn a_missing_work_dir_is_created_private() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("a/work");
        create_private_dir(&dir).expect("created");
        assert_eq!(mode(&dir), 0o700);
        check_private_dir(&dir).expect("private");
        let path = write_secret(&dir, "admin-token", "s3cret").expect("written");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(read_secret(&dir, "admin-token").expect("read"), "s3cret");
        // Written again over the first: replaced, still 0600, no temporary file left behind.
        write_secret(&dir, "admin-token", "other").expect("rewritten");
        assert_eq!(read_secret(&dir, "admin-token").expect("read"), "other");
        assert_eq!(fs::read_dir(&dir).expect("ls").count(), 1);
    }

    #[test]
    fn a_dir_others_can_write_is_refused_for_writing_and_reading() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("shared");
        create_private_dir(&dir).expect("created");
        write_secret(&dir, "admin-token", "s3cret").expect("written");
        for open in [0o777, 0o1777, 0o770] {
            chmod(&dir, open);
            let err = write_secret(&dir, "admin-token", "new").expect_err("refused");
            assert!(
                matches!(err, SecretError::WritableByOthers { mode, .. } if mode == open),
                "{err}"
            );
            assert!(err.to_string().contains("writable by other users"), "{err}");
            let err = read_secret(&dir, "admin-token").expect_err("refused");
            assert!(matches!(err, SecretError::WritableByOthers { .. }), "{err}");
        }
        chmod(&dir, 0o700);
        assert_eq!(read_secret(&dir, "admin-token").expect("read"), "s3cret");
    }

    #[test]
    fn a_planted_link_is_replaced_not_followed() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("work");
        create_private_dir(&dir).expect("created");
        let victim = root.path().join("victim");
        fs::write(&victim, "keep me").expect("victim");
        std::os::unix::fs::symlink(&victim, dir.join("admin-token")).expect("link");
        let err = read_secret(&dir, "admin-token").expect_err("a link is not read");
        assert!(matches!(err, SecretError::WrongKind { .. }), "{err}");
        write_secret(&dir, "admin-token", "s3cret").expect("written");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "keep me");
        assert!(fs::symlink_metadata(dir.join("admin-token"))
            .expect("stat")
            .is_file());
        assert_eq!(read_secret(&dir, "admin-token").expect("read"), "s3cret");
    }

    #[test]
    fn a_dir_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            // Only root can give a directory away; the owner check is the same code either way.
            return;
        }
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("theirs");
        create_private_dir(&dir).expect("created");
        std::os::unix::fs::chown(&dir, Some(4242), None).expect("chown");
        let err = check_private_dir(&dir).expect_err("refused");
        assert!(
            matches!(err, SecretError::ForeignOwner { owner: 4242, .. }),
            "{err}"
        );
        // A link another user owns is refused even when it points to a private directory.
        let mine = root.path().join("mine");
        create_private_dir(&mine).expect("created");
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&mine, &link).expect("link");
        check_private_dir(&link).expect("own link");
        std::os::unix::fs::lchown(&link, Some(4242), None).expect("lchown");
        let err = check_private_dir(&link).expect_err("foreign link");
        assert!(matches!(err, SecretError::ForeignOwner { .. }), "{err}");
    }
}
