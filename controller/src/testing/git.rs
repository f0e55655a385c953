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
