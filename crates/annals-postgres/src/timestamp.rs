//! `timestamptz` <-> [`Timestamp`] without a date-time crate.
//!
//! PostgreSQL's binary `timestamptz` is microseconds since 2000-01-01 UTC,
//! exactly the precision of [`Timestamp`]; only the epoch differs.

use std::error::Error as StdError;

use annals_core::Timestamp;
use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

/// Microseconds between 1970-01-01 and 2000-01-01.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// PostgreSQL's earliest `timestamptz` (4714-11-24 00:00 UTC, BC), in its
/// own microseconds since 2000; anything earlier but `-infinity` is refused
/// ("timestamp out of range"). Its latest lies beyond every [`Timestamp`].
const PG_MIN_MICROS: i64 = -211_813_488_000_000_000;

/// Whether PostgreSQL can store `t` as itself (not as `-infinity`).
pub(crate) fn storable(t: Timestamp) -> bool {
    t.as_micros().saturating_sub(PG_EPOCH_OFFSET_MICROS) >= PG_MIN_MICROS
}

/// A [`Timestamp`] as a `timestamptz` parameter or column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PgTimestamp(pub Timestamp);

impl<'a> FromSql<'a> for PgTimestamp {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| "timestamptz must be 8 bytes")?;
        let pg = i64::from_be_bytes(bytes);
        // ±infinity are i64::MAX/MIN; saturate rather than overflow.
        Ok(PgTimestamp(Timestamp::from_micros(pg.saturating_add(PG_EPOCH_OFFSET_MICROS))))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

impl ToSql for PgTimestamp {
    /// An instant before PostgreSQL's first goes as `-infinity` (i64::MIN
    /// on the wire): as a filter bound it selects exactly the same events
    /// (none is recorded that early).
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        let pg = self.0.as_micros().saturating_sub(PG_EPOCH_OFFSET_MICROS);
        let pg = if pg < PG_MIN_MICROS { i64::MIN } else { pg };
        out.extend_from_slice(&pg.to_be_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_binary_format() {
        for micros in [0, 1, -1, 946_684_800_000_000, 1_763_800_000_123_456] {
            let ts = PgTimestamp(Timestamp::from_micros(micros));
            let mut buf = BytesMut::new();
            assert!(matches!(ts.to_sql(&Type::TIMESTAMPTZ, &mut buf), Ok(IsNull::No)));
            assert_eq!(PgTimestamp::from_sql(&Type::TIMESTAMPTZ, &buf).ok(), Some(ts));
        }
        // 2000-01-01 is zero on the wire.
        let mut buf = BytesMut::new();
        assert!(
            PgTimestamp(Timestamp::from_micros(PG_EPOCH_OFFSET_MICROS))
                .to_sql(&Type::TIMESTAMPTZ, &mut buf)
                .is_ok()
        );
        assert_eq!(buf.as_ref(), &[0u8; 8]);
        assert!(PgTimestamp::from_sql(&Type::TIMESTAMPTZ, &[1, 2, 3]).is_err());
        // Before 4714 BC: -infinity; the first valid instant goes as itself.
        for (micros, wire) in [
            (i64::MIN, i64::MIN),
            (-(1 << 62), i64::MIN),
            (PG_MIN_MICROS + PG_EPOCH_OFFSET_MICROS - 1, i64::MIN),
            (PG_MIN_MICROS + PG_EPOCH_OFFSET_MICROS, PG_MIN_MICROS),
        ] {
            let mut buf = BytesMut::new();
            assert!(PgTimestamp(Timestamp::from_micros(micros)).to_sql(&Type::TIMESTAMPTZ, &mut buf).is_ok());
            assert_eq!(buf.as_ref(), &wire.to_be_bytes(), "{micros}");
        }
    }
}
