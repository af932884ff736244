//! Crash-safe file writes: temp file in the same directory → fsync → rename →
//! fsync the directory. A reader sees the old content or the new, never a
//! torn file, whatever instant the machine dies at. Directories the writes
//! create are synced into their parents, and removals into theirs, so a
//! power cut keeps what a completed step made and what a completed reset
//! removed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode for files holding keys, tokens and secrets.
pub const SECRET_MODE: u32 = 0o600;
/// Mode for ordinary files the agent writes.
pub const PUBLIC_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Atomically replaces `path` with `contents`, creating parent directories.
/// The file has `mode` from its first byte on, so a secret is never readable
/// by others, not even briefly.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), WriteError> {
    write_atomic_inner(path, contents, mode).map_err(|source| WriteError {
        path: path.to_path_buf(),
        source,
    })
}

fn write_atomic_inner(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_dir_all_durable(dir)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // An existing temp file from a crashed run keeps its old mode; fix it.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Flushes a directory's entries (new names, renames) to disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `create_dir_all`, with every directory it creates synced into its
/// parent: without that, a file written and synced into a brand-new
/// directory can vanish with the directory on power loss.
pub fn create_dir_all_durable(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && fs::symlink_metadata(d).is_err())
        .collect();
    for new in missing.iter().rev() {
        match fs::create_dir(new) {
            Ok(()) => {}
            // Another writer made it meanwhile; its sync is still ours to do.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = new.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    if missing.is_empty() && !dir.is_dir() {
        // A file where the directory should be: the error create_dir_all gives.
        fs::create_dir_all(dir)?;
    }
    Ok(())
}

/// Removes a file or a whole tree and syncs the removal into the parent
/// directory; one already gone is success.
pub fn remove_durable(path: &Path) -> io::Result<()> {
    let result = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    }
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Reads a file, mapping "not found" to `None`.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Creates a directory (and parents) with `mode` on the last component.
pub fn create_dir_with_mode(path: &Path, mode: u32) -> io::Result<()> {
    create_dir_all_durable(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Detaches every mount at or below `dir` (deepest first), as `kubeadm
/// reset` does for the kubelet's directory: the kubelet bind-mounts its root
/// dir onto itself and pods' volumes under it, so the tree cannot be removed
/// while they stay. Returns how many were detached.
pub fn unmount_under(dir: &Path) -> io::Result<usize> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first; a path mounted over twice is detached twice.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in &points {
        nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| io::Error::other(format!("umount {}: {e}", point.display())))?;
    }
    Ok(points.len())
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|o| {
            std::str::from_utf8(o)
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path("/tmp/a\\040b/c\\134d"),
            PathBuf::from("/tmp/a b/c\\d")
        );
        assert_eq!(unescape_mount_path("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn durable_dirs_are_created_and_removals_are_complete() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_dir_all_durable(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_all_durable(&deep).unwrap();
        std::fs::write(dir.path().join("a/file"), b"x").unwrap();
        let err = create_dir_all_durable(&dir.path().join("a/file/d")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotADirectory, "{err}");
        assert!(create_dir_all_durable(&dir.path().join("a/file")).is_err());

        remove_durable(&dir.path().join("a/b")).unwrap();
        remove_durable(&dir.path().join("a/file")).unwrap();
        remove_durable(&dir.path().join("a/never-there")).unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join("a")).unwrap().count(), 0);
    }

    #[test]
    fn writes_with_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/secret");
        write_atomic(&path, b"one", SECRET_MODE).unwrap();
        write_atomic(&path, b"two", SECRET_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp files left: {leftovers:?}");
    }

    #[test]
    fn read_optional_maps_missing_to_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_optional(&dir.path().join("nope")).unwrap().is_none());
    }
}
