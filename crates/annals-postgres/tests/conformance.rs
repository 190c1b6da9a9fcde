//! The conformance suite on PostgreSQL, one fresh schema per test (skipped
//! when the database is unreachable, unless ANNALS_REQUIRE_SERVICES=1).
mod common;
annals_conformance::suite!(std::future::ready(match common::fixture().await {
    Some(f) => f,
    None => return,
}));
