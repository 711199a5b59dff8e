//! Transport of the admin protocol over a Unix socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::{AdminRequest, AdminResponse, AdminService};

const MAX_LINE: u64 = 1024 * 1024;

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
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
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
