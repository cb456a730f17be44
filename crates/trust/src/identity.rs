//! Who a certificate names, and what that identity may do.
//!
//! The identity lives in one URI subject alternative name, `pgquorum://ROLE/NAME`:
//! `pgquorum://member/3`, `pgquorum://keeper/pg1`, `pgquorum://operator/alice`,
//! `pgquorum://viewer/grafana`. Only our CA issues certificates the monitor accepts, so a
//! name in that SAN is as trustworthy as the CA's key. Host names and addresses are in
//! ordinary DNS/IP SANs, for hostname verification.

use std::fmt;

use thiserror::Error;

const SCHEME: &str = "pgquorum://";
/// Longest name in an identity (a node or client name).
pub const MAX_NAME_BYTES: usize = 63;

/// What a certificate holder is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A monitor member, by its Raft node id.
    Member(u64),
    /// The keeper of one PostgreSQL node, by node name.
    Keeper(String),
    /// A person or tool that may change the cluster.
    Operator(String),
    /// A person or tool that may only read.
    Viewer(String),
}

/// The client roles `cert create-client --role` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    Operator,
    Viewer,
}

impl std::str::FromStr for ClientRole {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        match s {
            "operator" => Ok(ClientRole::Operator),
            "viewer" => Ok(ClientRole::Viewer),
            other => Err(IdentityError::UnknownRole(short(other))),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "the certificate names no pgquorum identity (no pgquorum:// subject alternative name)"
    )]
    Missing,
    #[error("the certificate names {0} pgquorum identities; it must name exactly one")]
    Several(usize),
    #[error("unknown role {0:?}: use member, keeper, operator or viewer")]
    UnknownRole(String),
    #[error("invalid name {0:?}: use 1 to 63 letters, digits, '_', '-' or '.'")]
    BadName(String),
    #[error("invalid member id {0:?}: use a positive integer")]
    BadMemberId(String),
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
}

/// At most 40 characters of untrusted text, for error messages.
pub(crate) fn short(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Names that are safe in a file name, a log line and a certificate: node names and
/// client names share this rule.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl Identity {
    pub fn role(&self) -> &'static str {
        match self {
            Identity::Member(_) => "member",
            Identity::Keeper(_) => "keeper",
            Identity::Operator(_) => "operator",
            Identity::Viewer(_) => "viewer",
        }
    }

    /// The name part (a member's id as text).
    pub fn name(&self) -> String {
        match self {
            Identity::Member(id) => id.to_string(),
            Identity::Keeper(n) | Identity::Operator(n) | Identity::Viewer(n) => n.clone(),
        }
    }

    pub fn client(role: ClientRole, name: &str) -> Result<Identity, IdentityError> {
        if !valid_name(name) {
            return Err(IdentityError::BadName(short(name)));
        }
        Ok(match role {
            ClientRole::Operator => Identity::Operator(name.to_owned()),
            ClientRole::Viewer => Identity::Viewer(name.to_owned()),
        })
    }

    pub fn keeper(name: &str) -> Result<Identity, IdentityError> {
        if !valid_name(name) {
            return Err(IdentityError::BadName(short(name)));
        }
        Ok(Identity::Keeper(name.to_owned()))
    }

    /// The URI SAN that carries this identity.
    pub fn to_uri(&self) -> String {
        format!("{SCHEME}{}/{}", self.role(), self.name())
    }

    /// Parses `pgquorum://ROLE/NAME`. `None` for URIs of other schemes.
    pub fn from_uri(uri: &str) -> Option<Result<Identity, IdentityError>> {
        let rest = uri.strip_prefix(SCHEME)?;
        Some(Self::parse_role_name(rest))
    }

    /// Parses `ROLE/NAME`, as in the forwarded-caller header between members.
    pub fn parse_role_name(s: &str) -> Result<Identity, IdentityError> {
        let (role, name) = s
            .split_once('/')
            .ok_or_else(|| IdentityError::UnknownRole(short(s)))?;
        match role {
            "member" => match name.parse::<u64>() {
                Ok(id) if id > 0 => Ok(Identity::Member(id)),
                _ => Err(IdentityError::BadMemberId(short(name))),
            },
            "keeper" => Identity::keeper(name),
            "operator" => Identity::client(ClientRole::Operator, name),
            "viewer" => Identity::client(ClientRole::Viewer, name),
            other => Err(IdentityError::UnknownRole(short(other))),
        }
    }

    /// `ROLE/NAME`: the form of the forwarded-caller header and of `show events`.
    pub fn role_name(&self) -> String {
        format!("{}/{}", self.role(), self.name())
    }

    /// The identity a DER certificate names (exactly one pgquorum URI SAN).
    pub fn from_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Unparsable(short(&e.to_string())))?;
        let mut found = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name {
                    if let Some(id) = Identity::from_uri(uri) {
                        found.push(id?);
                    }
                }
            }
        }
        match found.len() {
            0 => Err(IdentityError::Missing),
            1 => Ok(found.remove(0)),
            n => Err(IdentityError::Several(n)),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Member(id) => write!(f, "member {id}"),
            Identity::Keeper(n) => write!(f, "keeper {n}"),
            Identity::Operator(n) => write!(f, "operator {n}"),
            Identity::Viewer(n) => write!(f, "viewer {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn uris_round_trip() {
        for id in [
            Identity::Member(3),
            Identity::Keeper("pg-1".into()),
            Identity::Operator("alice".into()),
            Identity::Viewer("grafana.prod".into()),
        ] {
            assert_eq!(Identity::from_uri(&id.to_uri()), Some(Ok(id.clone())));
            assert_eq!(Identity::parse_role_name(&id.role_name()), Ok(id));
        }
    }

    #[test]
    fn bad_identities_are_refused() {
        assert!(Identity::from_uri("https://example.com").is_none());
        for bad in [
            "pgquorum://member/0",
            "pgquorum://member/x",
            "pgquorum://admin/alice",
            "pgquorum://keeper/a b",
            "pgquorum://keeper/../etc",
            "pgquorum://keeper/",
            "pgquorum://operator",
        ] {
            assert!(
                matches!(Identity::from_uri(bad), Some(Err(_))),
                "{bad} was accepted"
            );
        }
        let long = "x".repeat(64);
        assert!(Identity::keeper(&long).is_err());
        assert!(Identity::keeper(&"x".repeat(63)).is_ok());
    }
}
