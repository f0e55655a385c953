//! Scalar types with a string form in manifests: sizes (`512Mi`) and port mappings (`8080:80/tcp`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, written `512Mi`, `4Gi`, `1G`, `100M`, `65536`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(u64);

/// A quantity or port mapping that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// Not a number with a known suffix.
    #[error("invalid quantity {0:?}: expected a number with an optional suffix Ki, Mi, Gi, Ti, k, M, G, T")]
    Syntax(String),
    /// Larger than 2^64 bytes.
    #[error("quantity {0:?} is too large")]
    Overflow(String),
    /// Not `HOST:GUEST[/tcp|udp]` with ports 1..=65535.
    #[error("invalid port mapping {0:?}: expected \"HOST:GUEST[/tcp|udp]\" with ports 1-65535")]
    Port(String),
}

impl Quantity {
    /// A quantity of exactly `bytes` bytes.
    pub const fn from_bytes(bytes: u64) -> Self {
        Quantity(bytes)
    }
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
    /// The size in MiB, rounded down.
    pub const fn mib(self) -> u64 {
        self.0 >> 20
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(split);
        if num.is_empty() {
            return Err(QuantityError::Syntax(s.to_string()));
        }
        let mult: u64 = match suffix {
            "" => 1,
            "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            _ => return Err(QuantityError::Syntax(s.to_string())),
        };
        let n: u64 = num.parse().map_err(|_| QuantityError::Overflow(s.to_string()))?;
        n.checked_mul(mult).map(Quantity).ok_or_else(|| QuantityError::Overflow(s.to_string()))
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, unit) in [("Ti", 1u64 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if self.0 != 0 && self.0.is_multiple_of(unit) {
                return write!(f, "{}{suffix}", self.0 / unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Quantity(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Transport protocol of a port mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// A host port forwarded to a guest port, written `"8080:80/tcp"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortMapping {
    /// Port on the host.
    pub host_port: u16,
    /// Port in the guest.
    pub guest_port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

impl FromStr for PortMapping {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || QuantityError::Port(s.to_string());
        let (ports, protocol) = match s.split_once('/') {
            None => (s, Protocol::Tcp),
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some(_) => return Err(bad()),
        };
        let (host, guest) = ports.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        Ok(PortMapping { host_port: port(host)?, guest_port: port(guest)?, protocol })
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(f, "{}:{}/{proto}", self.host_port, self.guest_port)
    }
}

impl Serialize for PortMapping {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortMapping {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Quantity {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Quantity".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A size: a number of bytes with an optional suffix Ki, Mi, Gi, Ti (powers of 1024) or k, M, G, T (powers of 1000), e.g. 512Mi.",
            "anyOf": [
                {"type": "string", "pattern": "^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$"},
                {"type": "integer", "minimum": 0}
            ]
        })
    }
}

impl schemars::JsonSchema for PortMapping {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortMapping".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A host port forwarded to a guest port: \"HOST:GUEST\" or \"HOST:GUEST/tcp|udp\" (TCP by default).",
            "type": "string",
            "pattern": "^[0-9]{1,5}:[0-9]{1,5}(/(tcp|udp))?$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_print_and_reject_garbage() {
        let q = |s: &str| s.parse::<Quantity>().map(Quantity::bytes);
        assert_eq!(q("512Mi"), Ok(512 << 20));
        assert_eq!(q("1G"), Ok(1_000_000_000));
        assert_eq!(q("65536"), Ok(65536));
        assert!(matches!(q("lots"), Err(QuantityError::Syntax(_))));
        assert!(matches!(q("1.5Gi"), Err(QuantityError::Syntax(_))));
        assert!(matches!(q("99999999999Ti"), Err(QuantityError::Overflow(_))));
        assert_eq!(Quantity::from_bytes(4 << 30).to_string(), "4Gi");
        assert_eq!(Quantity::from_bytes(1000).to_string(), "1000");
    }

    #[test]
    fn port_mappings_parse_and_print() {
        let p: PortMapping = "8080:80".parse().unwrap();
        assert_eq!((p.host_port, p.guest_port, p.protocol), (8080, 80, Protocol::Tcp));
        assert_eq!("53:53/udp".parse::<PortMapping>().unwrap().to_string(), "53:53/udp");
        for bad in ["80", "0:80", "70000:80", "80:80/sctp", "a:b"] {
            assert!(bad.parse::<PortMapping>().is_err(), "{bad}");
        }
    }
}
