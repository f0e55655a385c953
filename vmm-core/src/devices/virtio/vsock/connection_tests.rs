//! The connection state machine and its credit accounting, on real unix socket pairs.

use std::io::{Read, Write};

use super::*;

const CID: u64 = 3;

fn pair() -> (UnixStream, UnixStream) {
    let (vmm, host) = UnixStream::pair().unwrap();
    vmm.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    (vmm, host)
}

/// A packet from the guest's port 1000 to host port 5000 with the given credit.
fn from_guest(op: Op, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: 1000,
        dst_port: 5000,
        kind: TYPE_STREAM,
        op: op as u16,
        buf_alloc,
        fwd_cnt,
        ..Header::default()
    }
}

fn established() -> (Connection, UnixStream) {
    let (vmm, host) = pair();
    let mut conn = Connection::guest_initiated(vmm, CID, &from_guest(Op::Request, 64 * 1024, 0));
    let mut buf = Vec::new();
    assert_eq!(conn.next_rx(4096, &mut buf).unwrap().op(), Some(Op::Response));
    (conn, host)
}

fn drain(host: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match host.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == ErrorKind::WouldBlock => return out,
            Err(err) => panic!("{err}"),
        }
    }
}

#[test]
fn host_initiated_request_then_response_tells_the_host_its_port() {
    let (vmm, mut host) = pair();
    let mut conn = Connection::host_initiated(vmm, CID, 1 << 30, 52);
    let mut buf = Vec::new();
    let req = conn.next_rx(4096, &mut buf).unwrap();
    assert_eq!(
        (req.op(), req.src_cid, req.dst_cid, req.src_port, req.dst_port),
        (Some(Op::Request), 2, 3, 1 << 30, 52)
    );
    assert_eq!((req.buf_alloc, req.fwd_cnt, req.len, req.kind), (CONN_BUF_ALLOC, 0, 0, TYPE_STREAM));
    assert!(conn.next_rx(4096, &mut buf).is_none());
    assert_eq!(conn.interest(), EventSet::empty(), "no data before the guest accepts");

    let mut resp = from_guest(Op::Response, 4096, 0);
    (resp.src_port, resp.dst_port) = (52, 1 << 30);
    conn.on_guest_packet(&resp, &[]);
    assert_eq!(conn.state(), ConnState::Established);
    assert_eq!(drain(&mut host), format!("OK {}\n", 1u32 << 30).into_bytes());
    assert_eq!(conn.interest(), EventSet::IN);
}

#[test]
fn guest_rst_ends_a_pending_connection_silently() {
    let (vmm, _host) = pair();
    let mut conn = Connection::host_initiated(vmm, CID, 1 << 30, 52);
    let mut buf = Vec::new();
    conn.next_rx(4096, &mut buf).unwrap();
    conn.on_guest_packet(&from_guest(Op::Rst, 0, 0), &[]);
    assert!(conn.is_finished());
    assert!(conn.next_rx(4096, &mut buf).is_none());
}

#[test]
fn data_flows_both_ways_within_the_peer_credit() {
    let (mut conn, mut host) = established();
    let mut buf = Vec::new();
    conn.on_guest_packet(&from_guest(Op::Rw, 10, 0), b"hello host");
    assert_eq!(drain(&mut host), b"hello host");

    host.write_all(&[7u8; 100]).unwrap();
    conn.on_host_event(EventSet::IN);
    let rw = conn.next_rx(4096, &mut buf).unwrap();
    assert_eq!((rw.op(), rw.len, rw.fwd_cnt), (Some(Op::Rw), 10, 10), "limited by the guest's buf_alloc of 10");
    assert_eq!(buf, [7u8; 10]);
    assert_eq!(conn.next_rx(4096, &mut buf).unwrap().op(), Some(Op::CreditRequest));
    assert!(conn.next_rx(4096, &mut buf).is_none(), "no credit left");
    assert!(!conn.wants_rx());
    assert!(!conn.interest().contains(EventSet::IN));

    conn.on_guest_packet(&from_guest(Op::CreditUpdate, 10, 10), &[]);
    assert!(conn.wants_rx());
    let rw = conn.next_rx(6, &mut buf).unwrap();
    assert_eq!((rw.len, buf.len()), (6, 6), "limited by the chain's room");

    // A guest fwd_cnt beyond what was sent means no credit, not a huge one.
    conn.on_guest_packet(&from_guest(Op::CreditUpdate, 10, 1000), &[]);
    assert!(conn.next_rx(4096, &mut buf).is_none());
}

#[test]
fn credit_request_is_answered_and_drained_buffers_announce_credit() {
    let (mut conn, mut host) = established();
    let mut buf = Vec::new();
    conn.on_guest_packet(&from_guest(Op::CreditRequest, 4096, 0), &[]);
    let upd = conn.next_rx(4096, &mut buf).unwrap();
    assert_eq!((upd.op(), upd.buf_alloc, upd.fwd_cnt), (Some(Op::CreditUpdate), CONN_BUF_ALLOC, 0));

    // The host does not read: guest data piles up in the socket and then in `to_host`.
    let chunk = vec![1u8; MAX_PAYLOAD];
    let mut sent = 0usize;
    while sent + chunk.len() <= CONN_BUF_ALLOC as usize {
        conn.on_guest_packet(&from_guest(Op::Rw, 4096, 0), &chunk);
        sent += chunk.len();
    }
    assert_eq!(conn.state(), ConnState::Established);
    assert!(!conn.to_host.is_empty(), "the socket buffer should be full");
    assert!(conn.interest().contains(EventSet::OUT));
    let got = drain(&mut host).len();
    conn.on_host_event(EventSet::OUT);
    let total = got + drain(&mut host).len();
    assert_eq!(total, sent);
    let upd = conn.next_rx(4096, &mut buf).unwrap();
    assert_eq!((upd.op(), upd.fwd_cnt), (Some(Op::CreditUpdate), sent as u32));
    assert!(conn.next_rx(4096, &mut buf).is_none());
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let (mut conn, _host) = established();
    let mut buf = Vec::new();
    let chunk = vec![1u8; MAX_PAYLOAD];
    for _ in 0..64 {
        if conn.state() != ConnState::Established {
            break;
        }
        conn.on_guest_packet(&from_guest(Op::Rw, 4096, 0), &chunk);
    }
    assert_eq!(conn.next_rx(4096, &mut buf).unwrap().op(), Some(Op::Rst));
    assert!(conn.is_finished());
}

#[test]
fn host_eof_becomes_shutdown_and_the_guest_rst_finishes() {
    let (mut conn, host) = established();
    let mut buf = Vec::new();
    drop(host);
    conn.on_host_event(EventSet::IN | EventSet::HANG_UP);
    let shut = conn.next_rx(4096, &mut buf).unwrap();
    assert_eq!((shut.op(), shut.flags), (Some(Op::Shutdown), SHUTDOWN_RCV | SHUTDOWN_SEND));
    assert_eq!(conn.state(), ConnState::LocalClosed);
    assert_eq!(conn.interest(), EventSet::empty());
    conn.on_guest_packet(&from_guest(Op::Rw, 4096, 0), b"late");
    assert!(!conn.is_finished());
    conn.on_guest_packet(&from_guest(Op::Rst, 4096, 0), &[]);
    assert!(conn.is_finished());
}

#[test]
fn guest_shutdown_flushes_then_resets() {
    let (mut conn, mut host) = established();
    let mut buf = Vec::new();
    let mut shut = from_guest(Op::Shutdown, 4096, 0);
    shut.flags = SHUTDOWN_SEND;
    conn.on_guest_packet(&from_guest(Op::Rw, 4096, 0), b"last words");
    conn.on_guest_packet(&shut, &[]);
    assert_eq!(drain(&mut host), b"last words", "then end of file: the write side is shut");
    assert_eq!(conn.state(), ConnState::Established, "the host may still answer");
    host.write_all(b"reply").unwrap();
    conn.on_host_event(EventSet::IN);
    assert_eq!(conn.next_rx(4096, &mut buf).unwrap().len, 5);

    shut.flags = SHUTDOWN_RCV;
    conn.on_guest_packet(&shut, &[]);
    assert_eq!(conn.next_rx(4096, &mut buf).unwrap().op(), Some(Op::Rst));
    assert!(conn.is_finished());
}

#[test]
fn unexpected_packets_reset_the_connection() {
    let (mut conn, _host) = established();
    let mut buf = Vec::new();
    conn.on_guest_packet(&from_guest(Op::Request, 4096, 0), &[]);
    assert_eq!(conn.next_rx(4096, &mut buf).unwrap().op(), Some(Op::Rst));
    assert!(conn.is_finished());

    let (mut conn, _host) = established();
    conn.on_guest_packet(&Header { op: 42, ..from_guest(Op::Rw, 0, 0) }, &[]);
    assert_eq!(conn.next_rx(4096, &mut buf).unwrap().op(), Some(Op::Rst));
}
