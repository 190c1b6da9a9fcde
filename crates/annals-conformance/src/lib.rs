//! # annals-conformance
//!
//! The behaviours every Annals backend must show, written once. A backend's
//! `tests/conformance.rs` is one line:
//!
//! ```ignore
//! annals_conformance::suite!(async { annals_conformance::Fixture::new(annals_core::MemoryStore::new()) });
//! ```
//!
//! The expression is evaluated once per test and must produce a fresh,
//! empty store wrapped in a [`Fixture`] (which can also hold a guard such as
//! a temporary directory or a database schema that must outlive the test).
//! The backend crate needs `tokio` (with `macros` and `rt-multi-thread`) as a
//! dev-dependency.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::any::Any;

pub mod behaviours;
pub mod model;
mod support;

/// A fresh store for one test, plus whatever must live as long as it.
pub struct Fixture<S> {
    /// The store under test.
    pub store: S,
    guard: Option<Box<dyn Any + Send>>,
}

impl<S> Fixture<S> {
    /// A store that needs no guard.
    pub fn new(store: S) -> Self {
        Fixture { store, guard: None }
    }

    /// A store with a guard (dropped after the test).
    pub fn with_guard(store: S, guard: impl Any + Send) -> Self {
        Fixture { store, guard: Some(Box::new(guard)) }
    }

    /// Whether a guard is held.
    pub fn has_guard(&self) -> bool {
        self.guard.is_some()
    }
}

/// Instantiates the whole suite: one `#[tokio::test]` per behaviour.
#[macro_export]
macro_rules! suite {
    ($make:expr) => {
        $crate::__suite_tests!(
            $make;
            append_to_new_stream_starts_at_version_zero,
            append_result_reports_next_version_and_last_position,
            versions_are_gapless_across_appends,
            positions_are_gapless_across_streams,
            expected_no_stream_fails_when_stream_exists,
            expected_exact_succeeds_when_matching,
            expected_exact_fails_with_actual_version,
            expected_exact_on_missing_stream_reports_no_stream,
            expected_stream_exists_fails_on_missing_stream,
            expected_any_always_appends,
            failed_append_writes_nothing,
            idempotent_resend_returns_original_result,
            idempotent_resend_of_batch_writes_nothing,
            stale_resend_after_later_writes_conflicts,
            duplicate_ids_in_one_append_are_rejected,
            empty_append_is_rejected,
            read_stream_forward_with_limit,
            read_stream_forward_from_version,
            read_stream_backward_from_end,
            read_stream_backward_from_version,
            read_missing_stream_is_not_found,
            read_forward_past_end_is_empty,
            reads_with_limit_zero_return_nothing,
            read_all_forward_in_position_order,
            read_all_backward,
            read_all_pages_with_next,
            filter_by_category,
            filter_by_stream_prefix,
            filter_by_event_type_exact_and_prefix,
            filter_by_correlation_id,
            filter_by_time_range,
            system_streams_hidden_unless_asked,
            stream_info_reports_lifecycle,
            list_streams_pages_by_name_with_prefix,
            soft_deleted_stream_reads_as_not_found,
            soft_deleted_stream_recreated_continues_versions,
            soft_delete_checks_expected_version,
            soft_delete_of_missing_stream_is_not_found,
            tombstone_rejects_appends_forever,
            tombstoned_stream_reads_as_deleted,
            tombstone_of_missing_stream_blocks_creation,
            resends_after_deletes_follow_the_rules_order,
            list_streams_reports_deletion_states,
            multi_append_is_atomic_on_conflict,
            multi_append_positions_are_consecutive,
            multi_append_rejects_repeated_stream,
            multi_append_idempotent_resend,
            event_size_limit_is_enforced,
            events_per_append_limit_is_enforced,
            append_size_limit_is_enforced,
            invalid_json_data_is_rejected,
            invalid_event_type_is_rejected,
            invalid_correlation_id_is_rejected,
            filters_with_control_characters_are_rejected,
            numbers_beyond_the_stored_range_are_refused_not_clamped,
            metadata_round_trips,
            unicode_round_trips,
            one_mib_payload_round_trips,
            binary_content_type_round_trips,
            recorded_at_is_now_and_ordered,
            next_position_counts_events,
            store_stats_agree_with_a_full_scan_of_all,
            concurrent_exact_appends_have_one_winner_per_version,
            concurrent_appends_to_different_streams_are_gapless,
            subscribe_all_delivers_history_then_live,
            subscribe_all_during_concurrent_appends_sees_each_event_once_in_order,
            subscribe_stream_from_start,
            subscribe_stream_after_version,
            subscribe_from_end_sees_only_new_events,
            subscribe_from_end_after_concurrent_appends_sees_none_of_them,
            subscribe_all_with_filter,
            subscribe_to_missing_stream_waits_for_it,
            slow_subscriber_does_not_block_writers_or_lose_events,
            subscription_to_tombstoned_stream_ends_with_error,
            subscription_learns_of_tombstone_without_a_later_append,
            stream_subscriptions_follow_a_soft_delete_and_recreation,
            subscriptions_after_the_largest_numbers_wait_quietly,
            live_subscriptions_leave_system_streams_out_unless_asked,
            subscriptions_from_the_end_of_deleted_streams,
            snapshots_load_latest_and_by_version,
            snapshots_prune_keeps_newest,
            snapshot_bounds_at_the_extremes,
            checkpoints_round_trip,
            leases_have_one_holder_per_name_until_dropped,
            lease_names_are_validated,
            lease_holders_are_published_while_held,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_tests {
    ($make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let fixture = $make.await;
                $crate::behaviours::$name(fixture.store.clone()).await;
                drop(fixture);
            }
        )*
    };
}
