//! The guest MAC address as configured (`aa:bb:cc:dd:ee:ff`).

use std::fmt;
use std::str::FromStr;

/// A unicast Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

/// Why a MAC address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six two-digit hex numbers separated by colons.
    #[error("invalid mac address {0:?}: expected six hex pairs like 52:54:00:12:34:56")]
    Syntax(String),
    /// The group bit is set, so the guest could not use it as its own address.
    #[error("mac address {0} is a multicast address")]
    Multicast(String),
}

impl MacAddr {
    /// The address from its six bytes.
    pub fn from_bytes(bytes: [u8; 6]) -> Self {
        MacAddr(bytes)
    }

    /// The six bytes, in wire order.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, MacError> {
        let syntax = || MacError::Syntax(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(syntax)?;
            // `from_str_radix` alone would accept "+f" or "f", which no MAC notation uses.
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        if bytes[0] & 1 != 0 {
            return Err(MacError::Multicast(s.to_string()));
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.bytes(), [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
    }

    #[test]
    fn bad_strings_are_named_in_the_error() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "52-54-00-ab-cd-0f",
            "5:54:00:ab:cd:0f",
            "+5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err();
            assert_eq!(err, MacError::Syntax(bad.to_string()));
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let err = "01:00:5e:00:00:01".parse::<MacAddr>().unwrap_err();
        assert_eq!(err.to_string(), "mac address 01:00:5e:00:00:01 is a multicast address");
    }
}
