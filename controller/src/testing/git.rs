//! Real git repositories for tests: a work tree to commit into, pushed to a bare "remote", and
//! a `git daemon` serving it on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs git in `dir`, panicking with its stderr on failure; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=ignite-test", "-c", "user.email=test@ignite.invalid", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A work tree with a bare remote it pushes to.
pub struct Repo {
    /// Temporary directory holding both.
    pub dir: tempfile::TempDir,
    /// The work tree.
    pub work: PathBuf,
    /// The bare remote.
    pub remote: PathBuf,
}

#[allow(clippy::new_without_default)] // creating one touches the disk: not a default value
impl Repo {
    /// An empty work tree and bare remote (branch `main`).
    pub fn new() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let remote = dir.path().join("remote.git");
        std::fs::create_dir_all(&work).unwrap();
        git(dir.path(), &["init", "-q", "--bare", remote.to_str().unwrap()]);
        git(&work, &["init", "-q"]);
        git(&work, &["remote", "add", "origin", remote.to_str().unwrap()]);
        Repo { dir, work, remote }
    }

    /// `file://` URL of the remote.
    pub fn url(&self) -> String {
        format!("file://{}", self.remote.display())
    }

    /// Writes (or with `None` deletes) files, commits everything and pushes; returns the sha.
    pub fn commit(&self, files: &[(&str, Option<&str>)], message: &str) -> String {
        for (path, content) in files {
            let full = self.work.join(path);
            match content {
                Some(text) => {
                    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
                    std::fs::write(&full, text).unwrap();
                }
                None => std::fs::remove_file(&full).unwrap(),
            }
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", message]);
        git(&self.work, &["push", "-q", "-f", "origin", "HEAD:main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Amends the last commit with `files` and force-pushes; returns the new sha.
    pub fn amend(&self, files: &[(&str, &str)]) -> String {
        for (path, text) in files {
            std::fs::write(self.work.join(path), text).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "--amend", "--no-edit"]);
        git(&self.work, &["push", "-q", "-f", "origin", "HEAD:main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

/// `git daemon` exporting a directory on 127.0.0.1, killed on drop.
pub struct GitDaemon {
    child: Child,
    /// The port.
    pub port: u16,
}

impl GitDaemon {
    /// Serves every repository under `base`.
    pub fn start(base: &Path) -> GitDaemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // Run git-daemon itself: `git daemon` would fork it as a child that outlives a kill.
        let exec_path = git(base, &["--exec-path"]);
        let child = Command::new(Path::new(&exec_path).join("git-daemon"))
            .args(["--export-all", "--reuseaddr", "--listen=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        GitDaemon { child, port }
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Smart HTTP for the repositories under a directory (`git http-backend` behind a small HTTP/1.1
/// front on 127.0.0.1) that wants basic authentication with one user name and password; killed
/// (stops accepting) on drop.
pub struct GitHttpServer {
    /// The port.
    pub port: u16,
    /// Requests served with the right credentials.
    pub authorized: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Requests refused (no or wrong credentials).
    pub refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl GitHttpServer {
    /// Serves every repository under `base` to `username`:`password`.
    pub fn start(base: &Path, username: &str, password: &str) -> GitHttpServer {
        use base64::Engine as _;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let expected =
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}")));
        let backend = Path::new(&git(base, &["--exec-path"])).join("git-http-backend");
        let (authorized, refused, stop) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let server =
            GitHttpServer { port, authorized: authorized.clone(), refused: refused.clone(), stop: stop.clone() };
        let base = base.to_path_buf();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let conn = match listener.accept() {
                    Ok((conn, _)) => conn,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let (base, backend, expected) = (base.clone(), backend.clone(), expected.clone());
                let (authorized, refused) = (authorized.clone(), refused.clone());
                std::thread::spawn(move || {
                    let _ = conn.set_nonblocking(false);
                    let _ = serve_one(conn, &base, &backend, &expected, &authorized, &refused);
                });
            }
        });
        server
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One request on `conn`, answered with `Connection: close`.
fn serve_one(
    conn: std::net::TcpStream,
    base: &Path,
    backend: &Path,
    expected: &str,
    authorized: &std::sync::atomic::AtomicUsize,
    refused: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("/").to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if let Some(len) = header("content-length").and_then(|l| l.parse::<usize>().ok()) {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    let mut out = conn;
    if header("authorization").as_deref() != Some(expected) {
        refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        return out.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    authorized.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut child = Command::new(backend)
        .env_clear()
        .env("GIT_PROJECT_ROOT", base)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REQUEST_METHOD", &method)
        .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", "git")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(&body));
    let output = child.wait_with_output()?;
    let _ = writer.join();
    let cgi = output.stdout;
    let split = cgi
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, p + 4))
        .or_else(|| cgi.windows(2).position(|w| w == b"\n\n").map(|p| (p, p + 2)));
    let (head, payload) = match split {
        Some((end, start)) => (String::from_utf8_lossy(&cgi[..end]).into_owned(), &cgi[start..]),
        None => (String::new(), &cgi[..]),
    };
    let mut status = "200 OK".to_string();
    let mut response = String::new();
    for h in head.lines() {
        match h.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_string(),
            Some(_) => response.push_str(&format!("{}\r\n", h.trim_end())),
            None => {}
        }
    }
    let head = format!("HTTP/1.1 {status}\r\n{response}Content-Length: {}\r\nConnection: close\r\n\r\n", payload.len());
    out.write_all(head.as_bytes())?;
    out.write_all(payload)
}
