//! Links the `ignite-init` binary statically: it runs as PID 1 in guest images that may have no (or an
//! incompatible) C library, so a plain `cargo build -p ignite-init` must yield an ELF without an interpreter.
//!
//! rustc's gnu target links glibc dynamically unless `crt-static` is set, which a build script cannot set,
//! and rustc names the libraries itself (`-lc -lm -lgcc_s`...) in dynamic mode. So the build script puts a
//! directory first on the library search path in which each of those names is a one-line linker script
//! pointing at the static archive (`libgcc_s` at gcc's static unwinder `libgcc_eh.a`), and passes `-static
//! -no-pie` for the binary. `tests/static_binary.rs` checks the result has no `PT_INTERP` and no `PT_DYNAMIC`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The libraries rustc's gnu target names, and the static archive each one stands for.
const LIBS: [(&str, &str); 7] = [
    ("c", "libc.a"),
    ("m", "libm.a"),
    ("rt", "librt.a"),
    ("pthread", "libpthread.a"),
    ("dl", "libdl.a"),
    ("util", "libutil.a"),
    ("gcc_s", "libgcc_eh.a"),
];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let stubs = out.join("static-stubs");
    std::fs::create_dir_all(&stubs).expect("create static-stubs dir");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    for (name, archive) in LIBS {
        let path = archive_path(&cc, archive);
        let script = format!("INPUT({})\n", path.display());
        for file in [format!("lib{name}.so"), format!("lib{name}.a")] {
            std::fs::write(stubs.join(file), &script).expect("write linker script stub");
        }
    }
    // A linker argument, not `rustc-link-search`: only the binary links statically, not the test harnesses.
    // Every `-L` applies to every `-l` wherever it appears, ahead of the compiler's default directories.
    println!("cargo:rustc-link-arg-bins=-L{}", stubs.display());
    println!("cargo:rustc-link-arg-bins=-no-pie");
    println!("cargo:rustc-link-arg-bins=-static");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
}

/// Asks the C compiler where a static archive lives; panics with a hint if it is not installed.
fn archive_path(cc: &str, archive: &str) -> PathBuf {
    let out = Command::new(cc).arg(format!("-print-file-name={archive}")).output();
    let out = out.unwrap_or_else(|e| panic!("cannot run {cc} to locate {archive}: {e}"));
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_absolute() && Path::new(&path).is_file(),
        "{archive} not found (install libc6-dev and gcc): ignite-init links statically"
    );
    path
}
