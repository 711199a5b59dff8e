//! How long a certificate may live.

use std::time::Duration;

use time::OffsetDateTime;

use crate::error::IssueError;

/// Clock skew we tolerate between the CA and its callers: leaves start this much in
/// the past so a caller whose clock is a little behind can use them at once. Short
/// leaves are backdated by a tenth of their TTL at most, so that their lifetime (which
/// agents schedule renewal from) stays close to what was asked.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// The smallest lifetime worth issuing; a signer with less left than this refuses.
pub const MIN_TTL: Duration = Duration::from_secs(10);

/// TTL policy for one issuance path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IssuancePolicy {
    /// Lifetime when the caller does not ask for one (0 or negative on the wire).
    pub default_ttl: Duration,
    /// Largest lifetime a caller may ask for.
    pub max_ttl: Duration,
    /// What a request above `max_ttl` gets.
    pub above_max: AboveMax,
}

/// What a request for more than the maximum lifetime gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AboveMax {
    /// Refused (`TtlTooLong`): the caller learns it asked too much.
    Refuse,
    /// The maximum. For clients that cannot be told (the old node agents ask for 90
    /// days by default); the audit record keeps what was asked.
    Clamp,
}

/// The validity window granted for one certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity (backdated, never before the signer's own start).
    pub not_before: OffsetDateTime,
    /// End of validity (never after the signer's own end).
    pub not_after: OffsetDateTime,
}

impl IssuancePolicy {
    /// The lifetime to grant for a requested TTL in seconds (`<= 0`: default).
    pub fn granted_ttl(&self, requested_secs: i64) -> Result<Duration, IssueError> {
        if requested_secs <= 0 {
            return Ok(self.default_ttl);
        }
        let requested = Duration::from_secs(requested_secs as u64);
        if requested > self.max_ttl {
            if self.above_max == AboveMax::Clamp {
                return Ok(self.max_ttl);
            }
            return Err(IssueError::TtlTooLong {
                requested_secs,
                max_secs: self.max_ttl.as_secs() as i64,
            });
        }
        Ok(requested)
    }

    /// The validity window for `ttl` starting at `now`, clamped to the signer's window.
    pub fn validity(
        ttl: Duration,
        now: OffsetDateTime,
        signer_not_before: OffsetDateTime,
        signer_not_after: OffsetDateTime,
    ) -> Result<Validity, IssueError> {
        // X.509 times have whole seconds; decide on what will be encoded.
        let now = now - time::Duration::nanoseconds(i64::from(now.nanosecond()));
        let backdate = Duration::from_secs(BACKDATE.min(ttl / 10).as_secs());
        let not_before = (now - backdate).max(signer_not_before);
        let not_after = now + Duration::from_secs(ttl.as_secs());
        let not_after = not_after.min(signer_not_after);
        if not_after - now < MIN_TTL.min(ttl) {
            return Err(IssueError::SignerExpired);
        }
        Ok(Validity {
            not_before,
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const POLICY: IssuancePolicy = IssuancePolicy {
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(86400),
        above_max: crate::policy::AboveMax::Refuse,
    };

    #[test]
    fn clamped_above_the_maximum_when_so_configured() {
        let clamp = IssuancePolicy {
            above_max: AboveMax::Clamp,
            ..POLICY
        };
        let ninety_days = 90 * 86400;
        assert_eq!(clamp.granted_ttl(ninety_days).unwrap(), POLICY.max_ttl);
        assert_eq!(clamp.granted_ttl(3600).unwrap(), Duration::from_secs(3600));
        assert_eq!(clamp.granted_ttl(0).unwrap(), POLICY.default_ttl);
    }

    #[test]
    fn default_and_maximum() {
        assert_eq!(POLICY.granted_ttl(0).unwrap(), Duration::from_secs(3600));
        assert_eq!(POLICY.granted_ttl(-5).unwrap(), Duration::from_secs(3600));
        assert_eq!(
            POLICY.granted_ttl(86400).unwrap(),
            Duration::from_secs(86400)
        );
        assert!(matches!(
            POLICY.granted_ttl(86401),
            Err(IssueError::TtlTooLong { .. })
        ));
    }

    #[test]
    fn leaf_never_outlives_signer() {
        let now = datetime!(2030-01-01 00:00 UTC);
        let v = IssuancePolicy::validity(
            Duration::from_secs(7200),
            now,
            now - time::Duration::seconds(10),
            now + time::Duration::hours(1),
        )
        .unwrap();
        assert_eq!(v.not_after, now + time::Duration::hours(1));
        assert_eq!(v.not_before, now - time::Duration::seconds(10));
        let short = IssuancePolicy::validity(
            Duration::from_secs(20),
            now,
            now - time::Duration::days(1),
            now + time::Duration::days(1),
        )
        .unwrap();
        assert_eq!(
            short.not_before,
            now - time::Duration::seconds(2),
            "backdated by a tenth of a short TTL"
        );
        let expired = IssuancePolicy::validity(
            Duration::from_secs(7200),
            now,
            now - time::Duration::days(10),
            now - time::Duration::days(1),
        );
        assert_eq!(expired, Err(IssueError::SignerExpired));
    }
}
