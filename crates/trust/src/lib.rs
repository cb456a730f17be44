//! Trust: the certificates pgquorum makes itself (`pgquorum cert ...`), the identities
//! they name and what each may do, and the one module that builds every network
//! endpoint and server (mutual TLS 1.3, or plain TCP under `--insecure`).

pub mod authz;
pub mod certs;
pub mod identity;
pub mod tls;
pub mod transport;

pub use authz::{authorize, caller, check_keeper_is, Caller, Need, CALLER_HEADER};
pub use certs::{CertError, CertInfo, CertsDir, Validity};
pub use identity::{ClientRole, Identity, IdentityError};
pub use tls::{Tls, TlsError};
pub use transport::{
    channel, https_incoming, incoming, Dial, DialError, PeerInfo, Security, Serve, INSECURE_WARNING,
};
