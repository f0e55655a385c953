//! Anti-spoofing on transmit: a guest may only send frames from its own MAC address and, when the
//! host gave it one, its own IPv4 address.
//!
//! The check sits in the VMM's device, where every frame of the guest passes and nothing else sees it
//! first: a guest that forges its source cannot impersonate another VM or the gateway on the bridge, nor
//! poison the neighbours' ARP caches. It needs no ebtables or br_netfilter on the host. (Once the VMM
//! itself runs jailed, an escape into it is the jail's concern.)
//!
//! Rules, on the Ethernet frame after the virtio-net header:
//! - the source MAC is the device's own; a frame too short for an Ethernet header is refused;
//! - IPv4 (0x0800): the source address is the lease (or 0.0.0.0 before the guest has one, for DHCP);
//! - ARP (0x0806): the sender hardware address is the device's MAC and the sender protocol address
//!   the lease (or 0.0.0.0: an RFC 5227 probe);
//! - 802.1Q/802.1ad tags are refused: a tagged frame could reach another VLAN on a trunked bridge;
//! - anything else (IPv6 included) passes on the MAC check alone.

use std::net::Ipv4Addr;

use super::MacAddr;

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;

/// Why a frame the guest sent was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spoof {
    /// Shorter than an Ethernet header, or than the header its EtherType needs.
    Truncated,
    /// The source MAC is not the device's.
    SourceMac,
    /// An IPv4 packet from another address than the lease.
    SourceIpv4,
    /// An ARP packet whose sender is not this guest.
    ArpSender,
    /// A VLAN-tagged frame.
    Tagged,
}

/// What a guest may send as: its MAC and, if it has one, its IPv4 lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceFilter {
    /// The device's MAC address.
    pub mac: MacAddr,
    /// The guest's IPv4 address; `None`: any IPv4 source (a guest whose address the host does not
    /// manage).
    pub ipv4: Option<Ipv4Addr>,
}

impl SourceFilter {
    /// Checks one Ethernet frame (without the virtio-net header).
    pub fn check(&self, frame: &[u8]) -> Result<(), Spoof> {
        if frame.len() < ETH_HEADER {
            return Err(Spoof::Truncated);
        }
        if frame[6..12] != self.mac.bytes() {
            return Err(Spoof::SourceMac);
        }
        let payload = &frame[ETH_HEADER..];
        match u16::from_be_bytes([frame[12], frame[13]]) {
            ETHERTYPE_VLAN | ETHERTYPE_QINQ => Err(Spoof::Tagged),
            ETHERTYPE_IPV4 => {
                // The source address is bytes 12..16 of the IPv4 header.
                let source = payload.get(12..16).ok_or(Spoof::Truncated)?;
                if self.allowed_ipv4(source) {
                    Ok(())
                } else {
                    Err(Spoof::SourceIpv4)
                }
            }
            ETHERTYPE_ARP => {
                // Ethernet/IPv4 ARP: sender hardware address at 8..14, sender protocol address at 14..18.
                let sender = payload.get(8..18).ok_or(Spoof::Truncated)?;
                if sender[..6] == self.mac.bytes() && self.allowed_ipv4(&sender[6..]) {
                    Ok(())
                } else {
                    Err(Spoof::ArpSender)
                }
            }
            _ => Ok(()),
        }
    }

    fn allowed_ipv4(&self, source: &[u8]) -> bool {
        match self.ipv4 {
            None => true,
            Some(own) => source == own.octets() || source == [0, 0, 0, 0],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x06, 0, 0x0a, 0x3d, 0, 2];
    const OTHER: [u8; 6] = [0x06, 0, 0x0a, 0x3d, 0, 3];
    const OWN_IP: [u8; 4] = [10, 61, 0, 2];

    fn filter(ipv4: Option<[u8; 4]>) -> SourceFilter {
        SourceFilter { mac: MacAddr::from_bytes(MAC), ipv4: ipv4.map(Ipv4Addr::from) }
    }

    fn eth(src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(source: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0];
        h.extend_from_slice(&source);
        h.extend_from_slice(&[10, 61, 0, 1]);
        h
    }

    fn arp(sha: [u8; 6], spa: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&sha);
        a.extend_from_slice(&spa);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&[10, 61, 0, 1]);
        a
    }

    #[test]
    fn the_guests_own_frames_pass() {
        let f = filter(Some(OWN_IP));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_IPV4, &ipv4(OWN_IP))), Ok(()));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_IPV4, &ipv4([0, 0, 0, 0]))), Ok(()), "DHCP discover");
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_ARP, &arp(MAC, OWN_IP))), Ok(()));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_ARP, &arp(MAC, [0; 4]))), Ok(()), "ARP probe");
        assert_eq!(f.check(&eth(MAC, 0x86dd, &[0x60; 40])), Ok(()), "IPv6 is checked by MAC only");
        assert_eq!(filter(None).check(&eth(MAC, ETHERTYPE_IPV4, &ipv4([192, 168, 1, 9]))), Ok(()));
    }

    #[test]
    fn forged_sources_are_dropped() {
        let f = filter(Some(OWN_IP));
        assert_eq!(f.check(&eth(OTHER, ETHERTYPE_IPV4, &ipv4(OWN_IP))), Err(Spoof::SourceMac));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_IPV4, &ipv4([10, 61, 0, 1]))), Err(Spoof::SourceIpv4), "the gateway");
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_IPV4, &ipv4([127, 0, 0, 1]))), Err(Spoof::SourceIpv4));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_ARP, &arp(MAC, [10, 61, 0, 3]))), Err(Spoof::ArpSender));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_ARP, &arp(OTHER, OWN_IP))), Err(Spoof::ArpSender));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_VLAN, &ipv4(OWN_IP))), Err(Spoof::Tagged));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_QINQ, &ipv4(OWN_IP))), Err(Spoof::Tagged));
    }

    #[test]
    fn short_frames_are_dropped_without_reading_past_them() {
        let f = filter(Some(OWN_IP));
        assert_eq!(f.check(&[]), Err(Spoof::Truncated));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_IPV4, &[])[..13]), Err(Spoof::Truncated));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_IPV4, &[0x45; 15])), Err(Spoof::Truncated));
        assert_eq!(f.check(&eth(MAC, ETHERTYPE_ARP, &[0; 17])), Err(Spoof::Truncated));
    }
}
