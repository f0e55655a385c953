//! Helpers for ignite's end-to-end tests: locating the `ignite` binary and the guest kernel, and
//! building guest initramfs images. The tests themselves live in `tests/`.

pub mod bench;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `ignite` binary of this build (`$IGNITE_BIN`, else next to the test executable's `deps/`).
pub fn ignite_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("IGNITE_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from target/<profile>/deps/, programs from target/<profile>/: look in both.
    let candidates: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(|dir| dir.join("ignite")).collect();
    let found = candidates.iter().find(|bin| bin.exists()).cloned();
    found
        .unwrap_or_else(|| panic!("{:?} missing: run `cargo build -p ignite` first (scripts/test.sh does)", candidates))
}

/// The cached guest kernel: `$IGNITE_GUEST_KERNEL`, else what `e2e/guest-kernel.sh` prints (building it
/// the first time, several minutes).
pub fn guest_kernel() -> PathBuf {
    if let Some(kernel) = std::env::var_os("IGNITE_GUEST_KERNEL") {
        return kernel.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-kernel.sh");
    let out = Command::new("bash").arg(&script).output().expect("run guest-kernel.sh");
    assert!(out.status.success(), "guest-kernel.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

/// The tiny static `/init` of `guests/init.S`, assembled into `dir`: prints `IGNITE-INIT-MARKER`, then
/// the first 16 bytes of `/dev/vda`, then reboots.
pub fn tiny_init(dir: &Path) -> PathBuf {
    let obj = dir.join("init.o");
    let elf = dir.join("init");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/init.S");
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(src));
    run(Command::new("ld").args(["-m", "elf_x86_64", "-static", "-o"]).arg(&elf).arg(&obj));
    elf
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A `newc` cpio archive built in memory: what the kernel unpacks as an initramfs.
#[derive(Default)]
pub struct Initramfs {
    data: Vec<u8>,
    inode: u32,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Initramfs::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), content: &[u8]) -> &mut Self {
        self.inode += 1;
        let fields =
            [self.inode, mode, 0, 0, 1, 0, content.len() as u32, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(content);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while self.data.len() % 4 != 0 {
            self.data.push(0);
        }
    }

    /// A directory (no leading slash: `dev`).
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, 0o040755, (0, 0), &[])
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, content: &[u8]) -> &mut Self {
        self.entry(name, 0o100000 | perm, (0, 0), content)
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(name, 0o020600, (major, minor), &[])
    }

    /// Closes the archive and writes it to `path`.
    pub fn write(&mut self, path: &Path) -> std::io::Result<()> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        std::fs::write(path, &self.data)
    }
}

/// An initramfs in `dir` whose `/init` is [`tiny_init`], with `/dev/console` so init has its stdio.
pub fn tiny_initramfs(dir: &Path) -> PathBuf {
    let init = std::fs::read(tiny_init(dir)).expect("read init");
    let image = dir.join("initramfs.cpio");
    Initramfs::new()
        .dir("dev")
        .char_dev("dev/console", 5, 1)
        .file("init", 0o755, &init)
        .write(&image)
        .expect("write initramfs");
    image
}

/// Assembles the tiny PVH guest (`guests/pvh-tiny.S`) into `dir/<name>.elf`: it prints `X` on
/// COM1, then powers off through port 0xf4, or with `halt` idles forever.
pub fn assemble_pvh(dir: &Path, name: &str, halt: bool) -> PathBuf {
    let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests");
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    let mut as_cmd = Command::new("as");
    as_cmd.arg("--64").arg("-o").arg(&obj).arg(guests.join("pvh-tiny.S"));
    if halt {
        as_cmd.args(["--defsym", "HALT=1"]);
    }
    run_checked(&mut as_cmd);
    run_checked(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-T"])
            .arg(guests.join("pvh-tiny.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(&obj),
    );
    elf
}

fn run_checked(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}
