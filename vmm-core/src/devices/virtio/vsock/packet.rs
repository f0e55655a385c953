//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, 44 bytes, little endian, packed) and
//! moving packets in and out of descriptor chains.

use std::io::{Read, Write};

use virtio_queue::{Reader, Writer};

/// Size of the header in front of every packet.
pub const HDR_LEN: usize = 44;
/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered.
pub const TYPE_STREAM: u16 = 1;
/// The largest payload accepted in or sent by one packet (Linux uses the same bound).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations (virtio 1.2, 5.10.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection refused or torn down.
    Rst = 3,
    /// One or both directions closed (see `flags`).
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// Unsolicited credit information.
    CreditUpdate = 6,
    /// Asks the peer for a credit update.
    CreditRequest = 7,
}

impl Op {
    fn from_raw(raw: u16) -> Option<Op> {
        Some(match raw {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A decoded header. `op` and `kind` stay raw so that a hostile value is still representable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`type` in the spec).
    pub kind: u16,
    /// Operation, raw.
    pub op: u16,
    /// Operation flags (shutdown directions).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// The operation, if it is one the spec defines.
    pub fn op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }

    /// Decodes the wire format.
    pub fn decode(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire format.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The RST answering `pkt` (addresses swapped), for packets that match no connection.
    pub fn rst_for(pkt: &Header) -> Header {
        Header {
            src_cid: pkt.dst_cid,
            dst_cid: pkt.src_cid,
            src_port: pkt.dst_port,
            dst_port: pkt.src_port,
            kind: TYPE_STREAM,
            op: Op::Rst as u16,
            ..Header::default()
        }
    }
}

/// Why a TX chain did not hold a usable packet.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PacketError {
    /// Fewer readable bytes than a header.
    #[error("chain holds {0} bytes, less than a packet header")]
    TooShort(usize),
    /// `len` beyond [`MAX_PAYLOAD`].
    #[error("payload length {0} exceeds the maximum")]
    TooLong(u32),
    /// `len` beyond what the chain holds.
    #[error("payload length {len} but only {available} bytes follow the header")]
    Truncated {
        /// The header's `len`.
        len: u32,
        /// Readable bytes after the header.
        available: usize,
    },
    /// Guest memory could not be read.
    #[error("chain could not be read")]
    Unreadable,
}

/// Reads a header and its payload (into `payload`) from a TX chain.
pub(crate) fn read_packet(reader: &mut Reader<'_>, payload: &mut Vec<u8>) -> Result<Header, PacketError> {
    let available = reader.available_bytes();
    if available < HDR_LEN {
        return Err(PacketError::TooShort(available));
    }
    let mut raw = [0u8; HDR_LEN];
    reader.read_exact(&mut raw).map_err(|_| PacketError::Unreadable)?;
    let hdr = Header::decode(&raw);
    if hdr.len as usize > MAX_PAYLOAD {
        return Err(PacketError::TooLong(hdr.len));
    }
    let available = reader.available_bytes();
    if hdr.len as usize > available {
        return Err(PacketError::Truncated { len: hdr.len, available });
    }
    payload.resize(hdr.len as usize, 0);
    reader.read_exact(payload).map_err(|_| PacketError::Unreadable)?;
    Ok(hdr)
}

/// Writes a packet into an RX chain; returns the bytes written. The caller checked the room.
pub(crate) fn write_packet(writer: &mut Writer<'_>, hdr: &Header, payload: &[u8]) -> std::io::Result<usize> {
    writer.write_all(&hdr.encode())?;
    writer.write_all(payload)?;
    Ok(HDR_LEN + payload.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_with_the_spec_layout() {
        let hdr = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1122_3344,
            dst_port: 1234,
            len: 5,
            kind: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        };
        let raw = hdr.encode();
        assert_eq!(raw[0..8], 3u64.to_le_bytes());
        assert_eq!(raw[16..20], [0x44, 0x33, 0x22, 0x11]);
        assert_eq!(raw[28..32], [1, 0, 5, 0]);
        assert_eq!(raw[40..44], [0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(Header::decode(&raw), hdr);
        assert_eq!(hdr.op(), Some(Op::Rw));
    }

    #[test]
    fn unknown_ops_stay_representable() {
        let hdr = Header { op: 99, ..Header::default() };
        assert_eq!(Header::decode(&hdr.encode()).op, 99);
        assert_eq!(hdr.op(), None);
        assert_eq!(Header { op: 0, ..hdr }.op(), None);
    }

    #[test]
    fn rst_for_swaps_the_addresses() {
        let req = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 7,
            dst_port: 9,
            op: Op::Request as u16,
            len: 4,
            ..Header::default()
        };
        let rst = Header::rst_for(&req);
        assert_eq!((rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port), (2, 3, 9, 7));
        assert_eq!((rst.op(), rst.kind, rst.len), (Some(Op::Rst), TYPE_STREAM, 0));
    }
}
