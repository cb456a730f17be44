//! pgquorum-keeper: the one part of pgquorum that touches PostgreSQL.
//!
//! Its job: run beside one PostgreSQL server, report its state and LSNs to the monitor
//! group, drive it to the goal state the monitor assigns (initdb, clone, promote,
//! demote, rewind, replication settings), restart it when it crashes, stop it when the
//! lease runs out, and answer health probes.
//!
//! What it must never do: decide a goal state itself, run as root, leave a writable
//! primary behind without a lease (or after the keeper died), or change anything when
//! the data directory belongs to another cluster.

pub mod addresses;
pub mod error;
pub mod http;
pub mod instance;
pub mod keeper;
pub mod monitor_client;
pub mod pg;
pub mod pgconf;
pub mod settings;
pub mod shared;
pub mod sql;
pub mod state;
pub mod transition;

pub use error::KeeperError;
pub use instance::Instance;
pub use keeper::{run, Source};
pub use settings::Settings;
pub use shared::Shared;
