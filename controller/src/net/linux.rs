//! [`HostNet`] on Linux: `ip` for links and addresses, `iptables` (nat table) for port forwards and
//! (filter table) for keeping guests away from the host, /proc/sys for forwarding. Only ignite's own chains and `ign*` taps are ever changed.

use std::net::Ipv4Addr;
use std::process::Command;

use tracing::debug;

use super::{HostNet, NetConfig, NetError, PortForward, TAP_PREFIX};
use crate::api::Protocol;

const DNAT_CHAIN: &str = "IGNITE-DNAT";
const POST_CHAIN: &str = "IGNITE-POSTROUTING";
const FORWARD_CHAIN: &str = "IGNITE-FORWARD";
const INPUT_CHAIN: &str = "IGNITE-INPUT";
const COMMENT_PREFIX: &str = "ignite:";

/// The real host network. See the module docs.
#[derive(Debug, Default)]
pub struct LinuxHostNet {
    _private: (),
}

impl LinuxHostNet {
    /// The host network of the current network namespace.
    pub fn new() -> Self {
        Self::default()
    }
}

fn run(program: &str, args: &[&str]) -> Result<String, NetError> {
    let command = format!("{program} {}", args.join(" "));
    debug!(command, "host network");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(NetError::Command { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `iptables -w` (waiting for the xtables lock held by other tools).
fn iptables(args: &[&str]) -> Result<String, NetError> {
    let mut all = vec!["-w"];
    all.extend_from_slice(args);
    run("iptables", &all)
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn sysctl(path: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(path, value).map_err(|source| NetError::Sysctl { path: path.to_string(), source })
}

/// Creates `chain` in `table` if missing and makes sure `hook` jumps to it with `matches`.
fn ensure_chain(table: &str, chain: &str, hook: &str, matches: &[&str]) -> Result<(), NetError> {
    if iptables(&["-t", table, "-S", chain]).is_err() {
        iptables(&["-t", table, "-N", chain])?;
    }
    let mut rule: Vec<&str> = vec!["-t", table, "-C", hook];
    rule.extend_from_slice(matches);
    rule.extend_from_slice(&["-j", chain]);
    if iptables(&rule).is_err() {
        rule[2] = "-I";
        iptables(&rule)?;
    }
    Ok(())
}

/// Appends `rule` to `chain` unless it is already there.
fn ensure_rule(table: &str, chain: &str, rule: &[&str]) -> Result<(), NetError> {
    let mut check: Vec<&str> = vec!["-t", table, "-C", chain];
    check.extend_from_slice(rule);
    if iptables(&check).is_err() {
        check[2] = "-A";
        iptables(&check)?;
    }
    Ok(())
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// Parses one `iptables -S IGNITE-DNAT` line back into a forward.
fn parse_forward(line: &str) -> Option<PortForward> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let after = |flag: &str| tokens.iter().position(|t| *t == flag).and_then(|i| tokens.get(i + 1)).copied();
    let vm = after("--comment")?.trim_matches('"').strip_prefix(COMMENT_PREFIX)?.to_string();
    let protocol = match after("-p")? {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    let host_port = after("--dport")?.parse().ok()?;
    let (ip, port) = after("--to-destination")?.split_once(':')?;
    Some(PortForward {
        vm,
        host_port,
        guest_ip: ip.parse::<Ipv4Addr>().ok()?,
        guest_port: port.parse().ok()?,
        protocol,
    })
}

fn forward_rule(f: &PortForward) -> Vec<String> {
    let comment = format!("{COMMENT_PREFIX}{}", f.vm);
    let to = format!("{}:{}", f.guest_ip, f.guest_port);
    let p = proto(f.protocol);
    [
        "-p",
        p,
        "-m",
        p,
        "--dport",
        &f.host_port.to_string(),
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        "DNAT",
        "--to-destination",
        &to,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl HostNet for LinuxHostNet {
    fn ensure_bridge(&self, config: &NetConfig) -> Result<(), NetError> {
        let br = config.bridge.as_str();
        if !link_exists(br) {
            run("ip", &["link", "add", "name", br, "type", "bridge"])?;
        }
        let address = format!("{}/{}", config.subnet.gateway(), config.subnet.prefix_len());
        run("ip", &["addr", "replace", &address, "dev", br])?;
        run("ip", &["link", "set", br, "up"])?;
        // Forwarding for connections from outside; route_localnet so the host's own
        // connections to 127.0.0.1:PORT can be DNATed to a VM.
        sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        sysctl(&format!("/proc/sys/net/ipv4/conf/{br}/route_localnet"), "1")?;
        ensure_chain("nat", DNAT_CHAIN, "PREROUTING", &["-m", "addrtype", "--dst-type", "LOCAL"])?;
        ensure_chain("nat", DNAT_CHAIN, "OUTPUT", &["-m", "addrtype", "--dst-type", "LOCAL"])?;
        ensure_chain("nat", POST_CHAIN, "POSTROUTING", &[])?;
        ensure_chain("filter", FORWARD_CHAIN, "FORWARD", &[])?;
        ensure_rule("nat", POST_CHAIN, &["-s", "127.0.0.0/8", "-o", br, "-j", "MASQUERADE"])?;
        let subnet = config.subnet.to_string();
        if config.masquerade {
            ensure_rule("nat", POST_CHAIN, &["-s", &subnet, "!", "-o", br, "-j", "MASQUERADE"])?;
        }
        ensure_rule("filter", FORWARD_CHAIN, &["-o", br, "-j", "ACCEPT"])?;
        ensure_rule("filter", FORWARD_CHAIN, &["-i", br, "-j", "ACCEPT"])?;
        // Guests reach no service of the host: not its loopback (which route_localnet above would
        // otherwise route to), not the gateway address, not any other address of the host. Only
        // replies to connections the host made (port forwards, the host talking to a guest) come in.
        ensure_chain("filter", INPUT_CHAIN, "INPUT", &["-i", br])?;
        ensure_rule("filter", INPUT_CHAIN, &["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])?;
        ensure_rule("filter", INPUT_CHAIN, &["-j", "DROP"])?;
        // No IPv6 on the bridge, so no link-local address of the host for guests to reach either.
        let ipv6 = format!("/proc/sys/net/ipv6/conf/{br}/disable_ipv6");
        if std::path::Path::new(&ipv6).exists() {
            sysctl(&ipv6, "1")?;
        }
        Ok(())
    }

    fn create_tap(&self, name: &str, bridge: &str) -> Result<(), NetError> {
        if !link_exists(name) {
            run("ip", &["tuntap", "add", "dev", name, "mode", "tap"])?;
        }
        run("ip", &["link", "set", name, "master", bridge])?;
        run("ip", &["link", "set", name, "up"])?;
        Ok(())
    }

    fn delete_tap(&self, name: &str) -> Result<(), NetError> {
        if link_exists(name) {
            run("ip", &["link", "del", "dev", name])?;
        }
        Ok(())
    }

    fn list_taps(&self) -> Result<Vec<String>, NetError> {
        let mut taps: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map_err(|source| NetError::Spawn { command: "read /sys/class/net".into(), source })?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.starts_with(TAP_PREFIX) && std::path::Path::new("/sys/class/net").join(n).join("tun_flags").exists()
            })
            .collect();
        taps.sort();
        Ok(taps)
    }

    fn add_port_forward(&self, forward: &PortForward) -> Result<(), NetError> {
        let rule = forward_rule(forward);
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        ensure_rule("nat", DNAT_CHAIN, &rule)
    }

    fn remove_port_forwards(&self, vm: &str) -> Result<(), NetError> {
        let listing = match iptables(&["-t", "nat", "-S", DNAT_CHAIN]) {
            Ok(l) => l,
            Err(_) => return Ok(()), // no chain: nothing was ever forwarded
        };
        for f in listing.lines().filter_map(parse_forward).filter(|f| f.vm == vm) {
            let rule = forward_rule(&f);
            let mut args: Vec<&str> = vec!["-t", "nat", "-D", DNAT_CHAIN];
            args.extend(rule.iter().map(String::as_str));
            iptables(&args)?;
        }
        Ok(())
    }

    fn list_port_forwards(&self) -> Result<Vec<PortForward>, NetError> {
        match iptables(&["-t", "nat", "-S", DNAT_CHAIN]) {
            Ok(listing) => Ok(listing.lines().filter_map(parse_forward).collect()),
            Err(_) => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_listing_parses_back_into_forwards() {
        let line = "-A IGNITE-DNAT -p tcp -m tcp --dport 8080 -m comment --comment ignite:web -j DNAT --to-destination 10.61.0.2:80";
        let f = parse_forward(line).unwrap();
        assert_eq!(
            f,
            PortForward {
                vm: "web".into(),
                host_port: 8080,
                guest_ip: Ipv4Addr::new(10, 61, 0, 2),
                guest_port: 80,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(forward_rule(&f).join(" "), line.trim_start_matches("-A IGNITE-DNAT "));
        assert!(
            parse_forward("-A IGNITE-DNAT -p tcp --dport 1 -j DNAT --to-destination 1.2.3.4:5").is_none(),
            "not ours"
        );
        assert!(parse_forward("-N IGNITE-DNAT").is_none());
    }
}
