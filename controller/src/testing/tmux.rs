//! Driving an interactive command on a real terminal: a tmux session, read off its screen.

use std::process::Command;
use std::time::Duration;

/// A tmux session running a command on a fixed-size screen; killed on drop.
pub struct Tmux {
    session: String,
}

impl Tmux {
    /// Starts `command`; when it ends, the session shows its exit status (and stays for a minute, so a
    /// failing test shows why) unless it ended with status 0.
    pub fn start(session: &str, command: &str) -> Tmux {
        let _ = Command::new("tmux").args(["kill-session", "-t", session]).output();
        let command = format!("{command} || {{ echo \"EXITED $?\"; sleep 60; }}");
        let out = Command::new("tmux")
            .args(["new-session", "-d", "-s", session, "-x", "200", "-y", "50", &command])
            .output()
            .unwrap();
        assert!(out.status.success(), "tmux: {}", String::from_utf8_lossy(&out.stderr));
        Tmux { session: session.into() }
    }

    /// What the screen shows now.
    pub fn screen(&self) -> String {
        let out = Command::new("tmux").args(["capture-pane", "-p", "-t", &self.session]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen satisfies `cond`, panicking with the screen after `timeout`.
    pub fn wait(&self, what: &str, timeout: Duration, cond: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            last = self.screen();
            if cond(&last) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("timed out waiting for {what}; the screen shows:\n{last}");
    }

    /// Types `keys` (tmux `send-keys` names: `Enter`, `C-p`, `Down`, or literal text).
    pub fn keys(&self, keys: &str) {
        Command::new("tmux").args(["send-keys", "-t", &self.session, keys]).status().unwrap();
    }

    /// Whether the session still runs.
    pub fn alive(&self) -> bool {
        Command::new("tmux").args(["has-session", "-t", &self.session]).output().unwrap().status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.session]).output();
    }
}

/// Whether tmux cannot be run here (`scripts/install-deps.sh` installs it).
pub fn tmux_missing() -> bool {
    Command::new("tmux").arg("-V").output().is_err()
}
