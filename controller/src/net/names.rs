//! Deterministic per-VM network names: tap device, MAC address, and the kernel's `ip=` argument.

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use super::Subnet;

/// Prefix of every tap ignite creates, so orphans are recognizable.
pub const TAP_PREFIX: &str = "ign";

fn hash(vm: &str) -> [u8; 32] {
    Sha256::digest(vm.as_bytes()).into()
}

/// The tap device of `vm`: `ign` + 10 hex digits of a hash of the name (IFNAMSIZ allows 15).
pub fn tap_name(vm: &str) -> String {
    format!("{TAP_PREFIX}{}", &hex::encode(hash(vm))[..10])
}

/// The MAC address of `vm`: locally administered, unicast, derived from the name so it is the
/// same on every host and after every recreate.
pub fn mac_for(vm: &str) -> String {
    let h = hash(vm);
    let bytes = [0x02, 0x1e, h[0], h[1], h[2], h[3]];
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The Linux `ip=` boot argument (IP_PNP) that configures the guest's `eth0` at boot:
/// `ip=<client>::<gateway>:<netmask>:<hostname>:eth0:off`.
pub fn kernel_ip_arg(ip: Ipv4Addr, subnet: &Subnet, hostname: &str) -> String {
    format!("ip={ip}::{}:{}:{hostname}:eth0:off", subnet.gateway(), subnet.netmask())
}

/// The VM among `others` (name, MAC) whose tap name or MAC address `vm` with `mac` would share:
/// both are hashes of names, so two names can meet, and two VMs must never share a device or an
/// address on the bridge.
pub fn collision<'a>(vm: &str, mac: &str, others: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<String> {
    let tap = tap_name(vm);
    others.into_iter().filter(|(other, _)| *other != vm).find_map(|(other, other_mac)| {
        if tap_name(other) == tap {
            Some(format!("its tap name {tap} is also VM {other:?}'s"))
        } else if other_mac.eq_ignore_ascii_case(mac) {
            Some(format!("its MAC address {mac} is also VM {other:?}'s"))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_mac_or_tap_name_is_found() {
        let web = mac_for("web");
        assert_eq!(collision("web", &web, [("web", web.as_str()), ("db", "02:1e:00:00:00:01")]), None);
        let found = collision("web", &web, [("db", web.to_uppercase().as_str())]).unwrap();
        assert!(found.contains("MAC address") && found.contains("\"db\""), "{found}");
        // A tap name is the same for the same name only; a second record of the VM itself is fine.
        assert!(collision("web", "02:00:00:00:00:09", [("web", "x")]).is_none());
    }

    #[test]
    fn names_are_stable_short_and_distinct() {
        let tap = tap_name("web");
        assert_eq!(tap, tap_name("web"));
        assert!(tap.len() <= 15 && tap.starts_with(TAP_PREFIX));
        assert_ne!(tap, tap_name("web2"));
        let mac = mac_for("web");
        assert_eq!(mac.len(), 17);
        assert!(mac.starts_with("02:1e:"), "locally administered unicast: {mac}");
        assert_ne!(mac, mac_for("db"));
    }

    #[test]
    fn boot_argument_has_the_ip_pnp_shape() {
        let subnet: Subnet = "10.61.0.0/24".parse().unwrap();
        assert_eq!(
            kernel_ip_arg(Ipv4Addr::new(10, 61, 0, 5), &subnet, "web"),
            "ip=10.61.0.5::10.61.0.1:255.255.255.0:web:eth0:off"
        );
    }
}
