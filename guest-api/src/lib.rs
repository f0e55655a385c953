//! The contract between the host and every ignite guest, in one place. Both sides link this crate:
//! `ignite-init` (PID 1 in the guest) and the host side (the image store writes the image config, the
//! controller writes the config drive, boots with [`boot::KERNEL_ARGS`], reads console lines and talks
//! to the exec agent). A change here is a change of the guest ABI: an older `ignite-init` in an image
//! must keep working with a newer host, so fields are added with defaults, never renamed.
//!
//! - [`config`]: the per-VM config drive (`ignite.config=/dev/vdb`): format, codec, limits.
//! - [`image`]: the image configuration the store places at [`image::IMAGE_CONFIG_PATH`] in the root
//!   filesystem, next to `ignite-init` at [`image::INIT_PATH`].
//! - [`boot`]: the kernel command line that starts `ignite-init`, and the console lines it prints that
//!   the host parses (how the main process ended).
//! - [`agent`]: the exec agent's wire protocol on vsock port [`agent::AGENT_PORT`].

pub mod agent;
pub mod boot;
pub mod config;
pub mod image;
