//! A PostgreSQL WAL position that is never "unknown".
//!
//! PostgreSQL's `0/0` is `InvalidXLogRecPtr`: no position at all. A keeper reports it
//! when it cannot know where its WAL ends (PostgreSQL down after a crash, or never
//! started), so an [`Lsn`] cannot be 0 and "unknown" is `Option<Lsn>` = `None`. Rules
//! that compare positions then have to say what an unknown side means (an unknown LSN
//! never wins a candidate comparison nor satisfies a floor; a `None` floor is no floor)
//! instead of getting it from `0 <= x` by accident.
//!
//! Persisted formats (Raft entries, snapshots) and the gRPC wire keep the u64 with 0 for
//! unknown: [`zero_is_none`] maps them for serde; crates/api/src/convert.rs (and the
//! keeper, which builds its heartbeat itself) use [`Lsn::new`] and [`Lsn::raw`] on the
//! wire.

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::input::quote_prefix;

/// A WAL position (pg_lsn), never `0/0`. Ordered as WAL is written.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(NonZeroU64);

impl Lsn {
    /// The position `v` (pg_lsn as u64); `None` for 0, PostgreSQL's invalid position.
    pub const fn new(v: u64) -> Option<Lsn> {
        match NonZeroU64::new(v) {
            Some(n) => Some(Lsn(n)),
            None => None,
        }
    }

    /// The position as pg_lsn's u64 (never 0).
    pub const fn get(self) -> u64 {
        self.0.get()
    }

    /// The u64 of a position that may be unknown, as it is stored and sent: 0 for
    /// unknown (what PostgreSQL writes for no position).
    pub const fn raw(lsn: Option<Lsn>) -> u64 {
        match lsn {
            Some(l) => l.get(),
            None => 0,
        }
    }

    /// Bytes of WAL from `earlier` up to this position; 0 when `earlier` is not before it.
    pub const fn bytes_since(self, earlier: Lsn) -> u64 {
        self.get().saturating_sub(earlier.get())
    }

    /// The higher of two positions that may be unknown: an unknown one adds nothing.
    pub fn max_known(a: Option<Lsn>, b: Option<Lsn>) -> Option<Lsn> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// A position that may be unknown, for messages: as PostgreSQL writes it, or
    /// `unknown`.
    pub fn or_unknown(lsn: Option<Lsn>) -> String {
        lsn.map_or_else(|| "unknown".to_string(), |l| l.to_string())
    }
}

/// As PostgreSQL writes a pg_lsn: `0/3000060` (upper and lower 32 bits in hexadecimal).
impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.get();
        write!(f, "{:X}/{:X}", v >> 32, v & 0xffff_ffff)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

/// Why a text is not an [`Lsn`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LsnParseError {
    #[error("invalid LSN {}: write it as PostgreSQL does, two hexadecimal numbers of 1 to 8 digits separated by '/' (e.g. 0/3000060)", quote_prefix(.0))]
    Malformed(String),
    #[error("LSN 0/0 is PostgreSQL's invalid position, not a WAL position")]
    Zero,
}

/// Reads what PostgreSQL's `pg_lsn_in` accepts: `X/X`, each part 1 to 8 hexadecimal
/// digits of either case. `0/0` is refused ([`LsnParseError::Zero`]): it is no position.
impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Lsn, LsnParseError> {
        let part = |p: &str| {
            (!p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u64::from_str_radix(p, 16).ok())
                .flatten()
        };
        let malformed = || LsnParseError::Malformed(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(malformed)?;
        let (hi, lo) = (
            part(hi).ok_or_else(malformed)?,
            part(lo).ok_or_else(malformed)?,
        );
        Lsn::new((hi << 32) | lo).ok_or(LsnParseError::Zero)
    }
}

/// As pg_lsn's u64. Reading refuses 0: where a position may be unknown, the field is an
/// `Option<Lsn>` read with [`zero_is_none`].
impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        Lsn::new(u64::deserialize(d)?).ok_or_else(|| {
            serde::de::Error::custom("LSN 0 (0/0) is no position where one is required")
        })
    }
}

/// `#[serde(with = "zero_is_none")]` for an `Option<Lsn>`: stored as the u64 it always
/// was, 0 for `None`, so that every stored Raft entry and snapshot reads and writes byte
/// for byte as before.
pub mod zero_is_none {
    use super::*;

    pub fn serialize<S: Serializer>(lsn: &Option<Lsn>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(Lsn::raw(*lsn))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Lsn>, D::Error> {
        Ok(Lsn::new(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn lsn(v: u64) -> Lsn {
        Lsn::new(v).unwrap()
    }

    #[test]
    fn zero_is_no_position() {
        assert_eq!(Lsn::new(0), None);
        assert_eq!(Lsn::raw(None), 0);
        assert_eq!(Lsn::raw(Lsn::new(7)), 7);
        assert_eq!(std::mem::size_of::<Option<Lsn>>(), 8);
    }

    #[test]
    fn written_and_read_as_postgresql_does() {
        assert_eq!(lsn(0x300_0060).to_string(), "0/3000060");
        assert_eq!(lsn(0x1_0000_00A0).to_string(), "1/A0");
        assert_eq!(lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!("16/B374D848".parse(), Ok(lsn(0x16_B374_D848)));
        assert_eq!("16/b374d848".parse(), Ok(lsn(0x16_B374_D848)));
        assert_eq!("0/1".parse(), Ok(lsn(1)));
        assert_eq!("0/0".parse::<Lsn>(), Err(LsnParseError::Zero));
        assert_eq!("00000000/00000000".parse::<Lsn>(), Err(LsnParseError::Zero));
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "x/1",
            "1/100000000",
            "+1/1",
            "1/-1",
            "1/1/1",
            " 1/1",
        ] {
            assert!(
                matches!(bad.parse::<Lsn>(), Err(LsnParseError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(format!("{:?}", lsn(0x60)), "Lsn(0/60)");
    }

    #[test]
    fn unknown_is_stored_as_zero() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct S {
            #[serde(with = "zero_is_none")]
            l: Option<Lsn>,
        }
        assert_eq!(serde_json::to_string(&S { l: None }).unwrap(), r#"{"l":0}"#);
        assert_eq!(
            serde_json::to_string(&S { l: Lsn::new(50) }).unwrap(),
            r#"{"l":50}"#
        );
        assert_eq!(
            serde_json::from_str::<S>(r#"{"l":0}"#).unwrap(),
            S { l: None }
        );
        assert!(serde_json::from_str::<Lsn>("0").is_err());
        assert_eq!(serde_json::from_str::<Lsn>("9").unwrap(), lsn(9));
    }

    #[test]
    fn distances() {
        assert_eq!(lsn(100).bytes_since(lsn(40)), 60);
        assert_eq!(lsn(40).bytes_since(lsn(100)), 0);
        assert_eq!(Lsn::max_known(None, None), None);
        assert_eq!(Lsn::max_known(None, Some(lsn(3))), Some(lsn(3)));
        assert_eq!(Lsn::max_known(Some(lsn(3)), None), Some(lsn(3)));
        assert_eq!(Lsn::max_known(Some(lsn(3)), Some(lsn(9))), Some(lsn(9)));
        assert_eq!(Lsn::or_unknown(None), "unknown");
        assert_eq!(Lsn::or_unknown(Lsn::new(0x60)), "0/60");
    }
}
