//! Talking to the daemon: one connection helper with an error that says what to do next.

use std::path::Path;

use anyhow::Context;
use controller::grpc::proto::{events_client::EventsClient, vms_client::VmsClient};
use tonic::transport::Channel;

/// A tokio runtime for one CLI command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")
}

/// A channel to the daemon on `socket`.
pub async fn channel(socket: &Path) -> anyhow::Result<Channel> {
    controller::grpc::connect(socket).await.with_context(|| {
        format!(
            "no ignite daemon answers on {}: start one with `ignite daemon --dir DIR --kernel VMLINUX` (or --gitops URL), or pass --socket",
            socket.display()
        )
    })
}

/// The VMs client.
pub async fn vms(socket: &Path) -> anyhow::Result<VmsClient<Channel>> {
    Ok(VmsClient::new(channel(socket).await?))
}

/// The events client.
pub async fn events(socket: &Path) -> anyhow::Result<EventsClient<Channel>> {
    Ok(EventsClient::new(channel(socket).await?))
}

/// A gRPC status as a user-facing error (the daemon's message, without transport noise).
pub fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
