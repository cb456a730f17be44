//! Exit codes and the way errors leave the binary (docs/cli.md lists them).
//!
//! A script must be able to tell "the monitor said no" from "nobody answered" without
//! reading the message. The class comes from the typed errors in the chain: a
//! [`Failure`] raised by this crate, or the `tonic::Code` of the monitor's answer (the
//! monitor maps its refusals to codes in one place, crates/api/src/status.rs). Error
//! texts are never matched.

use std::fmt;

use pgquorum_api::client::ClientError;
use serde_json::json;
use tonic::Code;

/// What kind of failure ended the command; each has its own exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Anything not classified below (a local file, a failed process start, ...).
    Other,
    /// The command line is wrong (unknown flag, bad value, no --monitor given).
    Usage,
    /// The monitor refused the request as invalid: bad value, unknown node or formation,
    /// already exists. Retrying the same request will not help.
    Invalid,
    /// The monitor refused the request because of the cluster's current state (a
    /// switchover already under way, no candidate, a node still moving). It may be
    /// allowed later.
    NotAllowed,
    /// The command gave up waiting (`--timeout`) for the cluster to reach the state it
    /// asked for; the change itself was accepted.
    TimedOut,
    /// No monitor member could serve the request: nothing listens at the addresses,
    /// they do not resolve, TLS failed, the address is not a pgquorum monitor, or the
    /// group has no quorum.
    Unreachable,
    /// The certificate was refused, or its role may not do this (a viewer changing the
    /// cluster).
    NotAuthorised,
    /// `show state` answered, but from a view that is not the leader's current one (no
    /// quorum, an election under way): the table was printed, and must not be trusted.
    StaleView,
}

impl Kind {
    pub const fn exit_code(self) -> u8 {
        match self {
            Kind::Other => 1,
            Kind::Usage => 2,
            Kind::Invalid => 3,
            Kind::NotAllowed => 4,
            Kind::TimedOut => 5,
            Kind::Unreachable => 6,
            Kind::NotAuthorised => 7,
            Kind::StaleView => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Other => "error",
            Kind::Usage => "usage",
            Kind::Invalid => "invalid",
            Kind::NotAllowed => "not_allowed",
            Kind::TimedOut => "timed_out",
            Kind::Unreachable => "unreachable",
            Kind::NotAuthorised => "not_authorised",
            Kind::StaleView => "stale_view",
        }
    }

    /// The class of a gRPC status code. Transport failures (refused, DNS, TLS) reach us
    /// as UNAVAILABLE from the client; an HTTP server that is not gRPC answers with a
    /// status tonic derives from the HTTP code, which the client has already turned into
    /// UNAVAILABLE ("not a pgquorum monitor").
    pub fn of_code(code: Code) -> Kind {
        match code {
            Code::Ok => Kind::Other,
            Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::OutOfRange => {
                Kind::Invalid
            }
            Code::FailedPrecondition | Code::Aborted | Code::ResourceExhausted => Kind::NotAllowed,
            Code::DeadlineExceeded => Kind::TimedOut,
            Code::Unavailable | Code::Unimplemented | Code::Cancelled => Kind::Unreachable,
            Code::Unauthenticated | Code::PermissionDenied => Kind::NotAuthorised,
            Code::Unknown | Code::Internal | Code::DataLoss => Kind::Other,
        }
    }
}

/// An error this crate classifies itself (a wait that timed out, a missing flag).
#[derive(Debug)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// `Err(anyhow)` of the given kind.
pub fn fail(kind: Kind, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Failure {
        kind,
        message: message.into(),
    })
}

/// The class of an error: the first typed cause in its chain that says one.
pub fn classify(e: &anyhow::Error) -> Kind {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.kind;
        }
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return match c {
                ClientError::NoEndpoints | ClientError::BadEndpoint(_) => Kind::Usage,
                ClientError::Status(s) => Kind::of_code(s.code()),
            };
        }
        if let Some(s) = cause.downcast_ref::<tonic::Status>() {
            return Kind::of_code(s.code());
        }
    }
    Kind::Other
}

/// Prints the error (as `{"error": {...}}` on stdout with --json, else `error: ...` on
/// stderr) and returns the exit code for it.
pub fn report(e: &anyhow::Error, json: bool) -> u8 {
    let kind = classify(e);
    let message = format!("{e:#}");
    print_error(kind, &message, json);
    kind.exit_code()
}

pub fn print_error(kind: Kind, message: &str, json: bool) {
    if json {
        let v = json!({"error": {"kind": kind.name(), "message": message, "exit_code": kind.exit_code()}});
        crate::output::line(format_args!("{v}"));
    } else {
        crate::output::err_line(format_args!("error: {message}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_its_own_exit_code() {
        let all = [
            Kind::Other,
            Kind::Usage,
            Kind::Invalid,
            Kind::NotAllowed,
            Kind::TimedOut,
            Kind::Unreachable,
            Kind::NotAuthorised,
        ];
        let mut codes: Vec<u8> = all.iter().map(|k| k.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        // 101 is a Rust panic; 0 is success. Neither is ours to give.
        assert!(codes.iter().all(|c| (1..=7).contains(c)));
    }

    #[test]
    fn the_class_comes_from_the_status_code_not_the_text() {
        let e = anyhow::Error::new(ClientError::Status(tonic::Status::failed_precondition(
            "timed out",
        )))
        .context("switchover refused");
        assert_eq!(classify(&e), Kind::NotAllowed);
        let e = anyhow::Error::new(ClientError::Status(tonic::Status::unavailable("x")));
        assert_eq!(classify(&e), Kind::Unreachable);
        let e = anyhow::Error::new(ClientError::Status(tonic::Status::permission_denied("x")));
        assert_eq!(classify(&e), Kind::NotAuthorised);
        let e = anyhow::Error::new(ClientError::Status(tonic::Status::not_found("x")));
        assert_eq!(classify(&e), Kind::Invalid);
        assert_eq!(classify(&fail(Kind::TimedOut, "x")), Kind::TimedOut);
        assert_eq!(classify(&anyhow::anyhow!("refused")), Kind::Other);
        assert_eq!(
            classify(&anyhow::Error::new(ClientError::NoEndpoints)),
            Kind::Usage
        );
    }
}
