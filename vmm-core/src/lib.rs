//! vmm-core: the ignite KVM engine.
//!
//! A [`VmConfig`] describes a microVM; [`Vm::start`] builds it on `/dev/kvm` (guest memory, in-kernel
//! irqchip and PIT, vCPUs, legacy and virtio-mmio devices), loads a Linux kernel and returns a
//! [`VmHandle`] to pause, resume, stop and wait for the VM. One thread runs each vCPU and one thread
//! runs the device event loop. A VM whose config has a [`jail::JailConfig`] jails its own process
//! before any of those threads start.

pub mod arch;
pub mod boot;
pub mod bus;
pub mod config;
pub mod control;
pub mod devices;
mod event_loop;
pub mod exit;
pub mod host;
pub mod jail;
pub mod log_file;
pub mod process;
pub mod snapshot;
mod vcpu;
pub mod vm;

pub use config::{ConfigError, ConsoleConfig, DiskConfig, NetConfig, VirtModeConfig, VmConfig, VsockConfig};
pub use exit::ExitReason;
pub use host::VirtMode;
pub use vm::{Vm, VmCounters, VmError, VmExit, VmHandle};
