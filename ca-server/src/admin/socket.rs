//! Transport of the admin protocol over a Unix socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::{AdminRequest, AdminResponse, AdminService};

const MAX_LINE: u64 = 1024 * 1024;

/// Binds a listening socket at `path` that is never reachable with a wider mode than
/// 0600: it is bound in a new directory of mode 0700, narrowed, then renamed into
/// place (no process-wide umask change, which would race the server's other files).
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = path.parent().unwrap_or(Path::new("."));
    let staging = parent.join(format!(".admin-socket.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let bound = (|| {
        let inner = staging.join("s");
        let listener = UnixListener::bind(&inner)?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inner, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    bound
}

/// Binds `path` (mode 0600) and serves until `shutdown`.
pub async fn serve_socket(
    path: PathBuf,
    service: AdminService,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if path.exists() {
        // A socket left by a killed server; only remove it if nobody answers on it.
        if UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another ca-server answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = bind_private(&path)?;
    Ok(tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let service = service.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, service).await {
                    tracing::warn!(error = %e, "admin connection failed");
                }
            });
        }
        let _ = std::fs::remove_file(&path);
    }))
}

async fn handle(stream: UnixStream, service: AdminService) -> std::io::Result<()> {
    let admin = match stream.peer_cred() {
        Ok(c) => format!("uid:{}", c.uid()),
        Err(_) => "uid:unknown".into(),
    };
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_LINE))
        .read_line(&mut line)
        .await?;
    if line.trim().is_empty() {
        // A liveness probe (`AdminClient::is_up`) connects and closes.
        return Ok(());
    }
    let response = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(req) => service.handle(req, admin).await,
        Err(e) => AdminResponse::Error {
            message: format!("malformed admin request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// Client side, used by the `ca-server` admin subcommands.
pub struct AdminClient {
    path: PathBuf,
}

impl AdminClient {
    /// For the socket at `path`.
    pub fn new(path: &Path) -> Self {
        AdminClient {
            path: path.to_owned(),
        }
    }

    /// Whether a server answers on the socket.
    pub async fn is_up(&self) -> bool {
        UnixStream::connect(&self.path).await.is_ok()
    }

    /// Sends one request and waits for the answer.
    pub async fn call(&self, req: &AdminRequest) -> Result<AdminResponse, String> {
        let mut stream = UnixStream::connect(&self.path)
            .await
            .map_err(|e| format!("cannot reach ca-server on {}: {e}", self.path.display()))?;
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(|e| e.to_string())?;
        let mut buf = String::new();
        BufReader::new(stream.take(64 * MAX_LINE))
            .read_line(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&buf).map_err(|e| format!("malformed answer from ca-server: {e}"))
    }
}
