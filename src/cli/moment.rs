//! A time on the command line: an RFC 3339 time, or a duration meaning that long ago, told
//! by the database's clock (the one `sent_at` was written with).

use chrono::{DateTime, TimeDelta, Utc};

/// A point in time as the operator wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Moment {
    At(DateTime<Utc>),
    Ago(std::time::Duration),
}

impl std::str::FromStr for Moment {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(at) = DateTime::parse_from_rfc3339(text) {
            return Ok(Moment::At(at.with_timezone(&Utc)));
        }
        match humantime::parse_duration(text) {
            Ok(ago) if TimeDelta::from_std(ago).is_ok_and(|d| d < TimeDelta::days(365 * 100)) => {
                Ok(Moment::Ago(ago))
            }
            _ => Err(format!(
                "`{}` is neither an RFC 3339 time (2026-12-07T09:00:00Z) nor a duration ago (24h, 30m)",
                crate::model::printable(text, 64)
            )),
        }
    }
}

impl Moment {
    /// The time this names, `now` being the database's.
    pub(crate) fn resolve(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Moment::At(at) => at,
            Moment::Ago(ago) => now - TimeDelta::from_std(ago).unwrap_or(TimeDelta::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moment_is_a_time_or_a_duration_ago() {
        let now: DateTime<Utc> = "2026-12-07T12:00:00Z".parse().unwrap();
        let at: Moment = "2026-12-06T10:30:00+01:00".parse().unwrap();
        assert_eq!(at.resolve(now).to_rfc3339(), "2026-12-06T09:30:00+00:00");
        let ago: Moment = "90m".parse().unwrap();
        assert_eq!(ago.resolve(now).to_rfc3339(), "2026-12-07T10:30:00+00:00");
        for bad in ["yesterday", "", "2026-13-01T00:00:00Z", "99999999999d"] {
            assert!(bad.parse::<Moment>().is_err(), "{bad} must be refused");
        }
    }
}
