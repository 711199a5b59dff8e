//! Publishing the three files so that they change together.
//!
//! Layout (the same scheme kubelet uses for secret volumes):
//!
//! ```text
//! certs-dir/
//!   ..2026_11_26_10_50_00.123456789/   key.pem (0600), cert-chain.pem, root-cert.pem (0644)
//!   ..data -> ..2026_11_26_10_50_00.123456789
//!   key.pem -> ..data/key.pem
//!   cert-chain.pem -> ..data/cert-chain.pem
//!   root-cert.pem -> ..data/root-cert.pem
//! ```
//!
//! A new generation is written and fsynced completely in its own directory, then
//! `..data` is replaced by one `rename(2)`: every open of any of the three paths sees
//! either the old generation or the new one, whole. The previous generation is kept, so
//! a reader that resolved the old `..data` can finish reading it. A reader that opens
//! two files around the switch can still get one of each: readers that care re-read when
//! the pair does not match, or resolve `..data` once and read both files from there.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

/// The names sidecars read.
pub const FILES: [&str; 3] = ["key.pem", "cert-chain.pem", "root-cert.pem"];
const DATA_LINK: &str = "..data";

/// What to publish.
pub struct Bundle<'a> {
    /// PKCS#8 PEM (written 0600).
    pub key_pem: &'a str,
    /// Leaf then CA chain (0644).
    pub chain_pem: &'a str,
    /// Trust bundle (0644).
    pub roots_pem: &'a str,
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces (or creates) a symlink atomically.
fn replace_symlink(dir: &Path, name: &str, target: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, dir.join(name))
}

/// The generation directory `..data` points at, if any.
pub fn current_generation(dir: &Path) -> Option<PathBuf> {
    fs::read_link(dir.join(DATA_LINK)).ok().map(|t| dir.join(t))
}

/// Publishes a new generation in `dir` (created 0755 if missing).
pub fn publish(dir: &Path, bundle: &Bundle<'_>) -> std::io::Result<PathBuf> {
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    let now = OffsetDateTime::now_utc();
    let stamp = format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond()
    );
    let staging = dir.join(format!("{stamp}.tmp"));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir(&staging)?;
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o755))?;
    write_file(&staging.join("key.pem"), bundle.key_pem.as_bytes(), 0o600)?;
    write_file(
        &staging.join("cert-chain.pem"),
        bundle.chain_pem.as_bytes(),
        0o644,
    )?;
    write_file(
        &staging.join("root-cert.pem"),
        bundle.roots_pem.as_bytes(),
        0o644,
    )?;
    sync_dir(&staging)?;
    let generation = dir.join(&stamp);
    fs::rename(&staging, &generation)?;
    let previous = current_generation(dir);
    replace_symlink(dir, DATA_LINK, &stamp)?;
    for name in FILES {
        let path = dir.join(name);
        let is_our_link = fs::read_link(&path).is_ok_and(|t| t == Path::new(DATA_LINK).join(name));
        if !is_our_link {
            // First publication, or a plain file copied here by hand: switch to a link.
            replace_symlink(dir, name, &format!("{DATA_LINK}/{name}"))?;
        }
    }
    sync_dir(dir)?;
    prune(dir, &generation, previous.as_deref());
    Ok(generation)
}

/// Removes generations other than the current and the previous one.
fn prune(dir: &Path, keep: &Path, previous: Option<&Path>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        let is_generation =
            name.starts_with("..") && name != DATA_LINK && e.file_type().is_ok_and(|t| t.is_dir());
        if is_generation && path != keep && Some(path.as_path()) != previous {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn publishes_generations_with_modes_and_prunes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        // A bundle copied in by hand is replaced by links on first publication.
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("key.pem"), "old").unwrap();
        for i in 0..4 {
            let key = format!("key{i}");
            publish(
                &dir,
                &Bundle {
                    key_pem: &key,
                    chain_pem: &format!("chain{i}"),
                    roots_pem: "roots",
                },
            )
            .unwrap();
            assert_eq!(fs::read_to_string(dir.join("key.pem")).unwrap(), key);
            assert_eq!(
                fs::read_to_string(dir.join("cert-chain.pem")).unwrap(),
                format!("chain{i}")
            );
        }
        assert_eq!(
            fs::metadata(dir.join("key.pem")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(dir.join("cert-chain.pem")).unwrap().mode() & 0o777,
            0o644
        );
        assert_eq!(
            fs::metadata(dir.join("root-cert.pem")).unwrap().mode() & 0o777,
            0o644
        );
        let generations = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .count();
        assert_eq!(generations, 2, "current and previous generation only");
    }
}
