#!/usr/bin/env python3
"""Writes the seed corpus under fuzz/corpus/<target>/: valid inputs taken from the unit tests' fixtures
(the requests of vmm-core's device tests, the example manifests, the config drive of ignite-init's tests,
small layers like image-store's tests build). Run from anywhere; it rewrites the seed files it owns
(`seed-*`) and leaves files libFuzzer or a developer added alone.

The virtio targets read the "guest program" format documented in fuzz/src/lib.rs; `Program` below
writes it.
"""

import gzip
import io
import json
import os
import shutil
import struct
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "corpus")

R, W = False, True
# GuestDriver: rings at the bottom of guest memory, buffers from 1 MiB up (8 MiB in all).
HDR, DATA, DATA2, STATUS, BACK = 0x10_0000, 0x20_0000, 0x30_0000, 0x40_0000, 0x50_0000
OUTSIDE = 0x7FFF_0000_0000


class Program:
    """A guest program (fuzz/src/lib.rs)."""

    def __init__(self, prefix=b""):
        self.b = bytearray(prefix)

    @staticmethod
    def addr(a):
        if a >= 1 << 32:
            return struct.pack("<BQ", 0xFF, a)
        return struct.pack("<BI", 0, a)

    def desc(self, q, index, addr, length, flags, nxt):
        self.b += bytes([0, q]) + struct.pack("<H", index) + self.addr(addr) + struct.pack("<IHH", length, flags, nxt)
        return self

    def avail(self, q, head):
        self.b += bytes([1, q]) + struct.pack("<H", head)
        return self

    def poke(self, addr, data):
        self.b += bytes([2]) + struct.pack("<IH", addr, len(data)) + data
        return self

    def kick(self, q):
        self.b += bytes([3, q])
        return self

    def chain(self, q, descs):
        self.b += bytes([4, q, len(descs) - 1])
        for addr, length, writable in descs:
            self.b += self.addr(addr) + struct.pack("<IB", length, 1 if writable else 0)
        return self

    def backend(self, data):
        self.b += bytes([5]) + struct.pack("<H", len(data)) + data
        return self


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes(data))


def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


IN, OUT, FLUSH, GET_ID = 0, 1, 4, 8


def blk_seeds():
    # block/tests.rs write_then_read_back_round_trips_through_the_file
    pattern = bytes((i * 7 + 1) & 0xFF for i in range(1024))
    p = Program(b"\x00").poke(HDR, blk_header(OUT, 2)).poke(DATA, pattern[:512]).poke(DATA2, pattern[512:])
    p.chain(0, [(HDR, 16, R), (DATA, 512, R), (DATA2, 512, R), (STATUS, 1, W)]).kick(0)
    p.poke(HDR, blk_header(IN, 2)).chain(0, [(HDR, 16, R), (BACK, 1024, W), (STATUS, 1, W)]).kick(0)
    write("virtio_blk", "write-read", p.b)
    # header_and_status_may_share_descriptors_with_data
    p = Program(b"\x00").poke(HDR, blk_header(OUT, 1) + b"\xab" * 512)
    write("virtio_blk", "shared-descriptors", p.chain(0, [(HDR, 16 + 512, R), (STATUS, 4, W)]).kick(0).b)
    # flush_and_get_id_succeed
    p = Program(b"\x00").poke(HDR, blk_header(FLUSH, 0)).chain(0, [(HDR, 16, R), (STATUS, 1, W)]).kick(0)
    p.poke(DATA, blk_header(GET_ID, 0)).chain(0, [(DATA, 16, R), (BACK, 20, W), (STATUS, 1, W)]).kick(0)
    write("virtio_blk", "flush-get-id", p.b)
    # read_only_disk_rejects_writes_and_serves_reads, unknown_request_types_are_unsupported
    p = Program(b"\x01").poke(HDR, blk_header(OUT, 0)).chain(0, [(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)])
    p.poke(DATA2, blk_header(11, 0)).chain(0, [(DATA2, 16, R), (DATA, 512, R), (STATUS, 1, W)]).kick(0)
    write("virtio_blk", "read-only-unsupported", p.b)
    # bad_sectors_and_lengths_are_io_errors, buffers_outside_guest_memory_are_io_errors_or_dropped
    p = Program(b"\x00").poke(HDR, blk_header(IN, 7)).chain(0, [(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)])
    p.chain(0, [(HDR, 16, R), (OUTSIDE, 512, W), (STATUS, 1, W)]).chain(0, [(HDR, 8, R), (STATUS, 1, W)]).kick(0)
    write("virtio_blk", "bad-requests", p.b)
    # descriptor_loops_and_huge_lengths_neither_hang_nor_panic
    p = Program(b"\x00").poke(HDR, blk_header(IN, 0)).desc(0, 0, HDR, 16, 1, 1).desc(0, 1, DATA, 512, 3, 0)
    write("virtio_blk", "loop", p.avail(0, 0).kick(0).b)


MAC = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])


def eth(ethertype, payload, src=MAC):
    return b"\xff" * 6 + src + struct.pack(">H", ethertype) + payload


def ipv4(src, dst):
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0, bytes(src), bytes(dst))
    return hdr + b"\x00" * 26


def arp(sender_ip):
    return struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC, bytes(sender_ip), b"\x00" * 6, bytes([10, 0, 0, 1]))


def net_seeds():
    vnet = b"\x01" + b"\x00" * 11  # NEEDS_CSUM, never negotiated (net/tests.rs guest_frame)
    frames = [
        eth(0x88B5, b"\x07" * 46),
        eth(0x0800, ipv4([10, 0, 0, 2], [10, 0, 0, 1])),
        eth(0x0806, arp([10, 0, 0, 2])),
        eth(0x0800, ipv4([10, 0, 0, 9], [10, 0, 0, 1])),  # forged IPv4 source
        eth(0x88B5, b"\x07" * 46, src=bytes([2, 0, 0, 0, 0, 1])),  # forged MAC
        eth(0x8100, b"\x00" * 46),  # VLAN tag
    ]
    p = Program(b"\x01")
    for i, frame in enumerate(frames):
        at = DATA + 0x1000 * i
        p.poke(at, vnet + frame).chain(1, [(at, len(vnet) + len(frame), R)])
    write("virtio_net_tx", "tx-frames", p.kick(1).b)
    # Header and frame split over descriptors, and a chain shorter than the header.
    frame = vnet + frames[0]
    p = Program(b"\x00").poke(DATA, frame).chain(1, [(DATA, 5, R), (DATA + 5, len(frame) - 5, R)])
    write("virtio_net_tx", "tx-split", p.chain(1, [(DATA, 4, R)]).kick(1).b)
    # RX: the guest posts buffers, the tap delivers frames.
    p = Program(b"\x00").chain(0, [(BACK, 2048, W)]).chain(0, [(BACK + 0x1000, 16, W)]).kick(0)
    write("virtio_net_tx", "rx", p.backend(b"\x00" * 12 + frames[0]).backend(b"\x00" * 12 + frames[1]).b)


def vsock_hdr(op, src_port, dst_port, payload=b"", src_cid=3, dst_cid=2, flags=0, buf_alloc=65536, fwd_cnt=0):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, len(payload), 1, op, flags, buf_alloc,
                       fwd_cnt) + payload


REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7


def vsock_seeds():
    def rx_buffers(p, n=4):
        for i in range(n):
            p.chain(0, [(BACK + 0x2000 * i, 4096 + 44, W)])
        return p.kick(0)

    def send(p, at, pkt):
        return p.poke(at, pkt).chain(1, [(at, len(pkt), R)]).kick(1)

    # Guest to host: connect to the listening port 1024, exchange data, shut down.
    p = rx_buffers(Program())
    send(p, DATA, vsock_hdr(REQUEST, 5000, 1024))
    p.backend(b"\x01hello from the host")
    send(p, DATA + 0x1000, vsock_hdr(RW, 5000, 1024, b"ping"))
    send(p, DATA + 0x2000, vsock_hdr(CREDIT_REQUEST, 5000, 1024))
    send(p, DATA + 0x3000, vsock_hdr(SHUTDOWN, 5000, 1024, flags=3))
    write("vsock", "guest-connect", rx_buffers(p).b)
    # Host to guest: a client's CONNECT line, the guest's RESPONSE, data both ways, RST.
    p = rx_buffers(Program()).backend(b"\x00CONNECT 52\nearly data")
    send(p, DATA, vsock_hdr(RESPONSE, 52, 1 << 30))
    send(p, DATA + 0x1000, vsock_hdr(RW, 52, 1 << 30, b"pong"))
    p.backend(b"\x01more")
    send(p, DATA + 0x2000, vsock_hdr(CREDIT_UPDATE, 52, 1 << 30, fwd_cnt=4))
    send(p, DATA + 0x3000, vsock_hdr(RST, 52, 1 << 30))
    write("vsock", "host-connect", rx_buffers(p).b)
    # Packets for nobody, a foreign source cid, a port nothing listens on, a truncated packet.
    p = rx_buffers(Program())
    send(p, DATA, vsock_hdr(RW, 1, 2, b"x"))
    send(p, DATA + 0x1000, vsock_hdr(REQUEST, 1, 2, src_cid=7))
    send(p, DATA + 0x2000, vsock_hdr(REQUEST, 1, 9999))
    hdr = vsock_hdr(RW, 1, 2, b"abcdef")
    send(p, DATA + 0x3000, hdr[:-3])
    write("vsock", "orphans", rx_buffers(p).b)


def mmio_seeds():
    def wr(offset, value):
        return bytes([0x41]) + struct.pack("<HI", offset, value)

    def rd(offset):
        return bytes([0x40]) + struct.pack("<H", offset)

    def poke(addr, data):
        return bytes([0x02]) + struct.pack("<HIB", 0, addr, len(data)) + data

    def desc(addr, length, flags, nxt):
        return struct.pack("<QIHH", addr, length, flags, nxt)

    desc_at, avail_at, used_at = 0x1000, 0x2000, 0x3000

    def init(queues):
        # block/tests.rs request_through_the_mmio_transport_like_a_guest_driver
        b = bytearray()
        for off in (0x00, 0x04, 0x08, 0x0C, 0x10):
            b += rd(off)
        b += wr(0x70, 1) + wr(0x70, 3) + wr(0x24, 1) + wr(0x20, 1) + wr(0x70, 0xB) + rd(0x70)
        for q in range(queues):
            base = 0x4000 * q
            b += wr(0x30, q) + rd(0x34) + wr(0x38, 8)
            b += wr(0x80, desc_at + base) + wr(0x90, avail_at + base) + wr(0xA0, used_at + base) + wr(0x44, 1)
        return b + wr(0x70, 0xF) + rd(0x70) + rd(0x100) + rd(0x104)

    def request(q, descs):
        base = 0x4000 * q
        b = bytearray()
        for i, d in enumerate(descs):
            b += poke(desc_at + base + 16 * i, desc(*d))
        b += poke(avail_at + base, struct.pack("<HHH", 0, 1, 0))
        return b + wr(0x50, q) + b"\x03\x00\x00" + rd(0x60) + wr(0x64, 1)

    # rng: one writable buffer
    write("virtio_mmio", "rng", bytes([0]) + init(1) + request(0, [(DATA, 64, 2, 0)]))
    # block: an OUT request, as in the transport test
    blk = init(1) + poke(HDR, blk_header(OUT, 3)) + poke(DATA, b"\x42" * 200)
    blk += request(0, [(HDR, 16, 1, 1), (DATA, 512, 1, 2), (STATUS, 1, 2, 0)])
    write("virtio_mmio", "block", bytes([1]) + blk + wr(0x70, 0) + rd(0x70))
    # net: one TX frame
    frame = b"\x00" * 12 + eth(0x88B5, b"\x07" * 46)
    frame = frame.replace(MAC, bytes([0x52, 0x54, 0, 0, 0, 1]))
    write("virtio_mmio", "net", bytes([2]) + init(2) + poke(DATA, frame) + request(1, [(DATA, len(frame), 0, 0)]))
    # vsock: a REQUEST to a port nothing listens on, and an RX buffer for the RST
    pkt = vsock_hdr(REQUEST, 5000, 1024)
    vs = init(3) + request(0, [(BACK, 4096, 2, 0)]) + poke(DATA, pkt) + request(1, [(DATA, len(pkt), 0, 0)])
    write("virtio_mmio", "vsock", bytes([3]) + vs)


def manifest_seeds():
    fixtures = ["examples/fleet/hello.yaml", "examples/fleet/web.yaml", "manifests/examples/vm.yaml"]
    texts = []
    for path in fixtures:
        with open(os.path.join(REPO, path), "rb") as f:
            texts.append(f.read())
        write("manifest", os.path.basename(os.path.dirname(path)) + "-" + os.path.basename(path), texts[-1])
    # Two documents in one file, and the same VM declared in two files (split at NUL).
    write("manifest", "two-documents", texts[0] + b"---\n" + texts[1])
    write("manifest", "two-files", texts[0] + b"\x00" + texts[0])
    write("manifest", "flow-style", b"apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata: {name: a}\n"
          b"spec: {image: busybox, network: {ports: [\"8080:80\", \"53:53/udp\"]}}\n")


def config_drive(config):
    payload = json.dumps(config, separators=(",", ":")).encode()
    data = b"IGNITECFG1\n" + struct.pack("<I", len(payload)) + payload
    return data + b"\x00" * (-len(data) % 512)


def config_drive_seeds():
    # ignite-init config.rs tests: sample()
    sample = {
        "hostname": "web-1",
        "command": ["/bin/sh", "-c"],
        "args": None,
        "env": {"FOO": "bar"},
        "workingDir": None,
        "user": "1000:1000",
        "dns": ["10.0.0.1"],
        "authorizedKeys": ["ssh-ed25519 AAAA test"],
        "files": [{"path": "/etc/x", "mode": 0o640, "content": "aGkK"}],
        "join": {"configPath": "/etc/kubeadm.yaml", "config": "token: abcdef.0123456789abcdef", "command": [],
                 "redact": ["abcdef.0123456789abcdef"]},
    }
    write("config_drive", "sample", config_drive(sample))
    write("config_drive", "empty", config_drive({}))
    write("config_drive", "truncated", config_drive(sample)[:40])


def tar_layer(build, compress=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        build(tar)
    data = buf.getvalue().rstrip(b"\x00")
    data += b"\x00" * (-len(data) % 512 + 1024)  # the two zero blocks that end an archive
    return gzip.compress(data, mtime=0) if compress else data


def add(tar, name, kind=tarfile.REGTYPE, data=b"", link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.size, info.mtime = kind, mode, link, len(data), 1700000000
    tar.addfile(info, io.BytesIO(data) if data else None)


def tar_seeds():
    def base(tar):
        add(tar, "etc", tarfile.DIRTYPE, mode=0o755)
        add(tar, "etc/hostname", data=b"base\n")
        add(tar, "bin", tarfile.DIRTYPE, mode=0o755)
        add(tar, "bin/sh", data=b"#!shell\n", mode=0o755)
        add(tar, "bin/ash", tarfile.LNKTYPE, link="bin/sh")
        add(tar, "usr/lib", tarfile.SYMTYPE, link="/lib")
        add(tar, "tmp/fifo", tarfile.FIFOTYPE)

    def upper(tar):
        add(tar, "etc/.wh.hostname")
        add(tar, "bin/.wh..wh..opq")
        add(tar, "bin/busybox", data=b"bb", mode=0o4755)
        add(tar, "./etc/./motd", data=b"hi\n")

    def hostile(tar):
        add(tar, "escape", tarfile.SYMTYPE, link="../outside")
        add(tar, "escape/secret", data=b"overwritten")
        add(tar, "abs", tarfile.SYMTYPE, link="/")
        add(tar, "abs/etc/x", data=b"x")
        add(tar, "link", tarfile.LNKTYPE, link="../outside/secret")
        add(tar, "../dotdot", data=b"x")

    write("tar_unpack", "base", tar_layer(base))
    write("tar_unpack", "base-gzip", tar_layer(base, compress=True))
    write("tar_unpack", "whiteouts", tar_layer(upper))
    write("tar_unpack", "hostile", tar_layer(hostile))


def main():
    for target in ("virtio_blk", "virtio_net_tx", "vsock", "virtio_mmio", "manifest", "config_drive", "tar_unpack"):
        d = os.path.join(CORPUS, target)
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name.startswith("seed-"):
                    os.remove(os.path.join(d, name))
    blk_seeds()
    net_seeds()
    vsock_seeds()
    mmio_seeds()
    manifest_seeds()
    config_drive_seeds()
    tar_seeds()


if __name__ == "__main__":
    main()
