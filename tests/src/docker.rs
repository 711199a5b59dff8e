//! The ca-server container image under test, run with the Docker engine's own CLI:
//! containers on private networks, with the pod's settings, removed when dropped.
//! The image is built by `scripts/build-image.sh` (`scripts/test-image.sh` builds it
//! and runs these suites); its name comes from `CA_IMAGE`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The image to test: `$CA_IMAGE`, or the name the manifests use.
pub fn image() -> String {
    std::env::var("CA_IMAGE").unwrap_or_else(|_| "istio-ca-rs:0.1.0".into())
}

/// Runs `docker args…`; its output, whatever the exit status.
pub fn docker_output(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the docker CLI runs")
}

/// Runs `docker args…`, panicking with its stderr if it fails; its stdout, trimmed.
pub fn docker(args: &[&str]) -> String {
    let out = docker_output(args);
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A unique name for this test process's objects.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The flags that give a container what the StatefulSet gives the pod: uid 65532, a
/// read-only root filesystem, no capabilities, no privilege escalation, the memory
/// limit, /tmp as its emptyDir.
pub const POD_SETTINGS: &[&str] = &[
    "--user",
    "65532:65532",
    "--read-only",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--memory",
    "256m",
    "--tmpfs",
    "/tmp:size=64m",
];

/// A container, removed (with its anonymous volumes) when dropped.
pub struct Container {
    /// Its name.
    pub name: String,
}

impl Container {
    /// `docker run -d --name NAME args…`.
    pub fn run(name: &str, args: &[&str]) -> Container {
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(args);
        docker(&all);
        Container {
            name: name.to_owned(),
        }
    }

    /// The loopback address where `port/tcp` of the container is published.
    pub fn published(&self, port: u16) -> SocketAddr {
        let text = docker(&["port", &self.name, &format!("{port}/tcp")]);
        text.lines()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("{port}/tcp of {} is not published: {text}", self.name))
    }

    /// `docker exec NAME args…` (the image's environment, no shell).
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        docker_output(&all)
    }

    /// `docker exec -i NAME args…` with `input` on the command's stdin.
    pub fn exec_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = Command::new("docker")
            .args(["exec", "-i", self.name.as_str()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the docker CLI runs");
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, input).unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    }

    /// A `ca-server` admin command run in the container.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut all = vec!["ca-server"];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// `docker inspect -f FORMAT`.
    pub fn inspect(&self, format: &str) -> String {
        docker(&["inspect", "-f", format, &self.name])
    }

    /// The container's log (stdout and stderr).
    pub fn logs(&self) -> String {
        let out = docker_output(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits until `GET /readyz` on the published monitoring port answers 200.
    pub fn wait_ready(&self, http_port: u16) -> SocketAddr {
        let addr = self.published(http_port);
        crate::wait_for("the container's /readyz", Duration::from_secs(60), || {
            assert_eq!(
                self.inspect("{{.State.Running}}"),
                "true",
                "{} exited:\n{}",
                self.name,
                self.logs()
            );
            std::net::TcpStream::connect(addr).is_ok() && crate::http_get(addr, "/readyz").0 == 200
        });
        addr
    }

    /// `export-bundle --out -` in the container: the tar stream's files, by name, with
    /// their modes.
    pub fn export_bundle(&self, ns: &str, sa: &str, ttl: &str) -> BTreeMap<String, (u32, String)> {
        let out = self.cli(&crate::export_bundle_args(ns, sa, ttl, "-"));
        assert!(
            out.status.success(),
            "export-bundle --out -: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        untar(&out.stdout)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker_output(&["rm", "-f", "-v", &self.name]);
    }
}

/// The regular files of a tar stream: name → (mode, contents).
pub fn untar(bytes: &[u8]) -> BTreeMap<String, (u32, String)> {
    let mut archive = tar::Archive::new(bytes);
    let mut files = BTreeMap::new();
    for entry in archive.entries().expect("a tar stream") {
        let mut entry = entry.expect("a tar entry");
        let name = entry.path().unwrap().display().to_string();
        let mode = entry.header().mode().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
        files.insert(name, (mode, text));
    }
    files
}

/// A named volume, removed when dropped.
pub struct Volume {
    /// Its name.
    pub name: String,
}

impl Volume {
    /// `docker volume create`.
    pub fn create(prefix: &str) -> Volume {
        let name = unique(prefix);
        docker(&["volume", "create", &name]);
        Volume { name }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = docker_output(&["volume", "rm", "-f", &self.name]);
    }
}

/// A private bridge network, removed when dropped.
pub struct Network {
    /// Its name.
    pub name: String,
    /// The host's address on it (where the host's services are reachable).
    pub gateway: IpAddr,
    /// Its subnet, CIDR.
    pub subnet: String,
}

impl Network {
    /// `docker network create`.
    pub fn create(prefix: &str) -> Network {
        let name = unique(prefix);
        docker(&["network", "create", &name]);
        let ipam = docker(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}} {{.Subnet}}{{end}}",
            &name,
        ]);
        let (gateway, subnet) = ipam
            .split_once(' ')
            .unwrap_or_else(|| panic!("network {name} has no IPAM config: {ipam:?}"));
        Network {
            gateway: gateway.parse().expect("gateway address"),
            subnet: subnet.to_owned(),
            name,
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker_output(&["network", "rm", &self.name]);
    }
}
