//! The daemon side of the per-VM control socket (protocol in [`vmm_core::control`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Why a control request got no usable answer.
#[derive(Debug)]
pub(crate) enum ClientError {
    /// The socket could not be reached or the connection broke: the VMM is gone or stuck.
    Unreachable(std::io::Error),
    /// The VMM answered with an error.
    Refused(String),
}

/// Sends one request line and returns the reply's fields when it says `"ok":true`.
pub(crate) fn request(socket: &Path, request: &Value, timeout: Duration) -> Result<Value, ClientError> {
    let stream = UnixStream::connect(socket).map_err(ClientError::Unreachable)?;
    stream.set_read_timeout(Some(timeout)).map_err(ClientError::Unreachable)?;
    let mut writer = stream.try_clone().map_err(ClientError::Unreachable)?;
    writer.write_all(format!("{request}\n").as_bytes()).map_err(ClientError::Unreachable)?;
    let mut line = String::new();
    let read = BufReader::new(stream).read_line(&mut line).map_err(ClientError::Unreachable)?;
    if read == 0 {
        return Err(ClientError::Unreachable(std::io::ErrorKind::UnexpectedEof.into()));
    }
    let reply: Value =
        serde_json::from_str(&line).map_err(|err| ClientError::Refused(format!("unreadable reply {line:?}: {err}")))?;
    if reply["ok"] == Value::Bool(true) {
        Ok(reply)
    } else {
        Err(ClientError::Refused(reply["error"].as_str().unwrap_or("unknown error").to_string()))
    }
}
