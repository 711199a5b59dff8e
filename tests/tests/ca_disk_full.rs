//! The store's disk fills up, turns read-only, or (PostgreSQL) goes away, under load.
//! The CA must refuse to issue (no record, no certificate) within each request's
//! deadline, stay up, say why on /readyz, stop on SIGTERM, lose nothing it
//! acknowledged, and resume by itself when the cause goes away.
//!
//! The disks are real file systems mounted on the state directory (this needs root,
//! as CI runs): a tmpfs of a few MiB that fills up, and an ext4 image on a loop
//! device that an injected error turns read-only, as a failing disk does.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::postgres::TestStore;
use e2e::{CaProcess, Issuers, hostile_csr, http_get, modern, wait_for};
use tonic::Code;

const FS_BYTES: u64 = 6 * 1024 * 1024;

/// A tmpfs mounted on `dir`, unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &Path) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FS_BYTES},mode=0700")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a small tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs(dir.to_owned())
    }

    /// Fills the file system with `filler` until it has no space left.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0u8; 1]);
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn request() -> istio_ca_proto::IstioCertificateRequest {
    e2e::request(hostile_csr(&rcgen::PKCS_ECDSA_P256_SHA256).1)
}

/// Load until every client is refused; each refusal must be UNAVAILABLE and arrive
/// within the request deadline. Returns the serials received.
async fn load_until_refused(ch: &tonic::transport::Channel, what: &str) -> BTreeSet<String> {
    let started = Instant::now();
    let (received, refusals) = Issuers::spawn(ch, 8, 5000).join().await;
    assert_eq!(
        refusals.len(),
        8,
        "{what}: the clients were not all refused"
    );
    for status in &refusals {
        assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
        assert!(
            status.message().contains("cannot record decisions"),
            "{what}: {status:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{what}: refusals took {:?}",
        started.elapsed()
    );
    received
}

fn not_ready_naming(ca: &CaProcess, needle: &str) {
    let (code, body) = http_get(ca.http, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("audit store") && body.contains(needle),
        "{body}"
    );
}

fn ready_again(ca: &CaProcess) {
    wait_for("/readyz to recover", Duration::from_secs(15), || {
        http_get(ca.http, "/readyz").0 == 200
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_refuses_to_issue_and_recovers_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let fs = SmallFs::mount(&state);
    let mut ca = CaProcess::start(&state, &[]);
    let (chain, key) = ca.export_bundle("vm", "load", "1h", &tmp.path().join("b"));
    let ch = ca.channel(Some((&chain, &key))).await;
    assert_eq!(http_get(ca.http, "/readyz").0, 200);

    // Full: the last free blocks go to a filler, then clients run into the wall.
    let filler = fs.fill();
    let mut received = load_until_refused(&ch, "full disk").await;
    assert!(ca.is_running(), "the CA died:\n{}", ca.log_text());
    not_ready_naming(&ca, "sqlite:");
    let again = modern(&ch)
        .create_certificate(request())
        .await
        .expect_err("a certificate left the CA without an audit record");
    assert_eq!(again.code(), Code::Unavailable);

    // Space again: the CA notices by itself, without traffic and without a restart.
    std::fs::remove_file(&filler).unwrap();
    ready_again(&ca);
    let resp = modern(&ch)
        .create_certificate(request())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "issuance resumes once the disk has space: {e:?}\n{}",
                ca.log_text()
            )
        });
    received.insert(e2e::serial_of(&resp.into_inner().cert_chain[0]));

    // SIGTERM stops a CA whose store is failing.
    let filler = fs.fill();
    let _ = load_until_refused(&ch, "full again").await;
    let stopping = Instant::now();
    ca.stop();
    assert!(stopping.elapsed() < Duration::from_secs(20));
    std::fs::remove_file(&filler).unwrap();

    let ca = CaProcess::start(&state, &[]);
    ca.assert_all_recorded(&received);
}

/// An ext4 file system on a loop device, mounted on `dir` with `errors=remount-ro`.
struct Ext4 {
    image: std::path::PathBuf,
    dir: std::path::PathBuf,
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Ext4 {
    fn create(image: &Path, dir: &Path) -> Ext4 {
        std::fs::create_dir_all(dir).unwrap();
        let f = std::fs::File::create(image).unwrap();
        f.set_len(32 * 1024 * 1024).unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        let fs = Ext4 {
            image: image.to_owned(),
            dir: dir.to_owned(),
        };
        fs.mount();
        fs
    }

    fn mount(&self) {
        run(
            "mount",
            &[
                "-o",
                "loop,errors=remount-ro",
                self.image.to_str().unwrap(),
                self.dir.to_str().unwrap(),
            ],
        );
        std::fs::set_permissions(
            &self.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
    }

    /// What the kernel does when the disk under ext4 fails: the file system is
    /// remounted read-only at once (`emergency_ro`), with files open for writing.
    fn fail(&self) {
        let loop_dev = std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .find(|l| l.split(' ').nth(1) == self.dir.to_str())
            .and_then(|l| l.split(' ').next().map(str::to_owned))
            .expect("the ext4 mount");
        let name = loop_dev.trim_start_matches("/dev/");
        std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "test")
            .expect("trigger_fs_error");
    }

    /// The operator's remedy: unmount, check, mount again.
    fn repair(&self) {
        run("umount", &["-l", self.dir.to_str().unwrap()]);
        let _ = Command::new("e2fsck")
            .args(["-f", "-y", self.image.to_str().unwrap()])
            .output();
        self.mount();
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_only_file_system_refuses_to_issue_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let fs = Ext4::create(&tmp.path().join("disk.img"), &state);
    let mut ca = CaProcess::start(&state, &[]);
    let (chain, key) = ca.export_bundle("vm", "load", "1h", &tmp.path().join("b"));
    let ch = ca.channel(Some((&chain, &key))).await;

    let clients = Issuers::spawn(&ch, 8, 5000);
    tokio::time::sleep(Duration::from_millis(700)).await;
    fs.fail();
    let (received, refusals) = clients.join().await;
    assert!(
        received.len() >= 20,
        "only {} before the failure",
        received.len()
    );
    assert_eq!(refusals.len(), 8);
    for status in &refusals {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert!(ca.is_running(), "the CA died:\n{}", ca.log_text());
    not_ready_naming(&ca, "sqlite:");
    let stopping = Instant::now();
    ca.stop();
    assert!(stopping.elapsed() < Duration::from_secs(20));

    // Unmount, fsck, mount: what was acknowledged is there.
    fs.repair();
    let ca = CaProcess::start(&state, &[]);
    ca.assert_all_recorded(&received);
    let ch = ca.channel(Some((&chain, &key))).await;
    modern(&ch)
        .create_certificate(request())
        .await
        .expect("issuance after the repair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_under_load_is_unavailable_then_recovers_without_restart() {
    let mut store = TestStore::postgres();
    let tmp = tempfile::tempdir().unwrap();
    let mut ca = CaProcess::start_with_env(&tmp.path().join("state"), &[], &store.env());
    let (chain, key) = ca.export_bundle("vm", "load", "1h", &tmp.path().join("b"));
    let ch = ca.channel(Some((&chain, &key))).await;

    let clients = Issuers::spawn(&ch, 8, 5000);
    tokio::time::sleep(Duration::from_millis(700)).await;
    store.pg.as_mut().unwrap().stop();
    let (mut received, refusals) = clients.join().await;
    assert!(
        received.len() >= 20,
        "only {} before the stop",
        received.len()
    );
    assert_eq!(refusals.len(), 8);
    for status in &refusals {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert!(ca.is_running(), "the CA died:\n{}", ca.log_text());
    not_ready_naming(&ca, "postgres://");
    // Once the revocation list cannot be confirmed, renewals stop at authentication.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let err = modern(&ch)
        .create_certificate(request())
        .await
        .expect_err("renewed on a stale revocation list");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        ca.log_text().contains("revocations_stale"),
        "{}",
        ca.log_text()
    );

    store.pg.as_mut().unwrap().restart();
    ready_again(&ca);
    let resp = modern(&ch)
        .create_certificate(request())
        .await
        .expect("issuance resumes once PostgreSQL is back");
    received.insert(e2e::serial_of(&resp.into_inner().cert_chain[0]));
    ca.assert_all_recorded(&received);
}
