//! The per-VM "config drive": a raw, read-only block device (the guest's second virtio disk, named on the
//! kernel command line as `ignite.config=/dev/vdb`) carrying one [`GuestConfig`].
//!
//! Layout: the magic `IGNITECFG1\n`, a little-endian `u32` length, that many bytes of JSON, then zeros up to
//! a multiple of 512 bytes (a whole number of sectors). No filesystem, so the host needs no `mkfs` or mount.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The first bytes of every config drive.
pub const MAGIC: &[u8; 11] = b"IGNITECFG1\n";
/// The sector size the drive is padded to.
pub const SECTOR: usize = 512;
/// The largest JSON payload accepted (guards against a corrupted length field).
pub const MAX_JSON_LEN: u32 = 16 << 20;

/// Everything the host tells the guest init about one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GuestConfig {
    /// The guest's hostname (empty: keep the kernel's).
    #[serde(default)]
    pub hostname: String,
    /// Replaces the image's entrypoint (Docker `--entrypoint`, Kubernetes `command`); drops the image's cmd.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd (Docker arguments, Kubernetes `args`).
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// Environment variables set over the image's `Env`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Replaces the image's `WorkingDir`.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// Replaces the image's `User` (`name`, `uid`, `name:group`, `uid:gid`).
    #[serde(default)]
    pub user: Option<String>,
    /// Name servers written to `/etc/resolv.conf` (the address itself comes from the kernel's `ip=`).
    #[serde(default)]
    pub dns: Vec<String>,
    /// Public keys written to root's `~/.ssh/authorized_keys`.
    #[serde(default)]
    pub authorized_keys: Vec<String>,
    /// Files written into the guest before the main process starts.
    #[serde(default)]
    pub files: Vec<CopiedFile>,
    /// Kubernetes nodes: the `kubeadm join` configuration, written (mode 0600) and run before the entrypoint.
    #[serde(default)]
    pub join: Option<JoinConfig>,
}

/// One file copied into the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CopiedFile {
    /// Absolute path inside the guest; parent directories are created.
    pub path: String,
    /// Permission bits, e.g. `0o644`.
    pub mode: u32,
    /// The content, base64 (standard alphabet, padded).
    pub content: String,
}

/// How a guest joins a Kubernetes cluster (in the guest: `ignite_init::join`).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JoinConfig {
    /// Where the join configuration file goes in the guest (written mode 0600).
    pub config_path: String,
    /// The join configuration file's content (it holds the bootstrap token).
    pub config: String,
    /// The command that performs the join; empty: `kubeadm join --config CONFIG_PATH`.
    #[serde(default)]
    pub command: Vec<String>,
    /// Secrets (the bootstrap token and its secret part) removed from the join command's output
    /// before it reaches the console.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redact: Vec<String>,
}

/// Never prints the configuration or the secrets (they would end up in logs).
impl std::fmt::Debug for JoinConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinConfig")
            .field("config_path", &self.config_path)
            .field("config", &"<redacted>")
            .field("command", &self.command)
            .field("redact", &format_args!("[{} redacted]", self.redact.len()))
            .finish()
    }
}

/// Reading or writing a config drive failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigDriveError {
    /// The drive could not be read.
    #[error("cannot read the config drive")]
    Read(#[source] std::io::Error),
    /// The drive does not start with [`MAGIC`].
    #[error("config drive has no IGNITECFG1 header (wrong disk, or not written by ignite)")]
    BadMagic,
    /// The length field exceeds [`MAX_JSON_LEN`].
    #[error("config drive declares {0} bytes of JSON, more than the 16 MiB limit (corrupted header?)")]
    TooLarge(u32),
    /// The drive ends before the declared length.
    #[error("config drive is truncated: header declares {declared} bytes of JSON, only {found} present")]
    Truncated {
        /// Bytes the header declares.
        declared: u32,
        /// Bytes actually present.
        found: usize,
    },
    /// The JSON payload does not describe a [`GuestConfig`].
    #[error("config drive JSON is invalid")]
    Json(#[source] serde_json::Error),
    /// A copied file's content is not valid base64.
    #[error("config drive file {path}: content is not valid base64")]
    Base64 {
        /// The file's guest path.
        path: String,
        /// The decoding error.
        #[source]
        source: base64::DecodeError,
    },
    /// Writing the drive image failed.
    #[error("cannot write config drive {path}")]
    Write {
        /// The image being written.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Encodes `config` as drive bytes: header, JSON, zero padding to a multiple of [`SECTOR`].
pub fn encode(config: &GuestConfig) -> Vec<u8> {
    let json = serde_json::to_vec(config).expect("GuestConfig always serializes");
    let len = u32::try_from(json.len()).expect("config JSON under 4 GiB");
    let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + json.len() + SECTOR);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&json);
    bytes.resize(bytes.len().div_ceil(SECTOR) * SECTOR, 0);
    bytes
}

/// Writes `config` as a config drive image at `path` (created or replaced, mode 0600: it may hold secrets).
pub fn write_config_drive(path: &Path, config: &GuestConfig) -> Result<(), ConfigDriveError> {
    let err = |source| ConfigDriveError::Write { path: path.to_path_buf(), source };
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(err)?;
    // An existing file keeps its old mode through open(): force 0600.
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    file.write_all(&encode(config)).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Reads a config drive (a block device or an image file) and validates every copied file's base64.
pub fn read_config_drive(mut drive: impl Read) -> Result<GuestConfig, ConfigDriveError> {
    let mut header = [0u8; MAGIC.len() + 4];
    let found = read_up_to(&mut drive, &mut header)?;
    if found < MAGIC.len() || &header[..MAGIC.len()] != MAGIC {
        return Err(ConfigDriveError::BadMagic);
    }
    if found < header.len() {
        return Err(ConfigDriveError::Truncated { declared: 0, found: 0 });
    }
    let declared = u32::from_le_bytes(header[MAGIC.len()..].try_into().expect("4 bytes"));
    if declared > MAX_JSON_LEN {
        return Err(ConfigDriveError::TooLarge(declared));
    }
    let mut json = vec![0u8; declared as usize];
    let found = read_up_to(&mut drive, &mut json)?;
    if found < json.len() {
        return Err(ConfigDriveError::Truncated { declared, found });
    }
    let config: GuestConfig = serde_json::from_slice(&json).map_err(ConfigDriveError::Json)?;
    for file in &config.files {
        decode_content(file)?;
    }
    Ok(config)
}

/// The decoded content of a copied file.
pub fn decode_content(file: &CopiedFile) -> Result<Vec<u8>, ConfigDriveError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(&file.content)
        .map_err(|source| ConfigDriveError::Base64 { path: file.path.clone(), source })
}

/// Encodes bytes as a copied file's `content`.
pub fn encode_content(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Fills `buf` as far as the reader allows; returns how many bytes were read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, ConfigDriveError> {
    let mut done = 0;
    while done < buf.len() {
        match reader.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ConfigDriveError::Read(e)),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GuestConfig {
        GuestConfig {
            hostname: "web-1".into(),
            command: Some(vec!["/bin/sh".into(), "-c".into()]),
            args: None,
            env: [("FOO".to_string(), "bar".to_string())].into(),
            user: Some("1000:1000".into()),
            dns: vec!["10.0.0.1".into()],
            authorized_keys: vec!["ssh-ed25519 AAAA test".into()],
            files: vec![CopiedFile { path: "/etc/x".into(), mode: 0o640, content: encode_content(b"hi\n") }],
            join: Some(JoinConfig {
                config_path: "/etc/kubeadm.yaml".into(),
                config: "token: abcdef.0123456789abcdef".into(),
                command: vec![],
                redact: vec!["abcdef.0123456789abcdef".into()],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_through_a_file_is_sector_padded_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.img");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_config_drive(&path, &sample()).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len() % SECTOR as u64, 0);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let back = read_config_drive(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(back, sample());
        assert_eq!(decode_content(&back.files[0]).unwrap(), b"hi\n");
    }

    #[test]
    fn debug_output_never_shows_the_join_secrets() {
        let shown = format!("{:?}", sample());
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(shown.contains("/etc/kubeadm.yaml"), "{shown}");
    }

    #[test]
    fn wrong_magic_is_rejected() {
        let mut bytes = encode(&sample());
        bytes[0] = b'X';
        assert!(matches!(read_config_drive(&bytes[..]), Err(ConfigDriveError::BadMagic)));
        assert!(matches!(read_config_drive(&[0u8; 512][..]), Err(ConfigDriveError::BadMagic)));
        assert!(matches!(read_config_drive(&b""[..]), Err(ConfigDriveError::BadMagic)));
    }

    #[test]
    fn truncated_drive_reports_declared_and_found() {
        let bytes = encode(&sample());
        let json_len = u32::from_le_bytes(bytes[11..15].try_into().unwrap());
        let cut = &bytes[..15 + 5];
        match read_config_drive(cut) {
            Err(ConfigDriveError::Truncated { declared, found }) => assert_eq!((declared, found), (json_len, 5)),
            other => panic!("expected truncation, got {other:?}"),
        }
        assert!(matches!(read_config_drive(&bytes[..13]), Err(ConfigDriveError::Truncated { .. })));
    }

    #[test]
    fn corrupted_length_and_json_are_rejected() {
        let mut bytes = encode(&sample());
        bytes[11..15].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_config_drive(&bytes[..]), Err(ConfigDriveError::TooLarge(u32::MAX))));
        let mut bytes = encode(&sample());
        bytes[15] = b'!';
        assert!(matches!(read_config_drive(&bytes[..]), Err(ConfigDriveError::Json(_))));
    }

    #[test]
    fn bad_base64_names_the_file() {
        let mut config = sample();
        config.files[0].content = "***".into();
        let err = read_config_drive(&encode(&config)[..]).unwrap_err();
        assert_eq!(err.to_string(), "config drive file /etc/x: content is not valid base64");
    }
}
