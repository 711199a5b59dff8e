//! Audit: every decision (issued, denied, revoked) is recorded durably before the
//! caller hears the answer.

mod record;
mod store;
mod writer;

pub use record::{Api, AuditRecord, Decision, GENESIS_HASH, Outcome};
pub use store::{
    Append, AuditError, AuditStore, ListFilter, Revocation, VerifyReport, now_rfc3339,
};
pub use writer::{AuditHealth, AuditWriter};
