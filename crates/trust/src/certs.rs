//! The certificates directory: a CA and the certificates it issues, made by pgquorum
//! itself (`pgquorum cert ...`).
//!
//! One directory may hold several identities (one machine running members, keepers and
//! the CLI, as `local up` does); each file is named for the identity it holds, so a
//! process picks its own by its role and name:
//!
//! | file | holds |
//! |---|---|
//! | `ca.crt` | the CA certificate every party trusts |
//! | `ca.key` | the CA's private key: only where certificates are issued |
//! | `ca.crl` | revoked certificates (optional; `cert revoke`) |
//! | `member.N.crt/.key` | monitor member N (server and client) |
//! | `keeper.NAME.crt/.key` | the keeper of node NAME (client of the monitors) |
//! | `client.NAME.crt/.key` | an operator or a viewer (the role is in the certificate) |
//!
//! Keys are written 0600 and never printed; certificates 0644.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

use crate::identity::{short, Identity, IdentityError};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CA_CRL: &str = "ca.crl";

#[derive(Debug, Error)]
pub enum CertError {
    // The cause is in the message, not a `source`, so that it is printed once.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0} already exists; give --overwrite to replace it (renewal)")]
    Exists(PathBuf),
    #[error("no CA in {0}: create one with `pgquorum cert create-ca --certs-dir {0}`")]
    NoCa(PathBuf),
    #[error("{0} is missing: create it with `pgquorum cert {1}`")]
    Missing(PathBuf, String),
    #[error("invalid host {0:?}: use an IP address or a DNS name (letters, digits, '-', '.')")]
    BadHost(String),
    #[error("a {0} certificate needs at least one --host (the name or address others dial)")]
    NoHost(&'static str),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("certificate generation failed: {0}")]
    Generate(rcgen::Error),
    #[error("{path}: not a PEM certificate or key ({why})")]
    Pem { path: PathBuf, why: String },
    #[error("{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error("{path} names {found}, not {expected}")]
    WrongIdentity {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

/// How long a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From an hour ago (clock skew between machines) for `days`.
    pub fn days(days: u32) -> Validity {
        let now = SystemTime::now();
        Validity {
            not_before: now - std::time::Duration::from_secs(3600),
            not_after: now + std::time::Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

fn odt(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// The certificates directory.
#[derive(Debug, Clone)]
pub struct CertsDir {
    pub path: PathBuf,
}

/// The file stem of an identity's certificate and key.
pub fn stem(id: &Identity) -> String {
    match id {
        Identity::Member(n) => format!("member.{n}"),
        Identity::Keeper(n) => format!("keeper.{n}"),
        Identity::Operator(n) | Identity::Viewer(n) => format!("client.{n}"),
    }
}

/// The `pgquorum cert ...` command that makes an identity's files, for error messages.
pub fn create_hint(id: &Identity, dir: &Path) -> String {
    let d = dir.display();
    match id {
        Identity::Member(n) => format!("create-member --id {n} --host HOST --certs-dir {d}"),
        Identity::Keeper(n) => format!("create-keeper --name {n} --host HOST --certs-dir {d}"),
        Identity::Operator(n) => {
            format!("create-client --name {n} --role operator --certs-dir {d}")
        }
        Identity::Viewer(n) => format!("create-client --name {n} --role viewer --certs-dir {d}"),
    }
}

impl From<rcgen::Error> for CertError {
    fn from(e: rcgen::Error) -> Self {
        CertError::Generate(e)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |err| CertError::Io {
        path: path.to_owned(),
        err,
    }
}

/// Writes `data` to `path` through a temporary file and a rename, with `mode`, so a
/// reader (a member reloading its certificate) never sees half a file.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    // create_new honours the umask: set the mode explicitly.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

pub fn read_pem(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(io(path))
}

/// Refuses a private key that other users can read (as PostgreSQL and ssh do).
pub fn check_key_mode(path: &Path) -> Result<(), CertError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CertError::KeyTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

fn san(host: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // The same rule as a node's --pg-host: one definition of a host name.
    if pgquorum_core::HostName::parse(host).is_err() {
        return Err(CertError::BadHost(short(host)));
    }
    Ok(SanType::DnsName(
        host.to_owned()
            .try_into()
            .map_err(|_| CertError::BadHost(short(host)))?,
    ))
}

impl CertsDir {
    pub fn new(path: impl Into<PathBuf>) -> CertsDir {
        CertsDir { path: path.into() }
    }

    pub fn cert_path(&self, id: &Identity) -> PathBuf {
        self.path.join(format!("{}.crt", stem(id)))
    }

    pub fn key_path(&self, id: &Identity) -> PathBuf {
        self.path.join(format!("{}.key", stem(id)))
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.path.join(CA_CERT)
    }

    pub fn crl_path(&self) -> PathBuf {
        self.path.join(CA_CRL)
    }

    fn ensure_dir(&self) -> Result<(), CertError> {
        fs::create_dir_all(&self.path).map_err(io(&self.path))?;
        // Keys live here: nobody else needs to list it.
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700)).map_err(io(&self.path))
    }

    /// Creates the CA (refused when one exists, unless `overwrite`: replacing a CA
    /// invalidates every certificate it issued).
    pub fn create_ca(&self, validity: Validity, overwrite: bool) -> Result<PathBuf, CertError> {
        self.ensure_dir()?;
        let cert_path = self.ca_cert_path();
        let key_path = self.path.join(CA_KEY);
        if !overwrite && (cert_path.exists() || key_path.exists()) {
            return Err(CertError::Exists(cert_path));
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "pgquorum");
        dn.push(DnType::CommonName, "pgquorum CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = odt(validity.not_before);
        params.not_after = odt(validity.not_after);
        let cert = params.self_signed(&key)?;
        write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok(cert_path)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CertError> {
        let cert_path = self.ca_cert_path();
        let key_path = self.path.join(CA_KEY);
        if !cert_path.exists() || !key_path.exists() {
            return Err(CertError::NoCa(self.path.clone()));
        }
        check_key_mode(&key_path)?;
        let key = KeyPair::from_pem(&read_pem(&key_path)?).map_err(|e| CertError::Pem {
            path: key_path.clone(),
            why: e.to_string(),
        })?;
        Issuer::from_ca_cert_pem(&read_pem(&cert_path)?, key).map_err(|e| CertError::Pem {
            path: cert_path,
            why: e.to_string(),
        })
    }

    /// Issues the certificate and key of `id`, valid for `hosts` (required for members
    /// and keepers: the names or addresses others dial). Refused when the files exist,
    /// unless `overwrite` (renewal: a running process picks the new files up).
    pub fn create(
        &self,
        id: &Identity,
        hosts: &[String],
        validity: Validity,
        overwrite: bool,
    ) -> Result<PathBuf, CertError> {
        let issuer = self.issuer()?;
        let cert_path = self.cert_path(id);
        let key_path = self.key_path(id);
        if !overwrite && (cert_path.exists() || key_path.exists()) {
            return Err(CertError::Exists(cert_path));
        }
        let server = matches!(id, Identity::Member(_) | Identity::Keeper(_));
        if server && hosts.is_empty() {
            return Err(CertError::NoHost(id.role()));
        }
        let mut sans = vec![SanType::URI(
            id.to_uri()
                .try_into()
                .map_err(|_| IdentityError::BadName(short(&id.name())))?,
        )];
        for h in hosts {
            sans.push(san(h)?);
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "pgquorum");
        dn.push(DnType::OrganizationalUnitName, id.role());
        dn.push(DnType::CommonName, id.name());
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = odt(validity.not_before);
        params.not_after = odt(validity.not_after);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        self.ensure_dir()?;
        write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok(cert_path)
    }

    /// Every certificate in the directory, CA first.
    pub fn list(&self) -> Result<Vec<CertInfo>, CertError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.path).map_err(io(&self.path))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        paths.sort();
        let revoked = self.revoked_serials()?;
        for p in paths {
            let pem = read_pem(&p)?;
            out.push(CertInfo::from_pem(&p, &pem, &revoked)?);
        }
        out.sort_by_key(|c| c.identity.is_some());
        Ok(out)
    }

    /// Serial numbers (hex) in `ca.crl`.
    pub fn revoked_serials(&self) -> Result<Vec<String>, CertError> {
        let path = self.crl_path();
        if !path.exists() {
            return Ok(Vec::new());
        }
        let der = pem_der(&path, &read_pem(&path)?, "X509 CRL")?;
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| CertError::Pem {
            path: path.clone(),
            why: e.to_string(),
        })?;
        Ok(crl
            .iter_revoked_certificates()
            .map(|r| hex(r.raw_serial()))
            .collect())
    }

    /// The serial number of `id`'s current certificate.
    pub fn serial_of(&self, id: &Identity) -> Result<Vec<u8>, CertError> {
        let cert_path = self.cert_path(id);
        if !cert_path.exists() {
            return Err(CertError::Missing(cert_path, create_hint(id, &self.path)));
        }
        let der = pem_der(&cert_path, &read_pem(&cert_path)?, "CERTIFICATE")?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::Pem {
            path: cert_path.clone(),
            why: e.to_string(),
        })?;
        Ok(cert.raw_serial().to_vec())
    }

    /// Revokes the certificate of `id`: adds its serial to `ca.crl` (signed by the CA).
    /// Members and keepers reload the CRL with their certificates and refuse it from
    /// then on.
    pub fn revoke(&self, id: &Identity) -> Result<String, CertError> {
        let serial = self.serial_of(id)?;
        self.revoke_serials(std::slice::from_ref(&serial))?;
        Ok(hex(&serial))
    }

    /// Adds serial numbers to `ca.crl` (e.g. the certificates a renewal replaced).
    pub fn revoke_serials(&self, revoke: &[Vec<u8>]) -> Result<(), CertError> {
        let issuer = self.issuer()?;
        let mut serials: Vec<Vec<u8>> = self
            .revoked_serials()?
            .iter()
            .filter_map(|h| unhex(h))
            .collect();
        for s in revoke {
            if !serials.contains(s) {
                serials.push(s.clone());
            }
        }
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(3650),
            crl_number: SerialNumber::from_slice(&now.unix_timestamp_nanos().to_be_bytes()[4..]),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&issuer)?;
        write_atomic(&self.crl_path(), crl.pem()?.as_bytes(), 0o644)
    }
}

/// The DER inside the first PEM block labelled `label`.
pub fn pem_der(path: &Path, pem: &str, label: &str) -> Result<Vec<u8>, CertError> {
    use rustls_pki_types::pem::PemObject;
    let bad = |why: String| CertError::Pem {
        path: path.to_owned(),
        why,
    };
    match label {
        "CERTIFICATE" => rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .map(|c| c.to_vec())
            .map_err(|e| bad(e.to_string())),
        _ => rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
            .map(|c| c.to_vec())
            .map_err(|e| bad(e.to_string())),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// What `cert list` shows of one certificate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    pub file: String,
    /// None for the CA.
    pub identity: Option<String>,
    pub role: String,
    pub hosts: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    pub expires: String,
    pub expired: bool,
    pub revoked: bool,
    pub serial: String,
}

impl CertInfo {
    fn from_pem(path: &Path, pem: &str, revoked: &[String]) -> Result<CertInfo, CertError> {
        let der = pem_der(path, pem, "CERTIFICATE")?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::Pem {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        let mut hosts = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => hosts.push(d.to_string()),
                    x509_parser::extensions::GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            hosts.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        let identity = Identity::from_der(&der).ok();
        let is_ca = cert.is_ca();
        let not_after = cert.validity().not_after.timestamp();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let serial = hex(cert.raw_serial());
        Ok(CertInfo {
            file: path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            role: match (&identity, is_ca) {
                (_, true) => "ca".to_owned(),
                (Some(id), _) => id.role().to_owned(),
                (None, _) => "unknown".to_owned(),
            },
            identity: identity.map(|i| i.to_string()),
            hosts,
            not_after,
            expires: cert.validity().not_after.to_string(),
            expired: not_after < now,
            revoked: revoked.contains(&serial),
            serial,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn keys_are_private_and_certificates_name_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertsDir::new(dir.path().join("certs"));
        certs.create_ca(Validity::days(10), false).unwrap();
        let id = Identity::Member(2);
        certs
            .create(
                &id,
                &["127.0.0.1".into(), "m2.example".into()],
                Validity::days(1),
                false,
            )
            .unwrap();
        let key_mode = fs::metadata(certs.key_path(&id))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        let ca_key_mode = fs::metadata(certs.path.join(CA_KEY))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(ca_key_mode, 0o600);
        let pem = read_pem(&certs.cert_path(&id)).unwrap();
        let der = pem_der(&certs.cert_path(&id), &pem, "CERTIFICATE").unwrap();
        assert_eq!(Identity::from_der(&der).unwrap(), id);
        let list = certs.list().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].role, "ca");
        assert_eq!(
            list[1].hosts,
            vec!["127.0.0.1".to_string(), "m2.example".into()]
        );
        // A second create without --overwrite changes nothing.
        assert!(matches!(
            certs.create(&id, &["127.0.0.1".into()], Validity::days(1), false),
            Err(CertError::Exists(_))
        ));
        assert_eq!(read_pem(&certs.cert_path(&id)).unwrap(), pem);
    }

    #[test]
    fn bad_hosts_and_missing_hosts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertsDir::new(dir.path());
        certs.create_ca(Validity::days(10), false).unwrap();
        for bad in ["a b", "x\n", "-x.example", "", "a..b"] {
            assert!(
                certs
                    .create(
                        &Identity::Member(1),
                        &[bad.into()],
                        Validity::days(1),
                        false
                    )
                    .is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(
            certs.create(&Identity::Keeper("a".into()), &[], Validity::days(1), false),
            Err(CertError::NoHost(_))
        ));
        assert!(certs
            .create(&Identity::Viewer("v".into()), &[], Validity::days(1), false)
            .is_ok());
    }

    #[test]
    fn revoked_certificates_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertsDir::new(dir.path());
        certs.create_ca(Validity::days(10), false).unwrap();
        let a = Identity::Operator("a".into());
        let b = Identity::Operator("b".into());
        certs.create(&a, &[], Validity::days(1), false).unwrap();
        certs.create(&b, &[], Validity::days(1), false).unwrap();
        certs.revoke(&a).unwrap();
        certs.revoke(&b).unwrap();
        let list = certs.list().unwrap();
        assert!(list
            .iter()
            .filter(|c| c.role == "operator")
            .all(|c| c.revoked));
        assert_eq!(certs.revoked_serials().unwrap().len(), 2);
    }
}
