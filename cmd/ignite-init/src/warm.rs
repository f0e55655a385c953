//! Template mode, the guest side of a warm start (the protocol: `guest_api::warm`). A template's
//! `ignite-init` runs from the host's initramfs as `/init`: it mounts /proc, /sys and /dev, listens on
//! vsock port [`IDENTITY_PORT`], says [`TEMPLATE_READY`] and waits in `accept` (the host snapshots it
//! there). A restored copy takes the [`Identity`] the host sends (wall clock, entropy, disk sizes,
//! network, root disk, machine id), answers, switches root to `/dev/vda` and execs the disk's own
//! `ignite-init`, which boots on as a cold guest does.
//!
//! What needs the kernel sits behind [`System`] (the real one is [`Linux`]), so taking an identity is
//! tested against a recording fake.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_api::image::INIT_PATH;
use guest_api::warm::{
    parse_mac, DiskSize, Identity, Network, DISK_WAIT_MS, IDENTITY_PORT, INITRAMFS_INIT, MAX_IDENTITY_LEN, REPLY_ERROR,
    REPLY_OK, TEMPLATE_PARAM, TEMPLATE_READY,
};
use ignite_init::error_chain as chain;
use ignite_init::sys;

use crate::log;

/// Where the root disk is mounted until it becomes `/` (an empty directory of the initramfs).
const NEW_ROOT: &str = "/newroot";
/// The root disk, as in a cold boot's `root=`.
const ROOT_DISK: &str = "/dev/vda";
/// The root disk's filesystem, as in a cold boot's `rootfstype=`.
const ROOT_FSTYPE: &str = "ext4";
/// The interface [`Identity::network`] configures.
const INTERFACE: &str = "eth0";
/// How often a disk's size is read while waiting for its new one.
const DISK_POLL: Duration = Duration::from_millis(20);
/// How long a connection may take to deliver its identity line: the host sends it at once, and a
/// connection that stalls must not keep the next one from being accepted.
const IDENTITY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The mount flags of /proc and /sys, as in a cold boot.
const NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Whether `argv0` is the initramfs's `/init`: how the kernel starts a template's `ignite-init`
/// (`rdinit=`), and never a cold boot's or the disk's after a root switch (`/sbin/ignite-init`).
fn runs_from_initramfs(argv0: Option<&OsStr>) -> bool {
    argv0.is_some_and(|a| a.as_encoded_bytes().strip_prefix(b"/") == Some(INITRAMFS_INIT.as_bytes()))
}

/// Whether a PID 1 started as `argv0` on the kernel command line `cmdline` is a template's: it runs from
/// the initramfs and the command line has [`TEMPLATE_PARAM`]. After the root switch the command line
/// still has it, but the disk's `ignite-init` does not run from the initramfs.
fn is_template(cmdline: &str, argv0: Option<&OsStr>) -> bool {
    runs_from_initramfs(argv0) && cmdline.split_whitespace().any(|arg| arg == TEMPLATE_PARAM)
}

/// Whether this PID 1 is a template's ([`is_template`]). Only one started as `/init` reads the kernel
/// command line: it mounts /proc for that, and unmounts it again when it is not a template, so every
/// other boot takes the normal path with nothing changed.
pub fn template_mode() -> bool {
    let argv0 = std::env::args_os().next();
    if !runs_from_initramfs(argv0.as_deref()) {
        return false;
    }
    if let Err(e) = sys::mount("proc", "/proc", NODEV, "") {
        log(&format!("cannot mount /proc to read the kernel command line: {e}"));
        return false;
    }
    match std::fs::read_to_string("/proc/cmdline") {
        Ok(cmdline) if is_template(&cmdline, argv0.as_deref()) => return true,
        Ok(_) => {}
        Err(e) => log(&format!("cannot read /proc/cmdline: {e}")),
    }
    if let Err(e) = sys::unmount("/proc") {
        log(&format!("cannot unmount /proc: {e}"));
    }
    false
}

/// Template mode, once [`template_mode`] mounted /proc: mounts /sys and /dev, listens on
/// [`IDENTITY_PORT`], says [`TEMPLATE_READY`], takes identities until one is applied (a refused one is
/// answered and logged: the host decides what happens to the VM), then switches root to the disk and
/// execs its `ignite-init`. Returns only when it cannot: the reason.
pub fn run() -> String {
    if let Err(e) = sys::mount("sysfs", "/sys", NODEV, "") {
        return format!("cannot mount /sys: {e}");
    }
    if let Err(e) = sys::mount("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755") {
        return format!("cannot mount /dev: {e}");
    }
    let listener = match sys::vsock_listen(libc::VMADDR_CID_ANY, IDENTITY_PORT) {
        Ok(listener) => listener,
        Err(e) => return format!("cannot listen on vsock port {IDENTITY_PORT}: {e}"),
    };
    log(TEMPLATE_READY);
    // The host snapshots the template in `accept`; a restored copy goes on from there.
    loop {
        let mut conn = accept(&listener);
        if let Err(e) = sys::set_receive_timeout(&conn, IDENTITY_READ_TIMEOUT) {
            log(&format!("identity connection: cannot set a read timeout: {e}"));
        }
        match take_identity(&mut conn, &mut Linux) {
            Ok(()) => break,
            Err(e) => log(&format!("identity refused: {e}; waiting for another connection")),
        }
    }
    drop(listener);
    let Err(e) = switch_root();
    e
}

/// The next connection on `listener`. Interrupted calls and connections reset before they were accepted
/// (the vsock transport resets when the template is restored) are retried quietly, other failures after
/// a console line and a pause.
fn accept(listener: &OwnedFd) -> File {
    loop {
        match sys::vsock_accept(listener) {
            Ok(conn) => return conn,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ECONNRESET | libc::ECONNABORTED)) => {}
            Err(e) => {
                log(&format!("cannot accept on vsock port {IDENTITY_PORT}: {e}"));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// What taking an identity needs from the kernel: the seam between [`take_identity`] and [`Linux`].
trait System {
    /// Sets the wall clock.
    fn set_clock(&mut self, unix_ns: u64) -> io::Result<()>;
    /// Mixes `bytes` into the kernel's entropy pool, credited.
    fn add_entropy(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Reseeds the kernel's random number generator from its pool.
    fn reseed_rng(&mut self) -> io::Result<()>;
    /// The text of `/sys/block/<device>/size`.
    fn disk_size(&mut self, device: &str) -> io::Result<String>;
    /// Drops the cached pages of `/dev/<device>`.
    fn flush_disk(&mut self, device: &str) -> io::Result<()>;
    /// Sets and clears flags of [`INTERFACE`]; returns the flags it had.
    fn link_flags(&mut self, set: libc::c_int, clear: libc::c_int) -> io::Result<libc::c_int>;
    /// Sets [`INTERFACE`]'s MAC address.
    fn set_mac(&mut self, mac: [u8; 6]) -> io::Result<()>;
    /// Sets [`INTERFACE`]'s IPv4 address.
    fn set_address(&mut self, address: Ipv4Addr) -> io::Result<()>;
    /// Sets [`INTERFACE`]'s IPv4 netmask.
    fn set_netmask(&mut self, netmask: Ipv4Addr) -> io::Result<()>;
    /// Adds the default route via `gateway` on [`INTERFACE`].
    fn add_default_route(&mut self, gateway: Ipv4Addr) -> io::Result<()>;
    /// Mounts [`ROOT_DISK`] on [`NEW_ROOT`].
    fn mount_root(&mut self) -> io::Result<()>;
    /// Undoes [`System::mount_root`] (failures are logged).
    fn unmount_root(&mut self);
    /// Writes the machine id into the mounted root disk.
    fn write_machine_id(&mut self, machine_id: &str) -> Result<(), String>;
}

/// Serves one connection: reads the identity line, applies it to `system` and answers [`REPLY_OK`], or
/// answers [`REPLY_ERROR`] and the reason (also returned, to log) when a step failed. When the answer
/// cannot be sent the root disk's mount is undone, so the next connection starts from the template's state.
fn take_identity(conn: &mut (impl Read + Write), system: &mut impl System) -> Result<(), String> {
    if let Err(e) = read_identity(conn).and_then(|identity| apply(&identity, system)) {
        let _ = conn.write_all(error_reply(&e).as_bytes());
        return Err(e);
    }
    conn.write_all(format!("{REPLY_OK}\n").as_bytes()).map_err(|e| {
        system.unmount_root();
        format!("cannot answer {REPLY_OK:?}: {e}")
    })
}

/// The answer line naming why an identity was refused.
fn error_reply(reason: &str) -> String {
    format!("{REPLY_ERROR}{}\n", reason.replace('\n', " "))
}

/// Reads the identity line (at most [`MAX_IDENTITY_LEN`] bytes before its newline) and decodes it.
fn read_identity(conn: &mut impl Read) -> Result<Identity, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(Read::by_ref(conn).take(MAX_IDENTITY_LEN as u64 + 1));
    reader.read_until(b'\n', &mut line).map_err(|e| format!("cannot read the identity: {e}"))?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.is_empty() {
        return Err("the connection closed before an identity".into());
    }
    Identity::from_line(&line).map_err(|e| chain(&e))
}

/// Applies `identity` in the contract's order (clock, entropy, disks, network, root disk, machine id);
/// the first failure is the reason the host gets. A machine id that cannot be written is only logged.
fn apply(identity: &Identity, system: &mut impl System) -> Result<(), String> {
    let ns = identity.time_unix_ns;
    system.set_clock(ns).map_err(|e| format!("cannot set the wall clock to {ns} ns since the epoch: {e}"))?;
    let entropy = identity.entropy_bytes().map_err(|e| chain(&e))?;
    system.add_entropy(&entropy).map_err(|e| format!("cannot add the host's entropy to the kernel's pool: {e}"))?;
    match system.reseed_rng() {
        Ok(()) => {}
        // Not initialized yet, or a kernel before 4.17 (no such ioctl): the credited entropy still counts.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::ENOTTY | libc::EINVAL)) => {
            log(&format!("the kernel's random number generator was not reseeded: {e}"));
        }
        Err(e) => return Err(format!("cannot reseed the kernel's random number generator: {e}")),
    }
    // One deadline for all disks: the VMM signals every restored disk's new size at once.
    let disks_since = Instant::now();
    for disk in &identity.disks {
        wait_disk_size(system, disk, disks_since, Duration::from_millis(DISK_WAIT_MS))?;
        let device = &disk.device;
        system.flush_disk(device).map_err(|e| format!("cannot drop the cached pages of /dev/{device}: {e}"))?;
    }
    if let Some(network) = &identity.network {
        configure_network(system, network)?;
    }
    system.mount_root().map_err(|e| format!("cannot mount {ROOT_DISK} ({ROOT_FSTYPE}) on {NEW_ROOT}: {e}"))?;
    if let Err(e) = system.write_machine_id(&identity.machine_id) {
        log(&format!("machine id not written: {e}"));
    }
    Ok(())
}

/// The sectors in the text of `/sys/block/<device>/size`.
fn parse_sectors(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// Waits until `/sys/block/<device>/size` shows `disk`'s size (the VMM signals the restored disk's
/// configuration change), reading it every [`DISK_POLL`] until `timeout` after `since`.
fn wait_disk_size(system: &mut impl System, disk: &DiskSize, since: Instant, timeout: Duration) -> Result<(), String> {
    let deadline = since + timeout;
    let path = format!("/sys/block/{}/size", disk.device);
    loop {
        let seen = match system.disk_size(&disk.device) {
            Ok(text) => match parse_sectors(&text) {
                Some(sectors) if sectors == disk.sectors => return Ok(()),
                Some(sectors) => format!("{sectors} sectors"),
                None => format!("{:?}", text.trim()),
            },
            Err(e) => format!("an error ({e})"),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "disk {}: expected {} sectors, {path} still shows {seen} after {} ms",
                disk.device,
                disk.sectors,
                timeout.as_millis()
            ));
        }
        std::thread::sleep(DISK_POLL);
    }
}

/// The IPv4 netmask of a `prefix_len`-bit prefix (at most 32: [`Identity::from_line`] checked it).
fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
}

/// Gives [`INTERFACE`] the identity's MAC address (with the link down: drivers may refuse it while up),
/// address and netmask, brings it up and adds the default route.
fn configure_network(system: &mut impl System, network: &Network) -> Result<(), String> {
    let Network { mac, address, prefix_len, gateway } = network;
    let bytes = parse_mac(mac).ok_or_else(|| format!("identity field network.mac: {mac:?}"))?;
    system.link_flags(0, libc::IFF_UP).map_err(|e| format!("cannot take {INTERFACE} down to set its MAC: {e}"))?;
    system.set_mac(bytes).map_err(|e| format!("cannot set {INTERFACE}'s MAC address to {mac}: {e}"))?;
    system.set_address(*address).map_err(|e| format!("cannot set {INTERFACE}'s address to {address}: {e}"))?;
    let mask = netmask(*prefix_len);
    system.set_netmask(mask).map_err(|e| format!("cannot set {INTERFACE}'s netmask to {mask} (/{prefix_len}): {e}"))?;
    system.link_flags(libc::IFF_UP | libc::IFF_RUNNING, 0).map_err(|e| format!("cannot bring {INTERFACE} up: {e}"))?;
    system
        .add_default_route(*gateway)
        .map_err(|e| format!("cannot add the default route via {gateway} on {INTERFACE}: {e}"))
}

/// Writes `machine_id` and a newline to `<root>/etc/machine-id` (mode 0444; `etc` created if missing)
/// through a new file renamed into place: a symbolic link standing there is replaced, never followed out
/// of `root`.
fn write_machine_id(root: &Path, machine_id: &str) -> Result<(), String> {
    let etc = root.join("etc");
    let path = etc.join("machine-id");
    let staged = etc.join(".machine-id.ignite");
    std::fs::create_dir_all(&etc).map_err(|e| format!("cannot create {}: {e}", etc.display()))?;
    let _ = std::fs::remove_file(&staged);
    // `create_new` (O_EXCL) never follows a link.
    let written =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o444).open(&staged).and_then(|mut f| {
            f.write_all(format!("{machine_id}\n").as_bytes())?;
            f.set_permissions(std::fs::Permissions::from_mode(0o444))
        });
    if let Err(e) = written.and_then(|()| std::fs::rename(&staged, &path)) {
        let _ = std::fs::remove_file(&staged);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(())
}

/// Leaves the initramfs for the root disk mounted on [`NEW_ROOT`]: unmounts /dev, /sys and /proc (the
/// disk's `ignite-init` mounts its own), removes `/init` (the initramfs's memory is not freed otherwise),
/// moves the disk onto `/`, and execs the disk's `ignite-init` ([`INIT_PATH`]). Returns only on failure.
fn switch_root() -> Result<std::convert::Infallible, String> {
    for target in ["/dev", "/sys", "/proc"] {
        if let Err(e) = sys::unmount(target) {
            log(&format!("cannot unmount {target}: {e}"));
        }
    }
    let _ = std::fs::remove_file(format!("/{INITRAMFS_INIT}"));
    std::env::set_current_dir(NEW_ROOT).map_err(|e| format!("cannot enter {NEW_ROOT}: {e}"))?;
    sys::move_mount(".", "/").map_err(|e| format!("cannot move {NEW_ROOT} onto /: {e}"))?;
    sys::chroot(".").map_err(|e| format!("cannot change root to {NEW_ROOT}: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter / of the root disk: {e}"))?;
    let init = format!("/{INIT_PATH}");
    // `exec` also resets the signal mask and SIGPIPE, so the disk's init starts as the kernel starts one.
    let e = std::process::Command::new(&init).arg0(&init).exec();
    Err(format!("cannot exec {init} on the root disk: {e}"))
}

/// The real [`System`]: system calls on this guest's kernel.
struct Linux;

impl System for Linux {
    fn set_clock(&mut self, unix_ns: u64) -> io::Result<()> {
        sys::set_realtime_clock(unix_ns)
    }

    fn add_entropy(&mut self, bytes: &[u8]) -> io::Result<()> {
        sys::add_entropy(&File::open("/dev/urandom")?, bytes)
    }

    fn reseed_rng(&mut self) -> io::Result<()> {
        sys::reseed_crng(&File::open("/dev/urandom")?)
    }

    fn disk_size(&mut self, device: &str) -> io::Result<String> {
        std::fs::read_to_string(format!("/sys/block/{device}/size"))
    }

    fn flush_disk(&mut self, device: &str) -> io::Result<()> {
        sys::flush_block_device(&File::open(format!("/dev/{device}"))?)
    }

    fn link_flags(&mut self, set: libc::c_int, clear: libc::c_int) -> io::Result<libc::c_int> {
        sys::change_interface_flags(INTERFACE, set, clear)
    }

    fn set_mac(&mut self, mac: [u8; 6]) -> io::Result<()> {
        sys::set_interface_mac(INTERFACE, mac)
    }

    fn set_address(&mut self, address: Ipv4Addr) -> io::Result<()> {
        sys::set_interface_address(INTERFACE, address)
    }

    fn set_netmask(&mut self, netmask: Ipv4Addr) -> io::Result<()> {
        sys::set_interface_netmask(INTERFACE, netmask)
    }

    fn add_default_route(&mut self, gateway: Ipv4Addr) -> io::Result<()> {
        sys::add_default_route(INTERFACE, gateway)
    }

    fn mount_root(&mut self) -> io::Result<()> {
        sys::mount_source(ROOT_DISK, NEW_ROOT, ROOT_FSTYPE, 0, "")
    }

    fn unmount_root(&mut self) {
        if let Err(e) = sys::unmount(NEW_ROOT) {
            log(&format!("cannot unmount {NEW_ROOT}: {e}"));
        }
    }

    fn write_machine_id(&mut self, machine_id: &str) -> Result<(), String> {
        write_machine_id(Path::new(NEW_ROOT), machine_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::ffi::OsStrExt;

    use guest_api::warm::ENTROPY_LEN;

    /// A recording [`System`]: every call as a line, failures (an errno) by call name.
    struct Fake {
        calls: Vec<String>,
        fail: HashMap<&'static str, i32>,
        /// What `disk_size` reads for a device, in turn (the last one stays).
        sizes: HashMap<String, Vec<u64>>,
    }

    impl Fake {
        fn call(&mut self, name: &'static str, detail: impl std::fmt::Display) -> io::Result<()> {
            self.calls.push(format!("{name} {detail}").trim_end().to_string());
            self.fail.get(name).map_or(Ok(()), |&errno| Err(io::Error::from_raw_os_error(errno)))
        }

        /// A fake whose disks show the sizes [`identity`] names.
        fn new() -> Fake {
            let sizes = identity().disks.into_iter().map(|d| (d.device, vec![d.sectors])).collect();
            Fake { calls: Vec::new(), fail: HashMap::new(), sizes }
        }

        fn failing(name: &'static str, errno: i32) -> Fake {
            Fake { fail: HashMap::from([(name, errno)]), ..Fake::new() }
        }
    }

    impl System for Fake {
        fn set_clock(&mut self, unix_ns: u64) -> io::Result<()> {
            self.call("clock", unix_ns)
        }
        fn add_entropy(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.call("entropy", bytes.len())
        }
        fn reseed_rng(&mut self) -> io::Result<()> {
            self.call("reseed", "")
        }
        fn disk_size(&mut self, device: &str) -> io::Result<String> {
            self.call("size", device)?;
            let sizes = self.sizes.get_mut(device).filter(|s| !s.is_empty());
            let sizes = sizes.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
            let sectors = if sizes.len() > 1 { sizes.remove(0) } else { sizes[0] };
            Ok(format!("{sectors}\n"))
        }
        fn flush_disk(&mut self, device: &str) -> io::Result<()> {
            self.call("flush", device)
        }
        fn link_flags(&mut self, set: libc::c_int, clear: libc::c_int) -> io::Result<libc::c_int> {
            self.call("link", format!("+{set:#x} -{clear:#x}")).map(|()| 0)
        }
        fn set_mac(&mut self, mac: [u8; 6]) -> io::Result<()> {
            self.call("mac", format!("{mac:02x?}"))
        }
        fn set_address(&mut self, address: Ipv4Addr) -> io::Result<()> {
            self.call("address", address)
        }
        fn set_netmask(&mut self, netmask: Ipv4Addr) -> io::Result<()> {
            self.call("netmask", netmask)
        }
        fn add_default_route(&mut self, gateway: Ipv4Addr) -> io::Result<()> {
            self.call("route", gateway)
        }
        fn mount_root(&mut self) -> io::Result<()> {
            self.call("mount", "")
        }
        fn unmount_root(&mut self) {
            let _ = self.call("unmount", "");
        }
        fn write_machine_id(&mut self, machine_id: &str) -> Result<(), String> {
            self.call("machine-id", machine_id).map_err(|e| e.to_string())
        }
    }

    /// A connection: what the host sent, what the guest answered; `broken` fails every write.
    struct Conn {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
        broken: bool,
    }

    impl Conn {
        fn sending(input: impl Into<Vec<u8>>) -> Conn {
            Conn { input: io::Cursor::new(input.into()), output: Vec::new(), broken: false }
        }

        fn answer(&self) -> String {
            String::from_utf8(self.output.clone()).unwrap()
        }
    }

    impl Read for Conn {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Conn {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.broken {
                return Err(io::Error::from_raw_os_error(libc::ECONNRESET));
            }
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn identity() -> Identity {
        Identity {
            time_unix_ns: 1_800_000_000_123_456_789,
            entropy: "ab".repeat(ENTROPY_LEN),
            disks: vec![
                DiskSize { device: "vda".into(), sectors: 2048 },
                DiskSize { device: "vdb".into(), sectors: 8 },
            ],
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
    fn a_good_identity_is_applied_in_the_contracts_order_and_answered_ok() {
        let mut fake = Fake::new();
        let mut conn = Conn::sending(identity().to_line());
        take_identity(&mut conn, &mut fake).unwrap();
        assert_eq!(conn.answer(), "ok\n");
        let expected = [
            "clock 1800000000123456789",
            "entropy 64",
            "reseed",
            "size vda",
            "flush vda",
            "size vdb",
            "flush vdb",
            "link +0x0 -0x1",
            "mac [02, 00, 0a, 3d, 00, 05]",
            "address 10.61.0.5",
            "netmask 255.255.255.0",
            "link +0x41 -0x0",
            "route 10.61.0.1",
            "mount",
            "machine-id 0123456789abcdef0123456789abcdef",
        ];
        assert_eq!(fake.calls, expected);
    }

    #[test]
    fn without_a_network_eth0_is_left_alone() {
        let mut fake = Fake::new();
        let mut conn = Conn::sending(Identity { network: None, disks: vec![], ..identity() }.to_line());
        take_identity(&mut conn, &mut fake).unwrap();
        assert_eq!(conn.answer(), "ok\n");
        assert!(!fake.calls.iter().any(|c| c.starts_with("link") || c.starts_with("route")), "{:?}", fake.calls);
    }

    #[test]
    fn a_line_that_does_not_decode_is_answered_with_the_reason_and_nothing_is_touched() {
        let mut fake = Fake::new();
        let mut conn = Conn::sending("{\"timeUnixNs\": 1}\n");
        let err = take_identity(&mut conn, &mut fake).unwrap_err();
        assert!(err.contains("does not decode"), "{err}");
        assert_eq!(conn.answer(), format!("error: {err}\n"));
        assert!(fake.calls.is_empty(), "{:?}", fake.calls);

        let bad_machine_id = Identity { machine_id: "X".repeat(32), ..identity() }.to_line();
        let mut conn = Conn::sending(bad_machine_id);
        assert!(take_identity(&mut conn, &mut fake).unwrap_err().contains("machineId"));
        assert!(conn.answer().starts_with("error: identity field machineId"), "{}", conn.answer());
        assert!(fake.calls.is_empty(), "{:?}", fake.calls);
    }

    #[test]
    fn a_line_past_the_bound_is_refused_without_reading_on() {
        let mut fake = Fake::new();
        let mut conn = Conn::sending(vec![b' '; 2 * MAX_IDENTITY_LEN]);
        let err = take_identity(&mut conn, &mut fake).unwrap_err();
        assert!(err.contains("longer than"), "{err}");
        assert_eq!(conn.input.position(), MAX_IDENTITY_LEN as u64 + 1, "reads stop one byte past the bound");
        assert!(conn.answer().starts_with(REPLY_ERROR));
        assert!(fake.calls.is_empty());
    }

    #[test]
    fn a_connection_that_closes_before_a_line_takes_nothing() {
        let mut fake = Fake::new();
        let err = take_identity(&mut Conn::sending(""), &mut fake).unwrap_err();
        assert!(err.contains("closed before an identity"), "{err}");
        assert!(fake.calls.is_empty());
    }

    #[test]
    fn a_failed_step_stops_there_and_the_answer_names_it() {
        let mut fake = Fake::failing("flush", libc::EIO);
        let mut conn = Conn::sending(identity().to_line());
        let err = take_identity(&mut conn, &mut fake).unwrap_err();
        assert!(err.starts_with("cannot drop the cached pages of /dev/vda: "), "{err}");
        assert_eq!(conn.answer(), format!("error: {err}\n"));
        assert_eq!(fake.calls.last().unwrap(), "flush vda");

        let mut fake = Fake::failing("route", libc::ENETUNREACH);
        let err = take_identity(&mut Conn::sending(identity().to_line()), &mut fake).unwrap_err();
        assert!(err.contains("default route via 10.61.0.1 on eth0"), "{err}");
        assert!(!fake.calls.contains(&"mount".to_string()), "the root disk is not mounted: {:?}", fake.calls);
    }

    #[test]
    fn a_reseed_the_kernel_cannot_do_yet_is_logged_not_fatal() {
        for errno in [libc::ENODATA, libc::ENOTTY, libc::EINVAL] {
            let mut conn = Conn::sending(identity().to_line());
            take_identity(&mut conn, &mut Fake::failing("reseed", errno)).unwrap();
            assert_eq!(conn.answer(), "ok\n");
        }
        let mut conn = Conn::sending(identity().to_line());
        let err = take_identity(&mut conn, &mut Fake::failing("reseed", libc::EPERM)).unwrap_err();
        assert!(err.starts_with("cannot reseed the kernel's random number generator"), "{err}");
    }

    #[test]
    fn a_machine_id_that_cannot_be_written_is_not_fatal() {
        let mut conn = Conn::sending(identity().to_line());
        take_identity(&mut conn, &mut Fake::failing("machine-id", libc::EROFS)).unwrap();
        assert_eq!(conn.answer(), "ok\n");
    }

    #[test]
    fn an_answer_that_cannot_be_sent_undoes_the_root_mount() {
        let mut fake = Fake::new();
        let mut conn = Conn { broken: true, ..Conn::sending(identity().to_line()) };
        let err = take_identity(&mut conn, &mut fake).unwrap_err();
        assert!(err.starts_with("cannot answer \"ok\""), "{err}");
        assert_eq!(fake.calls.last().unwrap(), "unmount");
    }

    #[test]
    fn disks_are_read_until_they_show_their_new_size_or_the_error_names_both_sizes() {
        let disk = DiskSize { device: "vda".into(), sectors: 2048 };
        let mut fake = Fake::new();
        fake.sizes.insert("vda".into(), vec![1024, 1024, 2048]);
        wait_disk_size(&mut fake, &disk, Instant::now(), Duration::from_secs(60)).unwrap();
        assert_eq!(fake.calls.len(), 3);

        fake.sizes.insert("vda".into(), vec![1024]);
        let err = wait_disk_size(&mut fake, &disk, Instant::now(), Duration::ZERO).unwrap_err();
        assert_eq!(err, "disk vda: expected 2048 sectors, /sys/block/vda/size still shows 1024 sectors after 0 ms");

        let mut missing = Fake::failing("size", libc::ENOENT);
        let err = wait_disk_size(&mut missing, &disk, Instant::now(), Duration::ZERO).unwrap_err();
        assert!(err.contains("still shows an error (No such file or directory"), "{err}");
    }

    #[test]
    fn sizes_parse_from_sys_block_text() {
        assert_eq!(parse_sectors("2048\n"), Some(2048));
        assert_eq!(parse_sectors("0\n"), Some(0));
        assert_eq!(parse_sectors(""), None);
        assert_eq!(parse_sectors("-1\n"), None);
        assert_eq!(parse_sectors("20 48"), None);
    }

    #[test]
    fn netmasks_come_from_prefix_lengths() {
        let masks =
            [(0, "0.0.0.0"), (1, "128.0.0.0"), (8, "255.0.0.0"), (24, "255.255.255.0"), (31, "255.255.255.254")];
        for (prefix, mask) in masks {
            assert_eq!(netmask(prefix), mask.parse::<Ipv4Addr>().unwrap(), "/{prefix}");
        }
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(200), Ipv4Addr::BROADCAST, "clamped, never a panic");
    }

    #[test]
    fn only_init_from_the_initramfs_with_the_template_parameter_is_a_template() {
        let template = "console=ttyS0 reboot=k panic=-1 rdinit=/init ignite.template=1 ignite.config=/dev/vdb";
        let argv0 = |s: &'static str| Some(OsStr::from_bytes(s.as_bytes()));
        assert!(is_template(template, argv0("/init")));
        assert!(is_template(&guest_api::warm::template_kernel_args(), argv0("/init")));
        assert!(!is_template(template, argv0("/sbin/ignite-init")), "the disk's init after the root switch");
        assert!(!is_template(template, argv0("init")));
        assert!(!is_template(template, None));
        assert!(!is_template(guest_api::boot::KERNEL_ARGS, argv0("/init")), "a cold boot's command line");
        assert!(!is_template("ignite.template=10 rdinit=/init", argv0("/init")));
        assert!(!is_template("xignite.template=1", argv0("/init")));
        assert!(!runs_from_initramfs(argv0("/sbin/ignite-init")));
    }

    #[test]
    fn the_machine_id_is_written_read_only_and_replaces_a_link_without_following_it() {
        let root = tempfile::tempdir().unwrap();
        write_machine_id(root.path(), "0123456789abcdef0123456789abcdef").unwrap();
        let path = root.path().join("etc/machine-id");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0123456789abcdef0123456789abcdef\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o444);

        write_machine_id(root.path(), "fedcba9876543210fedcba9876543210").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "fedcba9876543210fedcba9876543210\n");

        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("machine-id");
        std::fs::write(&target, "outside\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_machine_id(root.path(), "0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "outside\n", "the link is not followed");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        let names: Vec<_> =
            std::fs::read_dir(root.path().join("etc")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["machine-id"], "nothing staged is left behind");
    }

    #[test]
    fn error_replies_are_one_line() {
        assert_eq!(error_reply("a\nb"), "error: a b\n");
    }
}
