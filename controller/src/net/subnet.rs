//! The IPv4 subnet VMs get their addresses from.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 network, `10.61.0.0/24`. The first host address is the gateway (the bridge); the
/// others go to VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// A subnet that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subnet {input:?}: {reason}")]
pub struct SubnetError {
    input: String,
    reason: &'static str,
}

impl Subnet {
    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask_bits(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0)
    }

    /// The netmask, `255.255.255.0`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    /// The gateway: the first host address, held by the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    fn broadcast(&self) -> u32 {
        u32::from(self.network) | !self.mask_bits()
    }

    /// Whether `ip` is inside the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.network)
    }

    /// Addresses for VMs, lowest first: every host address except the gateway.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + Clone {
        (u32::from(self.network) + 2..self.broadcast()).map(Ipv4Addr::from)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| SubnetError { input: s.to_string(), reason };
        let (addr, len) = s.split_once('/').ok_or_else(|| err("expected ADDRESS/PREFIX, e.g. 10.61.0.0/24"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err("not an IPv4 address"))?;
        let prefix_len: u8 = len.parse().map_err(|_| err("the prefix length is not a number"))?;
        if !(8..=29).contains(&prefix_len) {
            return Err(err("the prefix length must be between 8 and 29"));
        }
        let subnet = Subnet { network: addr, prefix_len };
        if u32::from(addr) & !subnet.mask_bits() != 0 {
            return Err(err("host bits are set: give the network address"));
        }
        Ok(subnet)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl Serialize for Subnet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_hosts_mask_and_errors() {
        let s: Subnet = "10.61.0.0/24".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 61, 0, 1));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        let hosts: Vec<_> = s.hosts().collect();
        assert_eq!(hosts.len(), 253);
        assert_eq!((hosts[0], hosts[252]), (Ipv4Addr::new(10, 61, 0, 2), Ipv4Addr::new(10, 61, 0, 254)));
        assert!(s.contains(Ipv4Addr::new(10, 61, 0, 77)) && !s.contains(Ipv4Addr::new(10, 62, 0, 1)));
        assert_eq!("192.168.4.0/29".parse::<Subnet>().unwrap().hosts().count(), 5);
        for bad in ["10.61.0.0", "10.61.0.1/24", "10.61.0.0/31", "x/24", "10.0.0.0/abc"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        assert_eq!(s.to_string(), "10.61.0.0/24");
    }
}
