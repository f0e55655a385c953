//! The guest agent's exec protocol: `ignite-init` serves it in the guest, the controller is its client.
//!
//! The agent listens on AF_VSOCK port [`AGENT_PORT`]. The host reaches it through the VM's vsock unix
//! socket (`CONNECT 1024\n`, see vmm-core's vsock device). Per connection, one command:
//!
//! 1. The client sends one JSON line, an [`ExecRequest`] (at most [`MAX_REQUEST_LINE`] bytes).
//! 2. Then both sides send frames: a tag byte ([`Tag`]), a big-endian `u32` length, the payload
//!    (at most [`MAX_FRAME`] bytes). The client sends `Stdin` chunks and one `CloseStdin`; the agent
//!    sends `Stdout` and `Stderr` chunks, and last an `Exit` frame (a big-endian `i32`: the status,
//!    or 128 + the signal number), preceded by an `Error` frame (a UTF-8 message) when the command
//!    could not be started (status 127 not found, 126 otherwise).
//!
//! Without `tty` the command gets pipes: stdout and stderr arrive apart. With `tty` it gets a
//! pseudo-terminal (the guest's devpts) as its controlling terminal and its stdin, stdout and
//! stderr: everything arrives as `Stdout`, and the client may send `Resize` frames ([`WindowSize`],
//! also given at start in [`ExecRequest::window`]).
//!
//! Compatibility: fields are only ever added, with defaults, and left out of the line when unset, so
//! a request without a terminal is exactly what the first agents accept. An agent that predates
//! `tty` refuses such a request (an unknown field: `Error` and exit 126) rather than silently
//! giving pipes; a client never sends `Resize` to a session without `tty`.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The vsock port the guest agent listens on (inside the guest; the host reaches it with
/// `CONNECT 1024` on the VM's vsock socket).
pub const AGENT_PORT: u32 = 1024;
/// The longest request line accepted.
pub const MAX_REQUEST_LINE: usize = 256 * 1024;
/// The largest frame payload accepted or sent.
pub const MAX_FRAME: usize = 64 * 1024;

/// One command to run in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables set on top of the main process's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory (empty: the main process's).
    #[serde(default)]
    pub cwd: String,
    /// The user to run as, as in an image's `User` (`name`, `uid`, `name:group`, `uid:gid`; empty:
    /// the main process's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// A pseudo-terminal instead of pipes (since the second protocol revision).
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
    /// The terminal's initial size (only with `tty`; none: the kernel's default, 0x0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowSize>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A terminal's size in character cells, as in `struct winsize`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl WindowSize {
    /// The payload of a `Resize` frame: rows then columns, big-endian `u16`s.
    pub fn encode(self) -> [u8; 4] {
        let (r, c) = (self.rows.to_be_bytes(), self.cols.to_be_bytes());
        [r[0], r[1], c[0], c[1]]
    }

    /// Decodes a `Resize` payload; `None` unless it is exactly 4 bytes.
    pub fn decode(payload: &[u8]) -> Option<WindowSize> {
        let [r0, r1, c0, c1] = <[u8; 4]>::try_from(payload).ok()?;
        Some(WindowSize { rows: u16::from_be_bytes([r0, r1]), cols: u16::from_be_bytes([c0, c1]) })
    }
}

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// Client to agent: bytes for the command's standard input.
    Stdin = 0,
    /// Client to agent: no more standard input (the command's stdin is closed).
    CloseStdin = 1,
    /// Agent to client: bytes the command wrote to its standard output.
    Stdout = 2,
    /// Agent to client: bytes the command wrote to its standard error.
    Stderr = 3,
    /// Agent to client, last: the exit code, a big-endian `i32`.
    Exit = 4,
    /// Agent to client: why the command could not be started (UTF-8), followed by `Exit`.
    Error = 5,
    /// Client to agent, only with `tty`: the terminal's new size ([`WindowSize::encode`]).
    Resize = 6,
}

impl Tag {
    fn from_byte(b: u8) -> Option<Tag> {
        Some(match b {
            0 => Tag::Stdin,
            1 => Tag::CloseStdin,
            2 => Tag::Stdout,
            3 => Tag::Stderr,
            4 => Tag::Exit,
            5 => Tag::Error,
            6 => Tag::Resize,
            _ => return None,
        })
    }
}

/// A protocol violation or a transport failure.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading or writing the connection failed.
    #[error("agent connection")]
    Io(#[from] io::Error),
    /// The request line is not a valid [`ExecRequest`].
    #[error("invalid exec request: {0}")]
    BadRequest(String),
    /// A frame with an unknown tag.
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    /// A frame longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes is longer than {MAX_FRAME}")]
    TooLong(u32),
    /// The stream ended inside a frame or before the request line ended.
    #[error("connection closed in the middle of a message")]
    Truncated,
}

/// Writes one frame (payloads longer than [`MAX_FRAME`] are split into several frames).
pub fn write_frame<W: Write + ?Sized>(w: &mut W, tag: Tag, payload: &[u8]) -> io::Result<()> {
    let mut chunks = payload.chunks(MAX_FRAME).peekable();
    if chunks.peek().is_none() {
        return w.write_all(&encode_header(tag, 0));
    }
    for chunk in chunks {
        let mut buf = Vec::with_capacity(5 + chunk.len());
        buf.extend_from_slice(&encode_header(tag, chunk.len()));
        buf.extend_from_slice(chunk);
        w.write_all(&buf)?;
    }
    Ok(())
}

fn encode_header(tag: Tag, len: usize) -> [u8; 5] {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    [tag as u8, len[0], len[1], len[2], len[3]]
}

/// Reads one frame; `None` at a clean end of stream (between frames).
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<(Tag, Vec<u8>)>, ProtocolError> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let tag = Tag::from_byte(header[0]).ok_or(ProtocolError::UnknownTag(header[0]))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len as usize > MAX_FRAME {
        return Err(ProtocolError::TooLong(len));
    }
    let mut payload = vec![0; len as usize];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => e.into(),
    })?;
    Ok(Some((tag, payload)))
}

/// Writes the request line.
pub fn write_request<W: Write + ?Sized>(w: &mut W, request: &ExecRequest) -> io::Result<()> {
    let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

/// Reads the request line byte by byte (nothing after it is consumed, so the frames that follow stay
/// in `r`).
pub fn read_request<R: Read + ?Sized>(r: &mut R) -> Result<ExecRequest, ProtocolError> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    loop {
        match r.read(&mut byte) {
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        if line.len() > MAX_REQUEST_LINE {
            return Err(ProtocolError::BadRequest(format!("request line longer than {MAX_REQUEST_LINE} bytes")));
        }
    }
    let request: ExecRequest = serde_json::from_slice(&line).map_err(|e| ProtocolError::BadRequest(e.to_string()))?;
    if request.argv.is_empty() || request.argv[0].is_empty() {
        return Err(ProtocolError::BadRequest("argv is empty".into()));
    }
    Ok(request)
}

/// Decodes an `Exit` frame's payload.
pub fn decode_exit(payload: &[u8]) -> Option<i32> {
    <[u8; 4]>::try_from(payload).ok().map(i32::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_long_payloads_are_split() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Tag::Stdout, b"hello").unwrap();
        write_frame(&mut buf, Tag::CloseStdin, &[]).unwrap();
        write_frame(&mut buf, Tag::Stderr, &vec![7u8; MAX_FRAME + 3]).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), Some((Tag::Stdout, b"hello".to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), Some((Tag::CloseStdin, vec![])));
        assert_eq!(read_frame(&mut r).unwrap().unwrap().1.len(), MAX_FRAME);
        assert_eq!(read_frame(&mut r).unwrap(), Some((Tag::Stderr, vec![7u8; 3])));
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn bad_frames_are_rejected() {
        assert!(matches!(read_frame(&mut &[9u8, 0, 0, 0, 0][..]), Err(ProtocolError::UnknownTag(9))));
        assert!(matches!(read_frame(&mut &[2u8, 0xff, 0, 0, 0][..]), Err(ProtocolError::TooLong(_))));
        assert!(matches!(read_frame(&mut &[2u8, 0, 0, 0, 4, b'a'][..]), Err(ProtocolError::Truncated)));
        assert!(matches!(read_frame(&mut &[2u8, 0][..]), Err(ProtocolError::Truncated)));
        assert!(matches!(read_request(&mut &b"{\"argv\":[]}\n"[..]), Err(ProtocolError::BadRequest(_))));
        assert!(matches!(read_request(&mut &b"{\"argv\":[\"ls\"]"[..]), Err(ProtocolError::Truncated)));
        let bad_window = b"{\"argv\":[\"sh\"],\"tty\":true,\"window\":{\"rows\":70000,\"cols\":80}}\n";
        assert!(matches!(read_request(&mut &bad_window[..]), Err(ProtocolError::BadRequest(_))));
    }

    #[test]
    fn requests_without_a_terminal_keep_the_first_revisions_line() {
        let request = ExecRequest { argv: vec!["ls".into()], ..Default::default() };
        let mut line = Vec::new();
        write_request(&mut line, &request).unwrap();
        assert_eq!(line, b"{\"argv\":[\"ls\"],\"env\":[],\"cwd\":\"\"}\n");
        // A line from a first-revision client still reads.
        let old = read_request(&mut &b"{\"argv\":[\"ls\"],\"env\":[[\"A\",\"1\"]],\"cwd\":\"/\"}\n"[..]).unwrap();
        assert!(!old.tty && old.window.is_none());
        assert_eq!(old.env, vec![("A".to_string(), "1".to_string())]);
    }

    #[test]
    fn a_terminal_request_and_resize_frames_round_trip() {
        let window = WindowSize { rows: 33, cols: 132 };
        let request = ExecRequest { argv: vec!["sh".into()], tty: true, window: Some(window), ..Default::default() };
        let mut buf = Vec::new();
        write_request(&mut buf, &request).unwrap();
        write_frame(&mut buf, Tag::Resize, &WindowSize { rows: 1, cols: 65535 }.encode()).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_request(&mut r).unwrap(), request);
        let (tag, payload) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(tag, Tag::Resize);
        assert_eq!(WindowSize::decode(&payload), Some(WindowSize { rows: 1, cols: 65535 }));
        assert_eq!(WindowSize::decode(&[0, 1, 2]), None);
        assert_eq!(WindowSize::decode(&[0, 1, 2, 3, 4]), None);
    }
}
