//! The daemon's gRPC API (`manifests/proto/ignite.proto`) over a unix socket, and optionally over
//! TCP with mutual TLS: the server the daemon runs, the conversions from store records (secrets
//! redacted), and client connectors.

pub mod authority;
mod convert;
pub mod exec;
pub mod images;
mod server;
mod snapshots;
pub mod standard;
mod templates;
pub mod tls;

use std::path::Path;

pub use server::{serve, serve_tcp, ApiState, VmmJailInfo};

/// The generated protocol types, clients and servers.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("ignite.v1alpha1");

    /// The encoded descriptors of `ignite.proto`, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ignite_descriptor");
}

/// The default socket path.
pub const DEFAULT_SOCKET: &str = "/run/ignite/ignite.sock";

/// A channel to the daemon listening on the unix socket `path`.
pub async fn connect(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the socket.
    tonic::transport::Endpoint::from_static("http://ignite.sock")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
}
