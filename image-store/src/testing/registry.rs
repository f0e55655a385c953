//! Debian's `docker-registry` (CNCF distribution) on 127.0.0.1 with a random port, killed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Digest;

const BINARY: &str = "/usr/bin/docker-registry";

/// A running registry.
pub struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

/// A free port on 127.0.0.1 (closed again, so nothing answers there until someone binds it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A registry stand-in on 127.0.0.1 answering every request with `head` and then `piece` again
/// and again, `pause` apart, until the client hangs up. Returns its address and the number of
/// connections it accepted so far.
fn endless_server(
    head: &'static str,
    piece: Vec<u8>,
    pause: Duration,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let piece = piece.clone();
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                let _ = conn.read(&mut request);
                if conn.write_all(head.as_bytes()).is_err() {
                    return;
                }
                while conn.write_all(&piece).is_ok() {
                    std::thread::sleep(pause);
                }
            });
        }
    });
    (addr, accepted)
}

/// A registry stand-in whose every answer promises a 1 MB manifest and then trickles it, one byte
/// every 100 ms: never silent long enough for a read timeout. Returns its address and the number
/// of connections it accepted so far.
pub fn trickling_registry() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                Content-Length: 1000000\r\n\r\n";
    endless_server(head, b" ".to_vec(), Duration::from_millis(100))
}

/// A registry stand-in whose every answer is an endless manifest (no length announced, 64 KiB
/// of JSON whitespace after another, as fast as the client reads).
pub fn endless_manifest_registry() -> std::net::SocketAddr {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\
                Connection: close\r\n\r\n";
    endless_server(head, vec![b' '; 64 << 10], Duration::ZERO).0
}

impl Registry {
    /// Starts a registry; `htpasswd` turns on basic auth. `Err` holds the reason to skip.
    pub fn start(htpasswd: Option<&Path>) -> Result<Registry, String> {
        if !Path::new(BINARY).exists() {
            return Err(format!("{BINARY} is not installed"));
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let storage = dir.path().join("storage");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        );
        if let Some(h) = htpasswd {
            config.push_str(&format!("auth:\n  htpasswd:\n    realm: test\n    path: {}\n", h.display()));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.path().join("registry.log")).map_err(|e| e.to_string())?;
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {BINARY}: {e}"))?;
        let mut registry = Registry { child, port, storage, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if registry.answers() {
                return Ok(registry);
            }
            if let Ok(Some(status)) = registry.child.try_wait() {
                let log = std::fs::read_to_string(registry._dir.path().join("registry.log")).unwrap_or_default();
                panic!("docker-registry exited with {status}: {log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not answer /v2/ on port {port} within 20 s");
    }

    /// Whether `GET /v2/` gets an HTTP answer (200, or 401 with auth on).
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.")
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's stored file for a blob, to tamper with.
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.storage.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
