//! Running a test inside a network namespace it creates: the test re-executes its own binary
//! under `ip netns exec` and the namespace is deleted afterwards, also when the test fails.

use std::process::Command;

/// Set in the child so it knows it is inside the namespace.
pub const INSIDE: &str = "IGNITE_TEST_IN_NETNS";

/// Why network namespace tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root to create network namespaces".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`ip netns` fails: {}", String::from_utf8_lossy(&o.stderr))),
        Err(e) => Some(format!("`ip` cannot run: {e}")),
    }
}

/// A network namespace deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// Creates namespace `name` (removing a stale one) with loopback up.
    pub fn create(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(std::process::Stdio::null()).status();
        let ok = Command::new("ip").args(["netns", "add", name]).status().unwrap().success();
        assert!(ok, "ip netns add {name}");
        sh_in(name, "ip link set lo up");
        Netns(name.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `cmd` with `sh -c` inside namespace `ns`, panicking on failure.
pub fn sh_in(ns: &str, cmd: &str) -> String {
    let out = Command::new("ip").args(["netns", "exec", ns, "sh", "-c", cmd]).output().unwrap();
    assert!(out.status.success(), "[{ns}] {cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// If not yet inside a namespace: creates `ns`, re-runs test `test` of this binary inside it,
/// asserts it passed, passes on what it printed on stderr and returns `false` (the caller returns).
/// Inside: returns `true`.
pub fn run_inside(ns: &str, test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        return true;
    }
    if let Some(why) = unavailable() {
        eprintln!("SKIP {test}: {why}");
        return false;
    }
    let netns = Netns::create(ns);
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &netns.0])
        .arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stdout.contains("1 passed"), "{test} inside {ns} failed:\n{stdout}\n{stderr}");
    // What the test said inside (its figures, a SKIP and why) is the test's output.
    eprintln!("[inside {ns}]\n{stderr}");
    false
}
