//! Crash-safe file writes (temp file in the same directory, fsync, rename, fsync dir)
//! and private directories.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Atomically replaces `path` with `bytes`, created with `mode` (e.g. 0o600 for keys).
/// The temporary file is created exclusively (`O_EXCL`: a planted file or symlink at
/// its name makes the write fail, never go through it), and the rename replaces a
/// symlink at `path` rather than following it.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let (mut f, tmp) = create_temp(dir, name, mode)?;
    let written = (|| {
        // The umask may have narrowed `mode`; a key file must not be wider than asked.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(dir)?.sync_all()
}

/// A new file `.<name>.<pid>.<n>.tmp` in `dir`, created exclusively.
fn create_temp(dir: &Path, name: &str, mode: u32) -> std::io::Result<(File, PathBuf)> {
    let mut last = None;
    for n in 0..16 {
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no temporary name")))
}

/// This process's user id (the owner of its /proc entry).
pub fn current_uid() -> std::io::Result<u32> {
    Ok(fs::metadata("/proc/self")?.uid())
}

/// Creates `dir` (and parents) with mode 0700, or checks an existing one: it must be a
/// directory, and when this user owns it, it is tightened to 0700. One it does not own
/// (a volume's mount point, owned by root with a group for the pod) cannot be
/// tightened and is only reported; what is secret lives in subdirectories made here.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let meta = match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir)?;
            return fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        Err(e) => return Err(e),
        Ok(m) => m,
    };
    if meta.file_type().is_symlink() {
        // A symlinked state directory is the operator's choice; check its target.
        return create_private_dir(&fs::canonicalize(dir)?);
    }
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if meta.uid() == current_uid()? {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        tracing::info!(dir = %dir.display(), from = format!("{mode:o}"), "tightened the directory to 0700");
    } else {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), owner = meta.uid(), "directory is not this user's and is open to others; its contents are created private");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_symlink_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "untouched").unwrap();
        let target = dir.path().join("key.pem");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        // Every temporary name this process would use, planted too.
        for n in 0..16 {
            let tmp = dir
                .path()
                .join(format!(".key.pem.{}.{n}.tmp", std::process::id()));
            std::os::unix::fs::symlink(&victim, tmp).unwrap();
        }
        let err = write_atomic(&target, b"secret", 0o600).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        // With the temporary names free, the symlink itself is replaced.
        for n in 0..16 {
            let tmp = dir
                .path()
                .join(format!(".key.pem.{}.{n}.tmp", std::process::id()));
            fs::remove_file(tmp).unwrap();
        }
        write_atomic(&target, b"secret", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert!(
            !fs::symlink_metadata(&target)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read_to_string(&target).unwrap(), "secret");
    }

    #[test]
    fn an_existing_open_directory_of_ours_is_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(create_private_dir(&file).is_err());
    }
}
