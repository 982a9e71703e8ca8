//! The controller's certificate authority: one ECDSA P-256 CA in `<data>/ca/`,
//! created on first start, that issues the embedded broker's server certificate,
//! the controller's own client certificate and one client certificate per device
//! at enrollment. The certificate's common name is the device id: Mosquitto's
//! `use_identity_as_username` turns it into the user name its ACL confines, and the
//! embedded broker's gate ([`crate::server::gate`]) checks topics against it.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};

use edgefleet_shared::{PublicKey, SecretKey};

use crate::ops::operator::write_atomic;

/// The client id and certificate name of the controller itself on the broker.
pub const CONTROLLER_IDENTITY: &str = "edgefleet-controller";

/// Errors of the CA, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {detail}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// What happened.
        detail: String,
    },
    /// Certificate generation failed.
    #[error("certificate for {name}: {detail}")]
    Issue {
        /// Subject.
        name: String,
        /// What happened.
        detail: String,
    },
}

/// Paths of a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (mode 0600).
    pub key: PathBuf,
}

/// The CA in a directory.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    key: KeyPair,
    /// The public half of the controller's command-signing key.
    command_public: PublicKey,
}

/// The controller's Ed25519 command-signing key in the CA directory
/// (docs/protocol.md, "Commands are signed"): devices receive its public half at
/// enrollment and carry out only commands it signed.
const COMMAND_KEY: &str = "command.key";

/// Reads the command key in `dir`, creating it on first use (also in a CA made
/// before commands were signed).
fn command_key_in(dir: &Path) -> Result<SecretKey, CaError> {
    let path = dir.join(COMMAND_KEY);
    if path.exists() {
        let pem = fs::read_to_string(&path).map_err(io(&path))?;
        return SecretKey::from_pem(&pem).map_err(|e| CaError::Io {
            path: path.clone(),
            detail: format!("not a usable Ed25519 key: {e}"),
        });
    }
    let key = SecretKey::generate().map_err(|e| CaError::Issue {
        name: "the command key".into(),
        detail: e.to_string(),
    })?;
    write_file(&path, key.to_pem().as_bytes(), 0o600)?;
    Ok(key)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CaError + '_ {
    move |e| CaError::Io {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

fn issue_err(name: &str) -> impl Fn(rcgen::Error) -> CaError + '_ {
    move |e| CaError::Issue {
        name: name.to_owned(),
        detail: e.to_string(),
    }
}

/// The year now, roughly (validity starts on 1 January of the year before, so
/// a clock a few days off does not matter).
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + i32::try_from(secs / 31_556_952).unwrap_or(0)
}

impl Ca {
    /// Opens the CA in `dir`, creating it on first use.
    pub fn open_or_create(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Io {
                path: key_path.clone(),
                detail: format!("not a usable key: {e}"),
            })?;
            return Ok(Ca {
                dir: dir.to_owned(),
                cert_pem,
                key,
                command_public: command_key_in(dir)?.public(),
            });
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let key = KeyPair::generate().map_err(issue_err("CA"))?;
        let mut params = ca_params();
        params.not_before = date_time_ymd(this_year() - 1, 1, 1);
        params.not_after = date_time_ymd(this_year() + 20, 1, 1);
        let cert = params.self_signed(&key).map_err(issue_err("CA"))?;
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok(Ca {
            dir: dir.to_owned(),
            cert_pem: cert.pem(),
            key,
            command_public: command_key_in(dir)?.public(),
        })
    }

    /// The controller's command-signing key (read from its file, mode 0600).
    pub fn command_key(&self) -> Result<SecretKey, CaError> {
        command_key_in(&self.dir)
    }

    /// The command key's public half, PEM (what devices pin at enrollment).
    pub fn command_public_pem(&self) -> String {
        self.command_public.to_pem()
    }

    /// The CA certificate file (what devices and brokers trust).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `name` valid for ten years into `out_dir` as
    /// `<file>.pem` and `<file>.key`. Server certificates carry the DNS names and
    /// addresses in `hosts` as subject alternative names.
    pub fn issue(
        &self,
        name: &str,
        server_hosts: Option<&[String]>,
        out_dir: &Path,
        file: &str,
    ) -> Result<Identity, CaError> {
        let (cert, key) = self.issue_pem(name, server_hosts)?;
        fs::create_dir_all(out_dir).map_err(io(out_dir))?;
        let id = Identity {
            cert: out_dir.join(format!("{file}.pem")),
            key: out_dir.join(format!("{file}.key")),
        };
        write_file(&id.key, key.as_bytes(), 0o600)?;
        write_file(&id.cert, cert.as_bytes(), 0o644)?;
        Ok(id)
    }

    /// Issues a certificate for `name` as [`Ca::issue`] does, in memory:
    /// (certificate PEM, key PEM). Enrollment uses it (nothing on disk).
    pub fn issue_pem(
        &self,
        name: &str,
        server_hosts: Option<&[String]>,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(issue_err(name))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.not_before = date_time_ymd(this_year() - 1, 1, 1);
        params.not_after = date_time_ymd(this_year() + 10, 1, 1);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        match server_hosts {
            Some(hosts) => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                for h in hosts {
                    params.subject_alt_names.push(match h.parse() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(h.clone().try_into().map_err(issue_err(name))?),
                    });
                }
            }
            None => params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
        }
        // The issuer is named by the CA's subject (the same parameters that made it)
        // and identified by its key: no need to parse the stored certificate.
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(issue_err(name))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The broker's server certificate for `hosts`, issued once and kept.
    pub fn server_identity(&self, hosts: &[String]) -> Result<Identity, CaError> {
        let id = Identity {
            cert: self.dir.join("server.pem"),
            key: self.dir.join("server.key"),
        };
        let marker = self.dir.join("server.hosts");
        let want = hosts.join(",");
        let same = fs::read_to_string(&marker).is_ok_and(|h| h == want);
        if same && id.cert.exists() && id.key.exists() {
            return Ok(id);
        }
        let id = self.issue("edgefleet broker", Some(hosts), &self.dir, "server")?;
        write_file(&marker, want.as_bytes(), 0o644)?;
        Ok(id)
    }

    /// The controller's own client certificate, issued once and kept.
    pub fn controller_identity(&self) -> Result<Identity, CaError> {
        let id = Identity {
            cert: self.dir.join("controller.pem"),
            key: self.dir.join("controller.key"),
        };
        if id.cert.exists() && id.key.exists() {
            return Ok(id);
        }
        self.issue(CONTROLLER_IDENTITY, None, &self.dir, "controller")
    }
}

/// The CA's subject and role (validity is set when it is created).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "edgefleet controller CA");
    dn.push(DnType::OrganizationName, "edgefleet");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    write_atomic(path, mode, |w| w.write_all(bytes)).map_err(|e| CaError::Io {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_created_once_and_issues_certificates_rustls_accepts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::open_or_create(&dir.path().join("ca")).expect("create");
        let again = Ca::open_or_create(&dir.path().join("ca")).expect("open");
        assert_eq!(ca.cert_pem(), again.cert_pem(), "kept, not re-created");
        let dev = ca
            .issue("pi-01", None, &dir.path().join("devices"), "pi-01")
            .expect("issue");
        let mode = fs::metadata(&dev.key).expect("key").permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        // The certificate chains to the CA and names the device.
        let server = ca
            .server_identity(&["localhost".into(), "127.0.0.1".into()])
            .expect("server");
        let client = edgefleet_agent::link::tls_config(&ca.cert_path(), &dev.cert, &dev.key);
        assert!(client.is_ok(), "{:?}", client.err());
        assert!(server.cert.exists());
        let pem = fs::read_to_string(&dev.cert).expect("pem");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
