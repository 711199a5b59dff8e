//! Audit: every decision (issued, denied, revoked) is recorded durably before the
//! caller hears the answer, in SQLite or PostgreSQL; the revoked serials this replica
//! enforces are kept fresh from the same store.

pub mod checkpoint;
mod record;
pub mod revocations;
pub mod schema;
mod store;
mod writer;

pub use checkpoint::{Checkpoint, CheckpointBody, CheckpointHead};
pub use record::{
    Api, AuditRecord, Decision, EncodeError, MAX_ATTACKER_TEXT, Outcome, bounded, rfc3339_secs,
};
pub use revocations::{RevocationView, Stale};
pub use store::{
    Append, Appended, AuditError, AuditStore, ChainHead, Dialect, IssuedCertificate, ListFilter,
    Revocation, Revoke, StoreLocation, VerifyReport, now_us,
};
pub use writer::{AuditHealth, AuditWriter};
