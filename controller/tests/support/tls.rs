//! Certificates for the tests of the API over TCP with mutual TLS, made by the `openssl` command.

use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

const EC: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/// A self-signed CA: `name.pem` and `name.key`.
pub fn ca(dir: &Path, name: &str) {
    let (key, pem, subject) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN={name}"));
    let mut args = vec!["req", "-x509"];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &pem, "-days", "1", "-subj", &subject]);
    openssl(dir, &args);
}

/// A certificate signed by CA `ca`, with the X.509v3 `extensions`: `name.pem` and `name.key`.
pub fn leaf(dir: &Path, name: &str, ca: &str, extensions: &str) {
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), extensions).unwrap();
    let (key, csr, pem, subject) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("/CN={name}"));
    let mut args = vec!["req"];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
    openssl(dir, &args);
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &["x509", "-req", "-in", &csr, "-CA", &ca_pem, "-CAkey", &ca_key, "-CAcreateserial", "-out", &pem]
            .into_iter()
            .chain(["-days", "1", "-extfile", &ext])
            .collect::<Vec<_>>(),
    );
}

/// A daemon CA with a `daemon` certificate for localhost and 127.0.0.1, and a clients CA that signed
/// `client` (a client certificate): what a daemon with `--listen` and one client need.
pub fn daemon_and_client(dir: &Path, client: &str) {
    ca(dir, "daemon-ca");
    ca(dir, "clients-ca");
    leaf(dir, "daemon", "daemon-ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n");
    leaf(dir, client, "clients-ca", CLIENT_EXTENSIONS);
}

/// The X.509v3 extensions of a client certificate.
pub const CLIENT_EXTENSIONS: &str = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
