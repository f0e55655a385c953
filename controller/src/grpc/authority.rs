//! Lets every gRPC client in through the unix socket, whatever it sends as `:authority`.
//!
//! The C-core gRPC libraries (Python, C++, Ruby, PHP), grpc-java and grpc-swift send the socket's path
//! (`/run/ignite/ignite.sock`, or percent-encoded) as the HTTP/2 `:authority` of a call over a unix
//! socket. That is not a valid authority, and the HTTP/2 server under tonic resets such a stream with
//! PROTOCOL_ERROR before any service sees it (hyperium/h2#487). An authority means nothing on a unix
//! socket, so the daemon's side of the socket reads the client's bytes through [`AuthorityFix`]: every
//! header block is decoded, an `:authority` that is not a valid one becomes `localhost` (what Go and
//! Rust clients send), and the block is encoded again as plain literals. Everything else passes through
//! unchanged, so a client that sends a valid authority sees no difference.
//!
//! The re-encoded blocks never use the HPACK dynamic table, so the server's decoder stays in step
//! whatever the client's encoder did; the client's own table is followed by this side's decoder.
//! Hostile input is bounded: a header block and its decoded header list are capped
//! ([`MAX_HEADER_BLOCK`], [`MAX_HEADER_LIST`]); a client that passes either loses its connection.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface, passed through as it is.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The size of an HTTP/2 frame header.
const FRAME_HEADER: usize = 9;
/// Frame types and flags this rewriter looks at (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Re-encoded header blocks are cut into frames of at most this size, the smallest maximum a peer
/// must accept (RFC 9113 §4.2), so whatever the server advertised they fit.
const MAX_OUT_FRAME: usize = 16_384;
/// The most header block bytes (a HEADERS frame and its CONTINUATIONs) accepted for one request.
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// The most decoded header bytes (names and values) accepted for one request: HPACK lets a small
/// block reference a large table entry many times.
pub const MAX_HEADER_LIST: usize = 1024 * 1024;
/// What an invalid `:authority` is replaced with.
const LOCAL_AUTHORITY: &[u8] = b"localhost";

/// Why a client's byte stream was refused (its connection is closed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthorityFixError {
    /// The connection did not start with the HTTP/2 preface.
    #[error("not an HTTP/2 connection (the client preface is missing)")]
    NoPreface,
    /// A header block grew past [`MAX_HEADER_BLOCK`].
    #[error("a header block is larger than {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
    /// A decoded header list grew past [`MAX_HEADER_LIST`].
    #[error("a header list is larger than {MAX_HEADER_LIST} bytes once decoded")]
    ListTooLarge,
    /// A frame other than CONTINUATION arrived in the middle of a header block, or a malformed frame.
    #[error("malformed HTTP/2 framing: {0}")]
    Framing(&'static str),
    /// The header block could not be decoded.
    #[error("undecodable header block: {0}")]
    Hpack(String),
}

impl From<AuthorityFixError> for io::Error {
    fn from(e: AuthorityFixError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A header block being collected: the HEADERS frame's stream, flags and priority, and its fragments.
struct PendingBlock {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server half of an HTTP/2 connection, rewritten frame by frame.
pub struct Rewriter {
    preface_left: usize,
    /// Bytes received and not yet consumed (a partial frame header or frame).
    input: Vec<u8>,
    /// Bytes of a frame that passes through unchanged still to come.
    passthrough: usize,
    pending: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter {
            preface_left: PREFACE.len(),
            input: Vec::new(),
            passthrough: 0,
            pending: None,
            decoder: Default::default(),
        }
    }
}

impl Rewriter {
    /// Consumes `data` from the client and appends what the server should read to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), AuthorityFixError> {
        if self.preface_left > 0 {
            let n = self.preface_left.min(data.len());
            let expected = &PREFACE[PREFACE.len() - self.preface_left..][..n];
            if &data[..n] != expected {
                return Err(AuthorityFixError::NoPreface);
            }
            out.extend_from_slice(&data[..n]);
            self.preface_left -= n;
            data = &data[n..];
        }
        loop {
            if self.passthrough > 0 && self.input.is_empty() {
                let n = self.passthrough.min(data.len());
                out.extend_from_slice(&data[..n]);
                self.passthrough -= n;
                data = &data[n..];
            }
            if data.is_empty() && (self.input.len() < FRAME_HEADER || self.passthrough > 0) {
                return Ok(());
            }
            self.input.extend_from_slice(data);
            data = &[];
            if self.input.len() < FRAME_HEADER {
                return Ok(());
            }
            let header = &self.input[..FRAME_HEADER];
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let (kind, flags) = (header[3], header[4]);
            let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            let is_block = kind == HEADERS || kind == CONTINUATION;
            if self.pending.is_some() && kind != CONTINUATION {
                return Err(AuthorityFixError::Framing("a header block was interrupted by another frame"));
            }
            if !is_block {
                // Not a header block: the frame header and whatever of the payload is here go through.
                let have = self.input.len().min(FRAME_HEADER + len);
                out.extend_from_slice(&self.input[..have]);
                self.passthrough = FRAME_HEADER + len - have;
                self.input.drain(..have);
                continue;
            }
            if len > MAX_HEADER_BLOCK {
                return Err(AuthorityFixError::BlockTooLarge);
            }
            if self.input.len() < FRAME_HEADER + len {
                return Ok(());
            }
            let payload: Vec<u8> = self.input.drain(..FRAME_HEADER + len).skip(FRAME_HEADER).collect();
            self.block_frame(kind, flags, stream, &payload, out)?;
        }
    }

    /// Takes one HEADERS or CONTINUATION frame; emits the rewritten block once it is complete.
    fn block_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AuthorityFixError> {
        let fragment = if kind == HEADERS {
            let (priority, fragment) = headers_fragment(flags, payload)?;
            self.pending = Some(PendingBlock { stream, flags, priority, fragment: Vec::new() });
            fragment
        } else {
            match &self.pending {
                Some(block) if block.stream == stream => payload,
                _ => return Err(AuthorityFixError::Framing("a CONTINUATION frame outside a header block")),
            }
        };
        let block = self.pending.as_mut().expect("a header block is pending");
        if block.fragment.len() + fragment.len() > MAX_HEADER_BLOCK {
            return Err(AuthorityFixError::BlockTooLarge);
        }
        block.fragment.extend_from_slice(fragment);
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let block = self.pending.take().expect("a header block is pending");
        let encoded = self.reencode(&block.fragment)?;
        write_block(&block, &encoded, out);
        Ok(())
    }

    /// Decodes a header block and encodes it again as plain literals, with a valid `:authority`.
    fn reencode(&mut self, block: &[u8]) -> Result<Vec<u8>, AuthorityFixError> {
        let mut encoded = Vec::with_capacity(block.len() + 64);
        let mut decoded_size = 0usize;
        let mut too_large = false;
        self.decoder
            .decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| {
                decoded_size += name.len() + value.len();
                if decoded_size > MAX_HEADER_LIST {
                    too_large = true;
                }
                if too_large {
                    return;
                }
                let value: &[u8] =
                    if &*name == b":authority" && !valid_authority(&value) { LOCAL_AUTHORITY } else { &value };
                encode_literal(&name, value, &mut encoded);
            })
            .map_err(|e| AuthorityFixError::Hpack(format!("{e:?}")))?;
        if too_large {
            return Err(AuthorityFixError::ListTooLarge);
        }
        Ok(encoded)
    }
}

/// Splits a HEADERS payload into its priority fields and header block fragment, dropping padding.
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<(Option<[u8; 5]>, &[u8]), AuthorityFixError> {
    let mut rest = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        let (&n, tail) =
            rest.split_first().ok_or(AuthorityFixError::Framing("a padded HEADERS frame without its pad length"))?;
        pad = usize::from(n);
        rest = tail;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        if rest.len() < 5 {
            return Err(AuthorityFixError::Framing("a HEADERS frame too short for its priority"));
        }
        priority = Some(rest[..5].try_into().expect("five bytes"));
        rest = &rest[5..];
    }
    if pad > rest.len() {
        return Err(AuthorityFixError::Framing("HEADERS padding longer than the frame"));
    }
    Ok((priority, &rest[..rest.len() - pad]))
}

/// Whether the HTTP/2 server accepts `value` as an authority.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Appends a "literal header field without indexing, new name" (RFC 7541 §6.2.2), strings not
/// Huffman-coded: the server's decoder table is never touched.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    for s in [name, value] {
        encode_integer(s.len(), 7, 0x00, out);
        out.extend_from_slice(s);
    }
}

/// Appends an HPACK integer with a `prefix`-bit prefix (RFC 7541 §5.1); `first` holds the bits above it.
fn encode_integer(mut value: usize, prefix: u8, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// Writes a rewritten header block as a HEADERS frame (keeping END_STREAM and the priority) and as
/// many CONTINUATION frames as it needs.
fn write_block(block: &PendingBlock, encoded: &[u8], out: &mut Vec<u8>) {
    let mut first = Vec::with_capacity(5);
    if let Some(priority) = block.priority {
        first.extend_from_slice(&priority);
    }
    let room = MAX_OUT_FRAME - first.len();
    let (head, mut rest) = encoded.split_at(encoded.len().min(room));
    first.extend_from_slice(head);
    let mut flags = block.flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame(HEADERS, flags, block.stream, &first, out);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_OUT_FRAME));
        rest = tail;
        frame(CONTINUATION, if rest.is_empty() { END_HEADERS } else { 0 }, block.stream, chunk, out);
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A server-side connection whose incoming bytes go through a [`Rewriter`]; writes pass unchanged.
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet read by the server.
    ready: Vec<u8>,
    ready_from: usize,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        AuthorityFix { inner, rewriter: Rewriter::default(), ready: Vec::new(), ready_from: 0 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_from < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_from);
                buf.put_slice(&this.ready[this.ready_from..this.ready_from + n]);
                this.ready_from += n;
                return Poll::Ready(Ok(()));
            }
            this.ready.clear();
            this.ready_from = 0;
            let mut raw = [0u8; 16 * 1024];
            let mut raw_buf = ReadBuf::new(&mut raw);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw_buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if raw_buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    if let Err(e) = this.rewriter.feed(raw_buf.filled(), &mut this.ready) {
                        tracing::debug!(error = %e, "closing an API connection");
                        return Poll::Ready(Err(e.into()));
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for AuthorityFix<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's encoder, as grpc C-core uses it: literals with incremental indexing, then indexed.
    fn client_block(encoder: &mut loona_hpack::Encoder<'static>, authority: &[u8], path: &[u8]) -> Vec<u8> {
        encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ])
    }

    fn headers_frame(flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(HEADERS, flags, stream, payload, &mut out);
        out
    }

    /// Parses the server-side bytes back into (frame type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut found = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let stream = u32::from_be_bytes(bytes[5..9].try_into().unwrap());
            found.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        found
    }

    fn decode_all(blocks: &[Vec<u8>]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = loona_hpack::Decoder::new();
        blocks.iter().map(|b| decoder.decode(b).unwrap()).collect()
    }

    fn authority_of(headers: &[(Vec<u8>, Vec<u8>)]) -> &[u8] {
        &headers.iter().find(|(n, _)| n == b":authority").unwrap().1
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_the_rest_is_kept() {
        let mut encoder = loona_hpack::Encoder::new();
        let mut client = PREFACE.to_vec();
        // A SETTINGS frame passes through as it is.
        client.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 0x4, 0, 0, 0, 1]);
        let first = client_block(&mut encoder, b"/run/ignite/ignite.sock", b"/ignite.v1alpha1.Host/Info");
        client.extend(headers_frame(END_HEADERS, 1, &first));
        // The second request reuses the client's dynamic table (the authority is an indexed field now).
        let second = client_block(&mut encoder, b"/run/ignite/ignite.sock", b"/ignite.v1alpha1.Vms/List");
        assert!(second.len() < first.len(), "the client's table serves the second block");
        client.extend(headers_frame(END_HEADERS | END_STREAM, 3, &second));

        // Fed a byte at a time: the framing holds across any read boundaries.
        let mut rewriter = Rewriter::default();
        let mut server = Vec::new();
        for byte in &client {
            rewriter.feed(std::slice::from_ref(byte), &mut server).unwrap();
        }
        assert!(server.starts_with(PREFACE));
        let found = frames(&server[PREFACE.len()..]);
        assert_eq!(found[0], (0x4, 0, 0, vec![0, 0x4, 0, 0, 0, 1]));
        assert_eq!((found[1].0, found[1].1, found[1].2), (HEADERS, END_HEADERS, 1));
        assert_eq!((found[2].0, found[2].1, found[2].2), (HEADERS, END_HEADERS | END_STREAM, 3));
        let decoded = decode_all(&[found[1].3.clone(), found[2].3.clone()]);
        assert_eq!(authority_of(&decoded[0]), b"localhost");
        assert_eq!(authority_of(&decoded[1]), b"localhost");
        assert!(decoded[1].contains(&(b":path".to_vec(), b"/ignite.v1alpha1.Vms/List".to_vec())));
        assert_eq!(decoded[0].len(), 6);
    }

    #[test]
    fn a_valid_authority_is_kept_and_a_percent_encoded_path_is_not() {
        for (sent, seen) in [
            (&b"localhost"[..], &b"localhost"[..]),
            (b"ignite.example.com:7443", b"ignite.example.com:7443"),
            (b"%2Frun%2Fignite%2Fignite.sock", b"localhost"),
            (b"unix:/run/ignite/ignite.sock", b"localhost"),
        ] {
            let mut encoder = loona_hpack::Encoder::new();
            let mut client = PREFACE.to_vec();
            client.extend(headers_frame(END_HEADERS, 1, &client_block(&mut encoder, sent, b"/x")));
            let mut server = Vec::new();
            Rewriter::default().feed(&client, &mut server).unwrap();
            let found = frames(&server[PREFACE.len()..]);
            assert_eq!(authority_of(&decode_all(&[found[0].3.clone()])[0]), seen);
        }
    }

    #[test]
    fn continuations_padding_and_priority_are_handled() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = client_block(&mut encoder, b"/s.sock", b"/p");
        let (a, b) = block.split_at(block.len() / 2);
        // A padded HEADERS frame with a priority, then the rest of the block in a CONTINUATION.
        let mut payload = vec![3u8];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut client = PREFACE.to_vec();
        client.extend(headers_frame(PADDED | PRIORITY, 5, &payload));
        frame(CONTINUATION, END_HEADERS, 5, b, &mut client);
        let mut server = Vec::new();
        Rewriter::default().feed(&client, &mut server).unwrap();
        let found = frames(&server[PREFACE.len()..]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].1, END_HEADERS | PRIORITY);
        assert_eq!(&found[0].3[..5], &[0, 0, 0, 0, 16]);
        assert_eq!(authority_of(&decode_all(&[found[0].3[5..].to_vec()])[0]), b"localhost");
    }

    #[test]
    fn a_large_block_is_cut_into_continuations() {
        let mut encoder = loona_hpack::Encoder::new();
        let big = vec![b'a'; 40_000];
        let block = encoder.encode([(&b":authority"[..], &b"/s.sock"[..]), (b"x-big", &big)]);
        let mut client = PREFACE.to_vec();
        let (a, rest) = block.split_at(16_000);
        let (b, c) = rest.split_at(16_000);
        client.extend(headers_frame(0, 7, a));
        frame(CONTINUATION, 0, 7, b, &mut client);
        frame(CONTINUATION, END_HEADERS, 7, c, &mut client);
        let mut server = Vec::new();
        Rewriter::default().feed(&client, &mut server).unwrap();
        let found = frames(&server[PREFACE.len()..]);
        assert_eq!(found.iter().map(|f| f.0).collect::<Vec<_>>(), [HEADERS, CONTINUATION, CONTINUATION]);
        assert!(found.iter().all(|f| f.3.len() <= MAX_OUT_FRAME));
        assert_eq!(found.last().unwrap().1, END_HEADERS);
        let joined: Vec<u8> = found.iter().flat_map(|f| f.3.clone()).collect();
        let headers = &decode_all(&[joined])[0];
        assert_eq!(authority_of(headers), b"localhost");
        assert_eq!(headers[1].1.len(), 40_000);
    }

    #[test]
    fn hostile_streams_are_refused() {
        let mut rewriter = Rewriter::default();
        assert_eq!(rewriter.feed(b"GET / HTTP/1.1\r\n", &mut Vec::new()), Err(AuthorityFixError::NoPreface));

        // A header block that never ends grows past its cap.
        let mut rewriter = Rewriter::default();
        let mut out = Vec::new();
        rewriter.feed(PREFACE, &mut out).unwrap();
        rewriter.feed(&headers_frame(0, 1, &[0x82]), &mut out).unwrap();
        let chunk = vec![0x82u8; 16_000];
        let mut result = Ok(());
        for _ in 0..20 {
            let mut f = Vec::new();
            frame(CONTINUATION, 0, 1, &chunk, &mut f);
            result = rewriter.feed(&f, &mut out);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(AuthorityFixError::BlockTooLarge));

        // A small block that references one large table entry many times.
        let mut encoder = loona_hpack::Encoder::new();
        let mut block = encoder.encode([(&b"x-big"[..], &vec![b'a'; 3000][..])]);
        block.extend(std::iter::repeat_n(0xbe, 1000)); // index 62: the entry just added
        let mut client = PREFACE.to_vec();
        client.extend(headers_frame(END_HEADERS, 1, &block));
        assert_eq!(Rewriter::default().feed(&client, &mut Vec::new()), Err(AuthorityFixError::ListTooLarge));

        // Another frame in the middle of a header block.
        let mut client = PREFACE.to_vec();
        client.extend(headers_frame(0, 1, &[0x82]));
        client.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        assert!(matches!(Rewriter::default().feed(&client, &mut Vec::new()), Err(AuthorityFixError::Framing(_))));
    }

    #[test]
    fn data_frames_stream_through_without_buffering() {
        let mut rewriter = Rewriter::default();
        let mut out = Vec::new();
        rewriter.feed(PREFACE, &mut out).unwrap();
        out.clear();
        // A DATA frame header announcing 100 000 bytes: each piece passes as soon as it arrives.
        let mut f = Vec::new();
        frame(0x0, 0, 1, &[], &mut f);
        f[..3].copy_from_slice(&100_000u32.to_be_bytes()[1..]);
        rewriter.feed(&f, &mut out).unwrap();
        assert_eq!(out.len(), 9);
        rewriter.feed(&[7u8; 1000], &mut out).unwrap();
        assert_eq!(out.len(), 1009);
        rewriter.feed(&vec![7u8; 99_000], &mut out).unwrap();
        assert_eq!(out.len(), 100_009);
        // The next frame is parsed again.
        rewriter.feed(&[0, 0, 0, 0x4, 1, 0, 0, 0, 0], &mut out).unwrap();
        assert_eq!(&out[100_009..], &[0, 0, 0, 0x4, 1, 0, 0, 0, 0]);
    }
}
