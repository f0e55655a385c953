//! The API over TCP. Whoever reaches the API can start VMs, so TCP is always mutual TLS: the
//! daemon presents its certificate and accepts only clients with a certificate signed by the CA
//! it is given (`--tls-client-ca`); the CLI checks the daemon against its own CA (`--tls-ca`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The daemon's side: its certificate and key, and the CA its clients' certificates must chain to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate (chain) the daemon presents.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA that signs the certificates of the clients allowed in.
    pub client_ca: PathBuf,
}

/// The client's side: the CA the daemon's certificate must chain to, and the client's own
/// certificate and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA that signs the daemon's certificate.
    pub ca: PathBuf,
    /// PEM client certificate.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
}

/// Why the API could not be served or reached over TCP.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read.
    #[error("cannot read the TLS {what} {path}")]
    Read {
        /// Which file (`certificate`, `key`, `client CA`, `CA`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TCP address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The URL is not an `https://HOST:PORT` address.
    #[error("{url:?} is not a daemon address: expected https://HOST:PORT")]
    Url {
        /// What was given.
        url: String,
    },
    /// The TLS configuration was refused, or the connection or handshake failed.
    #[error("{context}")]
    Transport {
        /// What was being done.
        context: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
}

impl ServerTls {
    /// The server configuration: requires a client certificate signed by `client_ca`.
    pub fn config(&self) -> Result<ServerTlsConfig, TlsError> {
        let identity = Identity::from_pem(read("certificate", &self.cert)?, read("key", &self.key)?);
        let ca = Certificate::from_pem(read("client CA", &self.client_ca)?);
        Ok(ServerTlsConfig::new().identity(identity).client_ca_root(ca).client_auth_optional(false))
    }
}

/// Connects to the daemon at `url` (`https://HOST:PORT`) with mutual TLS.
pub async fn connect_tcp(url: &str, tls: &ClientTls) -> Result<Channel, TlsError> {
    let host = url
        .strip_prefix("https://")
        .and_then(|rest| rest.rsplit_once(':').map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']')))
        .filter(|host| !host.is_empty())
        .ok_or_else(|| TlsError::Url { url: url.to_owned() })?;
    let identity = Identity::from_pem(read("certificate", &tls.cert)?, read("key", &tls.key)?);
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("CA", &tls.ca)?))
        .identity(identity)
        .domain_name(host);
    let transport = |context: String| move |source| TlsError::Transport { context, source };
    Endpoint::from_shared(url.to_owned())
        .map_err(transport(format!("{url:?} is not a valid address")))?
        .tls_config(config)
        .map_err(transport("the TLS client configuration was refused".into()))?
        .connect()
        .await
        .map_err(transport(format!("cannot reach the ignite daemon at {url}")))
}
