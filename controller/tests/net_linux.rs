//! The real host network ([`LinuxHostNet`]) inside network namespaces the tests create: a bridge,
//! taps, and port forwards answered by a stand-in guest (a second namespace on a veth pair in
//! place of a VM's tap). Nothing outside the namespaces is touched or addressed.

mod support;

use std::io::Read;
use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::time::Duration;

use controller::api::Protocol;
use controller::net::{tap_name, HostNet, LinuxHostNet, NetConfig, PortForward};
use support::netns::{run_inside, sh_in, Netns};

fn config() -> NetConfig {
    NetConfig { bridge: "ignbr-test".into(), subnet: "10.99.0.0/24".parse().unwrap(), masquerade: true }
}

#[test]
fn bridge_and_taps_are_idempotent_and_listed() {
    if !run_inside("ignite-test-net-taps", "bridge_and_taps_are_idempotent_and_listed") {
        return;
    }
    let net = LinuxHostNet::new();
    net.ensure_bridge(&config()).unwrap();
    net.ensure_bridge(&config()).unwrap();
    let addr = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(addr.trim(), "1");
    let tap = tap_name("web");
    net.create_tap(&tap, "ignbr-test").unwrap();
    net.create_tap(&tap, "ignbr-test").unwrap();
    assert_eq!(net.list_taps().unwrap(), std::slice::from_ref(&tap));
    let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).unwrap();
    assert!(master.ends_with("ignbr-test"), "{master:?}");
    net.delete_tap(&tap).unwrap();
    net.delete_tap(&tap).unwrap();
    assert!(net.list_taps().unwrap().is_empty());
    let rules = std::process::Command::new("iptables").args(["-t", "nat", "-S"]).output().unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(rules.matches("-j IGNITE-DNAT").count() == 2, "one jump from PREROUTING and one from OUTPUT:\n{rules}");
}

/// Serves a TCP greeting on port 80 and a UDP echo on port 53 in the stand-in guest namespace,
/// in its own process group so the whole server can be killed.
const GUEST_SERVERS: &str = r#"
import socket, threading
def udp(s):
    while True:
        data, peer = s.recvfrom(1500); s.sendto(data, peer)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 53))
threading.Thread(target=udp, args=(u,), daemon=True).start()
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", 80)); t.listen(8)
print("ready", flush=True)
while True:
    c, _ = t.accept(); c.sendall(b"guest-says-hi\n"); c.close()
"#;

struct Servers(std::process::Child);

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` (a server script that prints `ready` once its sockets are bound) and returns once it
/// did: a loaded host can take seconds to start Python, and a fixed sleep made the first connection
/// fail now and then (or a check that nothing answers pass for the wrong reason).
fn spawn_ready(mut cmd: std::process::Command) -> Servers {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let servers = Servers(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    assert_eq!(line.trim(), "ready", "a test server did not start");
    servers
}

/// The stand-in guest's TCP (80) and UDP (53) servers.
fn start_guest_servers(guest_ns: &str) -> Servers {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", guest_ns, "python3", "-c", GUEST_SERVERS]);
    spawn_ready(cmd)
}

/// The stand-in guest: its own namespace `name`, linked to the bridge of the test namespace `host`
/// by a veth pair, with the guest address 10.99.0.2 and a default route through the bridge.
fn stand_in_guest(host: &str, name: &str) -> (Netns, Ipv4Addr) {
    let guest = Netns::create(name);
    let guest_ip = Ipv4Addr::new(10, 99, 0, 2);
    sh_in(host, "ip link add ignveth-h type veth peer name ignveth-g");
    sh_in(host, &format!("ip link set ignveth-g netns {}", guest.0));
    sh_in(host, "ip link set ignveth-h master ignbr-test && ip link set ignveth-h up");
    sh_in(
        &guest.0,
        &format!(
            "ip addr add {guest_ip}/24 dev ignveth-g && ip link set ignveth-g up && ip route add default via 10.99.0.1"
        ),
    );
    (guest, guest_ip)
}

fn tcp_answer(addr: (Ipv4Addr, u16)) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn port_forwards_reach_the_guest_from_the_host_and_are_removed() {
    if !run_inside("ignite-test-net-fwd", "port_forwards_reach_the_guest_from_the_host_and_are_removed") {
        return;
    }
    let net = LinuxHostNet::new();
    let cfg = config();
    net.ensure_bridge(&cfg).unwrap();
    let (guest, guest_ip) = stand_in_guest("ignite-test-net-fwd", "ignite-test-net-guest");
    let _servers = start_guest_servers(&guest.0);

    let tcp = PortForward { vm: "web".into(), host_port: 8080, guest_ip, guest_port: 80, protocol: Protocol::Tcp };
    let udp = PortForward { vm: "web".into(), host_port: 5353, guest_ip, guest_port: 53, protocol: Protocol::Udp };
    let other = PortForward { vm: "db".into(), host_port: 9090, guest_ip, guest_port: 90, protocol: Protocol::Tcp };
    for f in [&tcp, &tcp, &udp, &other] {
        net.add_port_forward(f).unwrap();
    }
    let mut listed = net.list_port_forwards().unwrap();
    listed.sort();
    assert_eq!(listed, [other.clone(), udp.clone(), tcp.clone()], "no duplicates");

    assert_eq!(tcp_answer((cfg.subnet.gateway(), 8080)).unwrap().trim(), "guest-says-hi", "via the bridge address");
    assert_eq!(tcp_answer((Ipv4Addr::LOCALHOST, 8080)).unwrap().trim(), "guest-says-hi", "via 127.0.0.1");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    sock.send_to(b"ping", "127.0.0.1:5353").unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping", "UDP echoed by the guest");

    net.remove_port_forwards("web").unwrap();
    net.remove_port_forwards("web").unwrap();
    assert_eq!(net.list_port_forwards().unwrap(), std::slice::from_ref(&other), "only web's rules went");
    assert!(tcp_answer((Ipv4Addr::LOCALHOST, 8080)).is_err(), "nothing answers once the forward is gone");
    net.remove_port_forwards("db").unwrap();
    let rules = String::from_utf8_lossy(
        &std::process::Command::new("iptables").args(["-t", "nat", "-S"]).output().unwrap().stdout,
    )
    .into_owned();
    assert!(!rules.contains("ignite:"), "no tagged rule remains:\n{rules}");
}

/// Whether the stand-in guest gets a TCP answer from `addr:port` (its own namespace's routes).
fn guest_connects(guest_ns: &str, addr: &str, port: u16) -> bool {
    let script = format!(
        "import socket\ns = socket.create_connection(('{addr}', {port}), timeout=2)\nprint(s.recv(64).decode())"
    );
    let out =
        std::process::Command::new("ip").args(["netns", "exec", guest_ns, "python3", "-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains("host-says-hi")
}

/// A TCP server in this (the host's) namespace on `addr:port` that greets every client.
fn host_server(addr: &str, port: u16) -> Servers {
    let script = format!(
        "import socket\nt = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         t.bind(('{addr}', {port})); t.listen(8)\nprint('ready', flush=True)\n\
         while True:\n    c, _ = t.accept(); c.sendall(b'host-says-hi\\n'); c.close()"
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", &script]);
    spawn_ready(cmd)
}

/// Guests reach neither the host's loopback (the bridge has route_localnet for port forwards) nor any
/// host address, the gateway's included; the host still reaches them, and port forwards still work.
#[test]
fn guests_cannot_reach_the_host_only_what_it_forwards() {
    if !run_inside("ignite-test-net-iso", "guests_cannot_reach_the_host_only_what_it_forwards") {
        return;
    }
    let net = LinuxHostNet::new();
    let cfg = config();
    net.ensure_bridge(&cfg).unwrap();
    let (guest, guest_ip) = stand_in_guest("ignite-test-net-iso", "ignite-test-net-iso-guest");
    // The hostile guest routes 127.0.0.0/8 (but its own 127.0.0.1) to its gateway, not its loopback.
    sh_in(
        &guest.0,
        "ip link set lo up && sysctl -qw net.ipv4.conf.all.route_localnet=1 && \
         sysctl -qw net.ipv4.conf.ignveth-g.route_localnet=1 && \
         ip route del local 127.0.0.0/8 dev lo table local && ip route add 127.0.0.0/8 via 10.99.0.1",
    );
    let _loopback = host_server("127.0.0.5", 7001);
    let _gateway = host_server("10.99.0.1", 7002);
    let _servers = start_guest_servers(&guest.0);
    // Both host services answer on the host: what the guest cannot reach below is really there.
    assert_eq!(tcp_answer((Ipv4Addr::new(127, 0, 0, 5), 7001)).unwrap().trim(), "host-says-hi");
    assert_eq!(tcp_answer((Ipv4Addr::new(10, 99, 0, 1), 7002)).unwrap().trim(), "host-says-hi");

    assert!(!guest_connects(&guest.0, "127.0.0.5", 7001), "a guest reached a service on the host's loopback");
    assert!(!guest_connects(&guest.0, "10.99.0.1", 7002), "a guest reached a service on the host's bridge address");
    // The host reaches the guest, directly and through a forward.
    assert_eq!(tcp_answer((guest_ip, 80)).unwrap().trim(), "guest-says-hi");
    let forward = PortForward { vm: "web".into(), host_port: 8081, guest_ip, guest_port: 80, protocol: Protocol::Tcp };
    net.add_port_forward(&forward).unwrap();
    assert_eq!(tcp_answer((Ipv4Addr::LOCALHOST, 8081)).unwrap().trim(), "guest-says-hi", "via 127.0.0.1");
    net.remove_port_forwards("web").unwrap();
}
