//! A throwaway PostgreSQL cluster for the suites: `initdb` in a temporary directory,
//! the server on a free loopback port, run as an unprivileged user (PostgreSQL
//! refuses root: as root the harness drops to the `postgres` account the Debian
//! package creates), removed when dropped. Each test takes a database of its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A running cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// A further address it listens on, for containers (see [`Postgres::start_for`]).
    extra: Option<std::net::IpAddr>,
    /// Whether it serves TLS (see [`Postgres::start_tls`]).
    tls: bool,
}

/// What a cluster started with [`Postgres::start_tls`] presents.
pub struct ServerTls {
    /// PEM of the root its certificate chains to: what clients put in `sslrootcert`.
    pub root_pem: String,
    /// Its certificate (PEM), for `127.0.0.1` and `localhost`.
    cert_pem: String,
    /// Its key (PEM).
    key_pem: String,
}

impl ServerTls {
    /// A fresh root and a server certificate under it.
    pub fn generate() -> ServerTls {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = CertificateParams::default();
        root_params
            .distinguished_name
            .push(DnType::CommonName, "Database Root");
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = root_params.self_signed(&root_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        let cert = params
            .signed_by(&key, &Issuer::from_params(&root_params, &root_key))
            .unwrap();
        ServerTls {
            root_pem: root.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/install-test-deps.sh)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("no /usr/lib/postgresql/*/bin/initdb (scripts/install-test-deps.sh)")
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// `program` from PostgreSQL's binaries, as the unprivileged user when we are root.
/// `setpriv` execs (no child in between), so the pid is the server's.
fn command(program: &str) -> Command {
    let path = bin_dir().join(program);
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl Postgres {
    /// Creates and starts a cluster (`fsync` on: the suites test durability).
    pub fn start() -> Postgres {
        Self::start_inner(None, None)
    }

    /// A cluster that also listens on `host` (the host's address on a private Docker
    /// network) and lets clients from `subnet` in (CIDR), for containers.
    pub fn start_for(host: std::net::IpAddr, subnet: &str) -> Postgres {
        Self::start_inner(Some((host, subnet)), None)
    }

    /// A cluster that serves TLS with `tls`'s certificate and refuses every TCP client
    /// that does not use it (`hostnossl ... reject`).
    pub fn start_tls(tls: &ServerTls) -> Postgres {
        Self::start_inner(None, Some(tls))
    }

    fn start_inner(
        containers: Option<(std::net::IpAddr, &str)>,
        tls: Option<&ServerTls>,
    ) -> Postgres {
        let dir = tempfile::Builder::new().prefix("ca-pg-").tempdir().unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the cluster directory to postgres");
        }
        let out = command("initdb")
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "-D",
            ])
            .arg(dir.path().join("data"))
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some((_, subnet)) = containers {
            let hba = dir.path().join("data/pg_hba.conf");
            let mut text = std::fs::read_to_string(&hba).unwrap();
            text.push_str(&format!("host all all {subnet} trust\n"));
            std::fs::write(&hba, text).unwrap();
        }
        if let Some(tls) = tls {
            let data = dir.path().join("data");
            let hba = data.join("pg_hba.conf");
            // The first matching line wins: plain TCP is refused before any `trust`.
            let text = std::fs::read_to_string(&hba).unwrap();
            std::fs::write(&hba, format!("hostnossl all all all reject\n{text}")).unwrap();
            for (name, pem) in [("server.crt", &tls.cert_pem), ("server.key", &tls.key_pem)] {
                let path = data.join(name);
                std::fs::write(&path, pem).unwrap();
                // PostgreSQL refuses a key others can read.
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
                if is_root() {
                    let ok = Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(&path)
                        .status()
                        .unwrap()
                        .success();
                    assert!(ok, "chown of {name} to postgres");
                }
            }
        }
        let mut pg = Postgres {
            addr: crate::free_port(),
            dir,
            child: None,
            extra: containers.map(|(host, _)| host),
            tls: tls.is_some(),
        };
        pg.spawn();
        pg
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = command("postgres")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args([
                "-c",
                &format!("listen_addresses={}", self.listen_addresses()),
            ])
            .args(["-c", &format!("port={}", self.addr.port())])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.dir.path().display()),
            ])
            .args(["-c", "max_connections=200", "-c", "fsync=on"])
            .args(if self.tls {
                &["-c", "ssl=on"][..]
            } else {
                &[][..]
            })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.accepts() {
            assert!(
                Instant::now() < deadline,
                "postgres did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn listen_addresses(&self) -> String {
        match self.extra {
            Some(host) => format!("127.0.0.1,{host}"),
            None => "127.0.0.1".into(),
        }
    }

    fn accepts(&self) -> bool {
        Command::new(bin_dir().join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The server's log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs SQL as the superuser in `db` (psql), panicking on failure; its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.addr.port().to_string(),
                "-U",
                "postgres",
                "-d",
                db,
            ])
            .args(["-c", sql])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new, empty database; its URL.
    pub fn database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ca_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}/{db}", self.addr)
    }

    /// Stops the server now (immediate shutdown: what a crash looks like to clients).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data and port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The audit store a suite runs the CA on: the embedded SQLite default, or a database
/// of a throwaway PostgreSQL cluster (`--store`, through `CA_STORE`).
pub struct TestStore {
    /// `sqlite` or `postgres`, for messages.
    pub name: &'static str,
    /// The PostgreSQL URL, when the store is one.
    pub url: Option<String>,
    /// The cluster, when the store is PostgreSQL.
    pub pg: Option<Postgres>,
}

impl TestStore {
    /// The default: `<state-dir>/audit.db`.
    pub fn sqlite() -> TestStore {
        TestStore {
            name: "sqlite",
            url: None,
            pg: None,
        }
    }

    /// A fresh database in a cluster of its own.
    pub fn postgres() -> TestStore {
        let pg = Postgres::start();
        TestStore {
            name: "postgres",
            url: Some(pg.database()),
            pg: Some(pg),
        }
    }

    /// Both backends, SQLite first.
    pub fn both() -> [TestStore; 2] {
        [TestStore::sqlite(), TestStore::postgres()]
    }

    /// Environment for `ca-server` (server and admin commands alike).
    pub fn env(&self) -> Vec<(&str, &str)> {
        match &self.url {
            Some(url) => vec![("CA_STORE", url.as_str())],
            None => vec![],
        }
    }

    /// A raw connection to the database, for tampering as someone with write access
    /// to it would. `state_dir` locates the SQLite file.
    pub async fn raw(&self, state_dir: &Path) -> sqlx::AnyPool {
        let location = match &self.url {
            Some(u) => ca_server::audit::StoreLocation::Postgres(u.clone()),
            None => ca_server::audit::StoreLocation::Sqlite(state_dir.join("audit.db")),
        };
        connect(&location).await
    }
}

/// A raw connection to the database at `location`, past the store's own code: for
/// tampering as someone with write access to it would.
pub async fn connect(location: &ca_server::audit::StoreLocation) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    let url = match location {
        ca_server::audit::StoreLocation::Sqlite(p) => format!("sqlite://{}", p.display()),
        ca_server::audit::StoreLocation::Postgres(u) => u.clone(),
    };
    sqlx::AnyPool::connect(&url)
        .await
        .expect("connect to the store")
}

/// Runs `statement` on `pool`, panicking with it on failure.
pub async fn execute(pool: &sqlx::AnyPool, statement: &str) {
    use sqlx::Executor;
    pool.execute(sqlx::AssertSqlSafe(statement.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}
