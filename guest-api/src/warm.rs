//! Warm start: a VM restored from a template snapshot, and the identity the host hands it.
//!
//! A **template** is a guest that booted the kernel with an initramfs the host builds (its only
//! program is `ignite-init` at [`INITRAMFS_INIT`]) on [`template_kernel_args`]. In template mode
//! `ignite-init` mounts `/proc`, `/sys` and `/dev`, listens on vsock port [`IDENTITY_PORT`], prints
//! [`TEMPLATE_READY`] on the console and waits. It has touched no disk: the host snapshots it then.
//!
//! A **warm VM** is that snapshot restored into a VMM with the VM's own disks (`/dev/vda` root,
//! `/dev/vdb` config drive, both of other sizes than the template's placeholders), tap and sockets. The
//! host connects to [`IDENTITY_PORT`] and sends one JSON line, an [`Identity`]. The guest:
//! 1. sets the wall clock to [`Identity::time_unix_ns`];
//! 2. mixes [`Identity::entropy`] into the kernel's pool and reseeds its RNG, so no two VMs of one
//!    template share random output (`/proc/sys/kernel/random/boot_id` is first read after this);
//! 3. waits (up to [`DISK_WAIT_MS`]) until each of [`Identity::disks`] shows its size in sectors (the
//!    VMM signals a configuration change for every restored disk), then drops the block devices'
//!    cached pages (`BLKFLSBUF`): nothing the template saw of its placeholders survives;
//! 4. sets `eth0`'s MAC, address, prefix and default route from [`Identity::network`];
//! 5. mounts `/dev/vda` (ext4) and writes [`Identity::machine_id`] to `/etc/machine-id`;
//! 6. answers [`REPLY_OK`] (or [`REPLY_ERROR`] and the reason) on the connection, unmounts what it
//!    mounted, switches root to the disk and execs the disk's own `ignite-init` ([`crate::image::INIT_PATH`]),
//!    which boots on as a cold guest does (config drive, entrypoint, exec agent).
//!
//! Rule: the template is built by the same `ignite-init` build that serves it (the template key holds
//! its digest), so this exchange never crosses versions; fields are still only ever added.

use serde::{Deserialize, Serialize};

/// The vsock port the template's `ignite-init` waits on for its [`Identity`].
pub const IDENTITY_PORT: u32 = 1025;
/// The kernel command line parameter that puts `ignite-init` in template mode.
pub const TEMPLATE_PARAM: &str = "ignite.template=1";
/// Where the template initramfs holds `ignite-init` (the kernel's `rdinit=`).
pub const INITRAMFS_INIT: &str = "init";
/// The console line (after [`crate::boot::CONSOLE_PREFIX`]) a template prints when it waits for its
/// identity: the host snapshots it once this line is on the console.
pub const TEMPLATE_READY: &str = "template ready: waiting for an identity";
/// The answer line once the root disk is mounted and `ignite-init` is about to switch to it.
pub const REPLY_OK: &str = "ok";
/// The answer line's prefix when the guest could not take its identity; the reason follows.
pub const REPLY_ERROR: &str = "error: ";
/// The largest identity line a guest reads.
pub const MAX_IDENTITY_LEN: usize = 64 << 10;
/// How long the guest waits for its disks to show their new sizes.
pub const DISK_WAIT_MS: u64 = 10_000;
/// The entropy the host sends, in bytes.
pub const ENTROPY_LEN: usize = 64;

/// The kernel command line a template boots with: the serial console, a reboot or panic ends the VM,
/// `ignite-init` from the initramfs in template mode, the config drive where cold guests have it.
pub fn template_kernel_args() -> String {
    format!(
        "console=ttyS0 reboot=k panic=-1 rdinit=/{INITRAMFS_INIT} {TEMPLATE_PARAM} {}/dev/vdb",
        crate::boot::CONFIG_PARAM
    )
}

/// Everything that makes a warm VM itself rather than a copy of its template.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// The host's wall clock when it sent this, in nanoseconds since the Unix epoch.
    pub time_unix_ns: u64,
    /// [`ENTROPY_LEN`] fresh random bytes from the host, hex.
    pub entropy: String,
    /// The VM's disks in device order (`vda`, `vdb`, ...) with their sizes.
    pub disks: Vec<DiskSize>,
    /// The VM's network, when it has one.
    #[serde(default)]
    pub network: Option<Network>,
    /// 32 lowercase hex digits, written to `/etc/machine-id` on the root disk.
    pub machine_id: String,
}

/// One block device as the VM's VMM serves it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskSize {
    /// The device name under `/sys/block` (`vda`).
    pub device: String,
    /// Its size in 512-byte sectors (`/sys/block/<device>/size`).
    pub sectors: u64,
}

/// `eth0`'s settings, what a cold guest gets from the kernel's `ip=` argument.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// `aa:bb:cc:dd:ee:ff`: the VMM only forwards frames from this address.
    pub mac: String,
    /// The IPv4 address.
    pub address: std::net::Ipv4Addr,
    /// The prefix length (24 for a /24).
    pub prefix_len: u8,
    /// The default gateway.
    pub gateway: std::net::Ipv4Addr,
}

/// Why an identity line was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Longer than [`MAX_IDENTITY_LEN`].
    #[error("the identity is longer than {MAX_IDENTITY_LEN} bytes")]
    TooLong,
    /// Not the JSON of an [`Identity`].
    #[error("the identity does not decode")]
    Decode(#[source] serde_json::Error),
    /// A field is out of its range.
    #[error("identity field {field}: {problem}")]
    Field {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl Identity {
    /// The entropy bytes, checked.
    pub fn entropy_bytes(&self) -> Result<Vec<u8>, IdentityError> {
        let bad = |problem: String| IdentityError::Field { field: "entropy", problem };
        if self.entropy.len() != 2 * ENTROPY_LEN {
            return Err(bad(format!("{} hex digits, expected {}", self.entropy.len(), 2 * ENTROPY_LEN)));
        }
        (0..self.entropy.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&self.entropy[i..i + 2], 16).map_err(|e| bad(e.to_string())))
            .collect()
    }

    /// Encodes the identity as the one line the host sends (newline included).
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("an identity always serializes");
        line.push('\n');
        line
    }

    /// Decodes and checks the line a guest read (without its newline).
    pub fn from_line(line: &[u8]) -> Result<Identity, IdentityError> {
        if line.len() > MAX_IDENTITY_LEN {
            return Err(IdentityError::TooLong);
        }
        let identity: Identity = serde_json::from_slice(line).map_err(IdentityError::Decode)?;
        identity.entropy_bytes()?;
        let hex32 = identity.machine_id.len() == 32
            && identity.machine_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex32 {
            return Err(IdentityError::Field { field: "machineId", problem: "not 32 lowercase hex digits".into() });
        }
        for d in &identity.disks {
            let plain =
                !d.device.is_empty() && d.device.len() <= 16 && d.device.bytes().all(|b| b.is_ascii_alphanumeric());
            if !plain {
                return Err(IdentityError::Field { field: "disks", problem: format!("device {:?}", d.device) });
            }
        }
        if let Some(net) = &identity.network {
            if net.prefix_len > 32 {
                return Err(IdentityError::Field { field: "network.prefixLen", problem: net.prefix_len.to_string() });
            }
            if parse_mac(&net.mac).is_none() {
                return Err(IdentityError::Field { field: "network.mac", problem: format!("{:?}", net.mac) });
            }
        }
        Ok(identity)
    }
}

/// The six bytes of `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            time_unix_ns: 1_800_000_000_000_000_000,
            entropy: "ab".repeat(ENTROPY_LEN),
            disks: vec![DiskSize { device: "vda".into(), sectors: 2048 }],
            network: Some(Network {
                mac: "02:00:0a:3d:00:05".into(),
                address: "10.61.0.5".parse().unwrap(),
                prefix_len: 24,
                gateway: "10.61.0.1".parse().unwrap(),
            }),
            machine_id: "0123456789abcdef0123456789abcdef".into(),
        }
    }

    #[test]
    fn an_identity_round_trips_as_one_line() {
        let line = identity().to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert_eq!(Identity::from_line(line.trim_end().as_bytes()).unwrap(), identity());
        assert_eq!(identity().entropy_bytes().unwrap(), vec![0xab; ENTROPY_LEN]);
    }

    #[test]
    fn bad_identities_are_refused_naming_the_field() {
        let refused = |mut f: Box<dyn FnMut(&mut Identity)>| {
            let mut id = identity();
            f(&mut id);
            Identity::from_line(id.to_line().trim_end().as_bytes()).unwrap_err().to_string()
        };
        assert!(refused(Box::new(|i| i.entropy = "ab".into())).contains("entropy"));
        assert!(refused(Box::new(|i| i.entropy = "zz".repeat(ENTROPY_LEN))).contains("entropy"));
        assert!(refused(Box::new(|i| i.machine_id = "X".repeat(32))).contains("machineId"));
        assert!(refused(Box::new(|i| i.disks[0].device = "../vda".into())).contains("disks"));
        assert!(refused(Box::new(|i| i.network.as_mut().unwrap().prefix_len = 33)).contains("prefixLen"));
        assert!(refused(Box::new(|i| i.network.as_mut().unwrap().mac = "02:00".into())).contains("network.mac"));
        assert!(matches!(Identity::from_line(b"{"), Err(IdentityError::Decode(_))));
        assert!(matches!(Identity::from_line(&vec![b' '; MAX_IDENTITY_LEN + 1]), Err(IdentityError::TooLong)));
    }

    #[test]
    fn the_template_boots_init_from_the_initramfs_in_template_mode() {
        let args = template_kernel_args();
        assert!(args.contains(&format!("rdinit=/{INITRAMFS_INIT}")));
        assert!(args.contains(TEMPLATE_PARAM));
        assert!(!args.contains("root="), "a template touches no disk: {args}");
        assert_eq!(parse_mac("02:00:0a:3d:00:05"), Some([2, 0, 0x0a, 0x3d, 0, 5]));
        assert_eq!(parse_mac("02:00:0a:3d:00:05:06"), None);
    }
}
