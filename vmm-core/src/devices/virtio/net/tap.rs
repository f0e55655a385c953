//! Attaching to an existing host tap device through `/dev/net/tun`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;

use super::VNET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";

/// Why a tap device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is not a valid Linux interface name.
    #[error("invalid tap name {0:?}: expected 1 to 15 bytes without '/', ':' or whitespace")]
    InvalidName(String),
    /// No interface of that name exists in the VMM's network namespace.
    #[error("tap device {0} does not exist (it must be created before the vm starts)")]
    NotFound(String),
    /// The interface lookup itself failed.
    #[error("cannot look up tap device {tap}")]
    Lookup {
        /// The tap name.
        tap: String,
        /// The lookup error.
        #[source]
        source: io::Error,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_PATH} for tap device {tap}")]
    OpenTun {
        /// The tap name.
        tap: String,
        /// The open error.
        #[source]
        source: io::Error,
    },
    /// `TUNSETIFF` refused: not a tap, busy, or not permitted.
    #[error("cannot attach to tap device {tap}")]
    Attach {
        /// The tap name.
        tap: String,
        /// The ioctl error.
        #[source]
        source: io::Error,
    },
    /// A setting after attaching failed.
    #[error("cannot set {what} on tap device {tap}")]
    Configure {
        /// The tap name.
        tap: String,
        /// Which setting.
        what: &'static str,
        /// The ioctl error.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as `TUNSETIFF` and `SIOCGIFINDEX` use it: the name, then a 24-byte union of which
/// only the first bytes (a short for flags, an int for the index) are used here. Spelled out as
/// plain bytes so that it is fully initialised without touching libc's union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        // `valid_name` guarantees the name leaves room for the terminating NUL.
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
}

/// A host tap device the VMM is attached to: a non-blocking fd that reads and writes one frame,
/// prefixed with a 12-byte virtio-net header, per call.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap `name` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte
    /// vnet header and no offloads, non-blocking. Never creates a device: the caller owns its
    /// lifecycle (a tap created here would vanish with the VMM and surprise the controller).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        interface_exists(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun { tap: name.to_string(), source })?;
        let fd = file.as_raw_fd();

        let mut req = IfReq::new(name);
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: `req` is a live, fully initialised 40-byte `struct ifreq` the kernel may read and
        // write; the fd is owned by `file`.
        let ret = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req as *mut IfReq) };
        if ret < 0 {
            return Err(TapError::Attach { tap: name.to_string(), source: io::Error::last_os_error() });
        }

        let configure = |what, source| TapError::Configure { tap: name.to_string(), what, source };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points to a live local.
        let ret = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) };
        if ret < 0 {
            return Err(configure("the vnet header size", io::Error::last_os_error()));
        }
        // Offload settings outlive the fd: a previous user may have enabled checksum or GSO
        // offloads, which would hand the guest partial checksums it never agreed to handle.
        // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
        let ret = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
        if ret < 0 {
            return Err(configure("the offload flags", io::Error::last_os_error()));
        }
        Ok(Tap { file, name: name.to_string() })
    }

    /// Wraps an fd that is already attached and configured like [`Tap::open`] does (for example one
    /// passed by a privileged parent). It must be non-blocking. Any fd that keeps frame boundaries
    /// (a `SOCK_DGRAM` or `SOCK_SEQPACKET` socket) works, which the tests use.
    pub fn from_owned_fd(fd: OwnedFd, name: impl Into<String>) -> Tap {
        Tap { file: File::from(fd), name: name.into() }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (vnet header included); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (vnet header included) in one call, as the tap needs.
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The kernel's `dev_valid_name`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == b'\0' || b.is_ascii_whitespace())
}

/// Asks for the interface index in the VMM's network namespace: `TUNSETIFF` alone would silently
/// create a missing tap instead of failing. Any socket works for this ioctl; an unbound unix
/// datagram socket needs no address and sends nothing.
fn interface_exists(name: &str) -> Result<(), TapError> {
    let lookup = |source| TapError::Lookup { tap: name.to_string(), source };
    let sock = UnixDatagram::unbound().map_err(lookup)?;
    let mut req = IfReq::new(name);
    // SAFETY: `req` is a live, fully initialised `struct ifreq`; the kernel writes the index into it.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req as *mut IfReq) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::ENODEV) => TapError::NotFound(name.to_string()),
            _ => lookup(err),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_like_the_kernel_does() {
        assert!(valid_name("tap0"));
        assert!(valid_name("ignite-0123456"));
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "0123456789abcdef"] {
            let err = Tap::open(bad).unwrap_err();
            assert!(matches!(err, TapError::InvalidName(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_missing_tap_is_named_and_not_created() {
        let err = Tap::open("ignmissing0").unwrap_err();
        assert!(matches!(err, TapError::NotFound(_)), "{err}");
        assert_eq!(err.to_string(), "tap device ignmissing0 does not exist (it must be created before the vm starts)");
        assert!(matches!(interface_exists("ignmissing0"), Err(TapError::NotFound(_))));
    }
}
