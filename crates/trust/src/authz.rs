//! Who is calling, and whether that identity may make the call.
//!
//! The caller is the identity in the client certificate of the connection the request
//! came on. One exception, and only for members: a member forwarding a call to the
//! leader names the original caller in the `x-pgquorum-caller` header, so the leader
//! checks the original caller's rights, not the member's (a member cannot launder a
//! call). The header from anyone but a member is refused.

use tonic::{Request, Status};

use crate::identity::{short, Identity};
use crate::transport::PeerInfo;

/// Metadata naming the original caller of a forwarded request (`ROLE/NAME`).
pub const CALLER_HEADER: &str = "x-pgquorum-caller";

/// The effective caller of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The server runs with `--insecure`: nobody is authenticated, everything is allowed.
    Anonymous,
    Id(Identity),
}

impl Caller {
    /// How `show events` names who asked for a change.
    pub fn label(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous (--insecure)".to_owned(),
            Caller::Id(id) => id.role_name(),
        }
    }

    /// The value of [`CALLER_HEADER`] when this caller's request is forwarded.
    pub fn header(&self) -> Option<String> {
        match self {
            Caller::Anonymous => None,
            Caller::Id(id) => Some(id.role_name()),
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Anonymous => f.write_str("an anonymous caller"),
            Caller::Id(id) => write!(f, "{id}"),
        }
    }
}

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Reading state, events, settings, member status: viewers, operators, members.
    Read,
    /// Changing state, settings or membership: operators.
    Operate,
    /// Registering and heartbeating: a keeper (as its own node only: checked by the
    /// handler against the request).
    Keeper,
    /// The Raft transport: members.
    Raft,
}

impl Need {
    fn role(self) -> &'static str {
        match self {
            Need::Read => "the viewer or operator role",
            Need::Operate => "the operator role",
            Need::Keeper => "a keeper certificate",
            Need::Raft => "a monitor member certificate",
        }
    }
}

/// The effective caller of `req` (see the module comment).
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let Some(peer) = PeerInfo::of(req) else {
        return Err(Status::unauthenticated(
            "no connection information: this server was not built by the transport module",
        ));
    };
    if !peer.tls {
        return Ok(Caller::Anonymous);
    }
    let Some(direct) = peer.identity.clone() else {
        return Err(Status::unauthenticated(
            "the client certificate names no pgquorum identity",
        ));
    };
    let forwarded = req.metadata().get(CALLER_HEADER);
    match (&direct, forwarded) {
        (_, None) => Ok(Caller::Id(direct)),
        (Identity::Member(_), Some(v)) => {
            let text = v
                .to_str()
                .map_err(|_| Status::invalid_argument("x-pgquorum-caller is not text"))?;
            Identity::parse_role_name(text)
                .map(Caller::Id)
                .map_err(|e| Status::invalid_argument(format!("x-pgquorum-caller: {e}")))
        }
        (other, Some(_)) => Err(Status::permission_denied(format!(
            "{other} may not name another caller (only monitor members forward calls)"
        ))),
    }
}

/// The effective caller, if it may make a call that needs `need`; `what` names the
/// call in the refusal ("perform switchover").
pub fn authorize<T>(req: &Request<T>, need: Need, what: &str) -> Result<Caller, Status> {
    let c = caller(req)?;
    let allowed = match (&c, need) {
        (Caller::Anonymous, _) => true,
        (Caller::Id(id), Need::Read) => matches!(
            id,
            Identity::Viewer(_) | Identity::Operator(_) | Identity::Member(_)
        ),
        (Caller::Id(id), Need::Operate) => matches!(id, Identity::Operator(_)),
        (Caller::Id(id), Need::Keeper) => matches!(id, Identity::Keeper(_)),
        (Caller::Id(id), Need::Raft) => matches!(id, Identity::Member(_)),
    };
    if allowed {
        Ok(c)
    } else {
        Err(Status::permission_denied(format!(
            "{c} may not {what}: it needs {}",
            need.role()
        )))
    }
}

/// Refuses a keeper acting as another node than the one its certificate names.
pub fn check_keeper_is(caller: &Caller, node: &str) -> Result<(), Status> {
    match caller {
        Caller::Anonymous => Ok(()),
        Caller::Id(Identity::Keeper(name)) if name == node => Ok(()),
        Caller::Id(id) => Err(Status::permission_denied(format!(
            "{id} may not act as node {:?}: a keeper certificate acts only as the node it names",
            short(node)
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn req(identity: Option<Identity>, tls: bool, header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        r.extensions_mut().insert(PeerInfo {
            remote: None,
            tls,
            identity,
        });
        if let Some(h) = header {
            r.metadata_mut().insert(CALLER_HEADER, h.parse().unwrap());
        }
        r
    }

    #[test]
    fn roles_are_enforced() {
        let viewer = req(Some(Identity::Viewer("v".into())), true, None);
        assert!(authorize(&viewer, Need::Read, "read").is_ok());
        let e = authorize(&viewer, Need::Operate, "perform switchover").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("viewer v may not perform switchover"));
        let op = req(Some(Identity::Operator("o".into())), true, None);
        assert!(authorize(&op, Need::Operate, "x").is_ok());
        assert!(authorize(&op, Need::Raft, "x").is_err());
        assert!(authorize(&op, Need::Keeper, "x").is_err());
        let k = req(Some(Identity::Keeper("a".into())), true, None);
        let c = authorize(&k, Need::Keeper, "x").unwrap();
        assert!(check_keeper_is(&c, "a").is_ok());
        assert!(check_keeper_is(&c, "b").is_err());
        assert!(authorize(&k, Need::Operate, "x").is_err());
        let none = req(None, true, None);
        assert_eq!(
            authorize(&none, Need::Read, "x").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            authorize(&Request::new(()), Need::Read, "x")
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn only_members_forward_and_the_original_caller_is_checked() {
        // A member forwarding a viewer's switchover: refused as the viewer.
        let fwd = req(Some(Identity::Member(1)), true, Some("viewer/v"));
        assert!(authorize(&fwd, Need::Operate, "x").is_err());
        let fwd = req(Some(Identity::Member(1)), true, Some("operator/o"));
        assert_eq!(
            authorize(&fwd, Need::Operate, "x").unwrap(),
            Caller::Id(Identity::Operator("o".into()))
        );
        // A viewer naming an operator in the header: refused outright.
        let forged = req(Some(Identity::Viewer("v".into())), true, Some("operator/o"));
        assert_eq!(
            authorize(&forged, Need::Read, "x").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        // A member acting on its own is no operator.
        let m = req(Some(Identity::Member(2)), true, None);
        assert!(authorize(&m, Need::Operate, "x").is_err());
        assert!(authorize(&m, Need::Raft, "x").is_ok());
    }

    #[test]
    fn insecure_servers_allow_everything() {
        let anon = req(None, false, None);
        assert_eq!(
            authorize(&anon, Need::Operate, "x").unwrap(),
            Caller::Anonymous
        );
    }
}
