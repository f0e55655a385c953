//! `ignite-init`: PID 1 inside every ignite guest (mounts, network, the image's entrypoint, reaping,
//! power-off through the ignite power port, vsock agent).
//!
//! Not written yet (issue "controller"): it refuses to run rather than pretend to be an init.

fn main() -> std::process::ExitCode {
    eprintln!("ignite-init: not implemented yet; guests must bring their own /init for now");
    std::process::ExitCode::FAILURE
}
