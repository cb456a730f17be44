//! What a value that came from outside may look like.
//!
//! Node names, formation names and host names end up in pg_hba.conf, postgresql.conf,
//! libpq conninfo strings, replication slot names and command lines on every node of a
//! group. A value is therefore accepted only in a form that needs no escaping in any of
//! them, and with a length that keeps every message and Raft entry small. The API layer
//! checks every request against these rules; `ClusterState::apply` checks them again,
//! so that no proposal, however it was computed, stores a value outside them.

use serde::{Deserialize, Serialize};

/// RFC 1123: a host name is at most 253 bytes (in text form, without a final dot).
pub const MAX_HOST_LEN: usize = 253;
/// A replication slot is named `pgquorum_<node name>`, and PostgreSQL names are at most
/// 63 bytes (NAMEDATALEN - 1): 63 - 9 leaves 54 for the node name.
pub const MAX_NODE_NAME_LEN: usize = 54;
/// Formation names are PostgreSQL-name sized.
pub const MAX_FORMATION_NAME_LEN: usize = 63;
/// How much of a refused value an error message quotes.
pub const QUOTE_PREFIX_LEN: usize = 40;

/// Why a value was refused. The message quotes at most a short prefix of the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

/// At most [`QUOTE_PREFIX_LEN`] characters of `v`, debug-quoted, with the full length
/// when it was cut: an error must never echo a megabyte back (nor make the answer too
/// large to deliver).
pub fn quote_prefix(v: &str) -> String {
    let n = v.chars().count();
    if n <= QUOTE_PREFIX_LEN {
        format!("{v:?}")
    } else {
        let prefix: String = v.chars().take(QUOTE_PREFIX_LEN).collect();
        format!("{prefix:?}… ({} bytes)", v.len())
    }
}

/// 1 to `max` characters among a-z, 0-9, '-' and '_': safe unquoted in a conninfo, an
/// hba file, a configuration value, `synchronous_standby_names` and a slot name.
fn check_name(what: &str, v: &str, max: usize) -> Result<(), InvalidValue> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(InvalidValue(format!(
            "{what} {}: use 1-{max} characters among a-z, 0-9, '-' and '_'",
            quote_prefix(v)
        )))
    }
}

/// A node name (also its standby's application_name and slot name suffix).
pub fn check_node_name(v: &str) -> Result<(), InvalidValue> {
    check_name("node name", v, MAX_NODE_NAME_LEN)
}

/// A formation name.
pub fn check_formation_name(v: &str) -> Result<(), InvalidValue> {
    check_name("formation name", v, MAX_FORMATION_NAME_LEN)
}

/// An IP address or an RFC 1123 host name: the only host form that can reach pg_hba.conf,
/// a conninfo or a command line. Construct it with [`HostName::parse`] (or `FromStr`);
/// deserialization checks it too, so that no path makes one unchecked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostName(String);

impl HostName {
    pub fn parse(v: &str) -> Result<HostName, InvalidValue> {
        // pg_hba.conf gives these words a meaning of their own ("samenet" matches any
        // address of the server's subnets): never a peer's host.
        let keyword = ["all", "samehost", "samenet"]
            .iter()
            .any(|k| k.eq_ignore_ascii_case(v));
        if v.parse::<std::net::IpAddr>().is_ok() || (is_rfc1123_host(v) && !keyword) {
            Ok(HostName(v.to_owned()))
        } else {
            Err(InvalidValue(format!(
                "host {}: expected an IP address or a host name (letters, digits, '-' and '.', at most {MAX_HOST_LEN} bytes)",
                quote_prefix(v)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The IP address, when the host is one.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.0.parse().ok()
    }
}

/// Labels of 1-63 letters, digits and hyphens, not starting or ending with a hyphen,
/// separated by single dots; at most 253 bytes in all.
fn is_rfc1123_host(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_HOST_LEN
        && v.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl std::str::FromStr for HostName {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostName::parse(s)
    }
}

impl TryFrom<String> for HostName {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        HostName::parse(&s)
    }
}

impl From<HostName> for String {
    fn from(h: HostName) -> String {
        h.0
    }
}

impl AsRef<str> for HostName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for HostName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hosts_that_are_accepted() {
        for h in [
            "127.0.0.1",
            "::1",
            "fe80::1",
            "db-1",
            "db1.example.com",
            "a",
            "xn--bcher-kva.example",
            &"a".repeat(63),
        ] {
            assert_eq!(HostName::parse(h).unwrap().as_str(), h);
        }
        let a63 = "a".repeat(63);
        let longest = format!("{a63}.{a63}.{a63}.{}", "a".repeat(61));
        assert_eq!(longest.len(), MAX_HOST_LEN);
        assert!(HostName::parse(&longest).is_ok());
        assert!(HostName::parse(&format!("{longest}a")).is_err());
    }

    #[test]
    fn hosts_that_are_refused() {
        for h in [
            "",
            "127.0.0.7/32 trust\nhost all all 127.0.0.7/32 trust\n#",
            "a b",
            "a'b",
            "a\\b",
            "a=b",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a_b",
            "all",
            "samenet",
            "SameHost",
            "h\0",
            "samehost x",
            "127.0.0.1/32",
            &"a".repeat(64),
        ] {
            assert!(HostName::parse(h).is_err(), "{h:?} accepted");
        }
        let long = format!("{}.{}", "a".repeat(63), "b.".repeat(100));
        assert!(HostName::parse(long.trim_end_matches('.')).is_err());
    }

    #[test]
    fn deserialization_checks_too() {
        let ok: HostName = serde_json::from_str("\"db1\"").unwrap();
        assert_eq!(ok.as_str(), "db1");
        assert!(serde_json::from_str::<HostName>("\"a b\"").is_err());
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"db1\"");
    }

    #[test]
    fn errors_quote_a_short_prefix() {
        let huge = "x".repeat(5 << 20);
        let e = HostName::parse(&format!("{huge} "))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 300, "{}", e.len());
        assert!(e.contains("5242881 bytes"), "{e}");
        let e = check_node_name(&huge).unwrap_err().to_string();
        assert!(e.len() < 300);
        assert!(check_node_name("node-1_a").is_ok());
        assert!(check_node_name(&"a".repeat(55)).is_err());
        assert!(check_node_name("A").is_err());
        assert!(check_formation_name(&"a".repeat(63)).is_ok());
    }
}
