//! The VM package's maintainer script (deploy/vm/debian/postinst), run as dpkg runs it
//! (`configure`, under `$DPKG_ROOT`): the directories belong to the agent's user, the
//! user an admin's systemd drop-in names (docs/VM.md: running as the sidecar's user),
//! and an upgrade keeps that choice instead of resetting it. Needs root (chown).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

const POSTINST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/vm/debian/postinst");

fn configure(root: &Path, version: Option<&str>) -> Output {
    let mut c = Command::new("sh");
    c.arg(POSTINST).arg("configure");
    if let Some(v) = version {
        c.arg(v);
    }
    c.env("DPKG_ROOT", root).output().expect("sh runs")
}

fn id(flag: &str, name: &str) -> u32 {
    let out = Command::new("id").args([flag, name]).output().unwrap();
    assert!(out.status.success(), "no account {name}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid(), m.permissions().mode() & 0o7777)
}

/// Writes the admin's drop-in `user.conf` under `root`.
fn write_dropin(root: &Path, text: &str) {
    let dir = root.join("etc/systemd/system/node-identity.service.d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("user.conf"), text).unwrap();
}

fn require_root() {
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "the postinst test changes ownership: run as root"
    );
}

#[test]
fn the_drop_in_user_owns_the_files_across_upgrades() {
    require_root();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // What docs/VM.md has the admin write, with an account every Debian host has in
    // place of the sidecar's istio-proxy.
    write_dropin(r, "[Service]\nUser=nobody\nGroup=nogroup\n");
    // A bundle already installed as root, as the package's first version left it.
    let bootstrap = r.join("etc/node-identity/bootstrap");
    std::fs::create_dir_all(&bootstrap).unwrap();
    std::fs::write(bootstrap.join("key.pem"), "key").unwrap();

    let out = configure(r, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uid = id("-u", "nobody");
    let nogroup: u32 = {
        let out = Command::new("getent")
            .args(["group", "nogroup"])
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        line.split(':').nth(2).unwrap().parse().unwrap()
    };
    assert_eq!(owner(&r.join("etc/certs")), (uid, nogroup, 0o755));
    assert_eq!(owner(&r.join("etc/node-identity")), (0, nogroup, 0o750));
    assert_eq!(owner(&bootstrap), (uid, nogroup, 0o700));
    assert_eq!(
        owner(&bootstrap.join("key.pem")).0,
        uid,
        "the bundle follows"
    );

    // The agent publishes; an upgrade (configure with the old version) keeps the
    // owner the admin chose.
    std::fs::write(r.join("etc/certs/key.pem"), "published").unwrap();
    let out = configure(r, Some("0.1.0-1"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(owner(&r.join("etc/certs")), (uid, nogroup, 0o755));
    assert_eq!(owner(&r.join("etc/certs/key.pem")).0, uid);
    assert_eq!(owner(&bootstrap), (uid, nogroup, 0o700));
}

#[test]
fn a_drop_in_naming_a_missing_user_fails_the_install_clearly() {
    require_root();
    let root = tempfile::tempdir().unwrap();
    write_dropin(root.path(), "[Service]\nUser=istio-proxy-absent\n");
    let out = configure(root.path(), None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("user 'istio-proxy-absent'"), "{err}");
    assert!(!root.path().join("etc/certs").exists(), "nothing created");
}

#[test]
fn the_old_istio_agent_is_named_when_it_is_installed_and_not_masked() {
    require_root();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_dropin(r, "[Service]\nUser=nobody\n");
    std::fs::create_dir_all(r.join("lib/systemd/system")).unwrap();
    std::fs::write(
        r.join("lib/systemd/system/istio-auth-node-agent.service"),
        "",
    )
    .unwrap();
    let out = configure(r, None);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("systemctl mask --now istio-auth-node-agent"),
        "{err}"
    );
    // Masked (what docs/VM.md says to do): no warning.
    std::os::unix::fs::symlink(
        "/dev/null",
        r.join("etc/systemd/system/istio-auth-node-agent.service"),
    )
    .unwrap();
    let out = configure(r, None);
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
}
