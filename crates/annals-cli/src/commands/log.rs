//! Commands that work directly on an embedded log directory: `verify`,
//! `repair`, `rebuild-index` and `bench-log`. They need no server.

use std::path::PathBuf;

use clap::Args;

use crate::{error::CliError, output::emit};

/// `annals verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Data directory of the embedded log.
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `annals repair`.
#[derive(Debug, Clone, Args)]
pub struct RepairArgs {
    /// Data directory of the embedded log (the store must be closed).
    pub dir: PathBuf,
    /// Cut the log. Without it, only say what would be removed.
    #[arg(long)]
    pub yes: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `annals rebuild-index`.
#[derive(Debug, Clone, Args)]
pub struct RebuildArgs {
    /// Data directory of the embedded log (the store must be closed).
    pub dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `annals bench-log`: the embedded log's benchmark (issue 3's figures, each
/// beside a baseline measured in the same run).
#[derive(Debug, Clone, Args)]
pub struct BenchLogArgs {
    /// Directory on the disk under test (phases use fresh subdirectories,
    /// removed afterwards).
    #[arg(long, default_value = "./annals-bench-data")]
    pub dir: PathBuf,
    /// A quick run: 100,000 events, short phases.
    #[arg(long)]
    pub small: bool,
    /// Events in the large store used for reads, open and rebuild.
    #[arg(long)]
    pub events: Option<u64>,
    /// Seconds per durable-append phase.
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Seconds of the raw fdatasync baseline.
    #[arg(long)]
    pub raw_seconds: Option<f64>,
    /// Concurrent single-event writers to measure, e.g. 1,8,64,256.
    #[arg(long, value_delimiter = ',')]
    pub writers: Option<Vec<usize>>,
}

/// Walks every record: CRCs, hash chain, framing. Exit 0 when intact, 7
/// when damage was found (the report names the first bad record).
pub async fn verify(args: VerifyArgs) -> Result<(), CliError> {
    let dir = args.dir.clone();
    let report = tokio::task::spawn_blocking(move || annals_log::verify(&dir))
        .await
        .map_err(|e| CliError::Other(format!("verify task failed: {e}")))?
        .map_err(|e| CliError::Other(format!("cannot verify {}: {e}", args.dir.display())))?;
    let printed = if args.json {
        let bad = report.first_bad.as_ref().map(|b| {
            serde_json::json!({
                "segment": b.segment, "offset": b.offset, "position": b.position,
                "reason": b.reason, "torn_tail": b.torn_tail, "cut_position": b.cut_position,
            })
        });
        let value = serde_json::json!({
            "ok": report.is_ok(), "segments": report.segments, "records": report.records,
            "events": report.events, "streams": report.streams, "bytes": report.bytes,
            "head_hash": report.head_hash, "first_bad": bad,
        });
        emit(value)
    } else {
        emit(&report)
    };
    if report.is_ok() {
        printed
    } else {
        // Exit 7 whether or not the report could be printed.
        Err(CliError::Damaged(format!("{} failed verification", args.dir.display())))
    }
}

/// Cuts a damaged log back to the start of the group of its first bad
/// record, so the store opens again with everything before it. Without
/// `--yes` it only reports what the cut would remove (exit 7 when there is
/// damage); with it, it cuts and reports what is left. Events after the
/// damage are lost: restore them from a backup or an export if you have one.
pub async fn repair(args: RepairArgs) -> Result<(), CliError> {
    let dir = args.dir.clone();
    if !dir.is_dir() {
        return Err(CliError::Usage(format!("{} is not a data directory", dir.display())));
    }
    let report = tokio::task::spawn_blocking(move || annals_log::verify(&dir))
        .await
        .map_err(|e| CliError::Other(format!("verify task failed: {e}")))?
        .map_err(|e| CliError::Other(format!("cannot verify {}: {e}", args.dir.display())))?;
    let Some(bad) = report.first_bad.clone() else {
        return if args.json {
            emit(serde_json::json!({ "ok": true, "events": report.events, "cut": null }))
        } else {
            emit(format_args!("{}: intact ({} events); nothing to repair", args.dir.display(), report.events))
        };
    };
    let lost = report.events.saturating_sub(bad.cut_position);
    let plan = serde_json::json!({
        "segment": bad.segment, "offset": bad.offset, "position": bad.position,
        "reason": bad.reason, "torn_tail": bad.torn_tail, "cut_position": bad.cut_position,
    });
    if !args.yes {
        // Exit 7 whether or not the plan could be printed.
        let _ = if args.json {
            emit(
                serde_json::json!({ "ok": false, "first_bad": plan, "events_before_damage": bad.cut_position,
                    "readable_events_removed": lost, "cut": false }),
            )
        } else {
            emit(format_args!(
                "first bad record: segment {}, offset {}, position {}: {}\n\
                 repair would cut the log back to position {}: events from position {} on are removed \
                 ({lost} of them were readable up to the damage; any after it are lost too).\n\
                 Run again with --yes to cut.",
                bad.segment, bad.offset, bad.position, bad.reason, bad.cut_position, bad.cut_position
            ))
        };
        return Err(CliError::Damaged(format!("{} is damaged; nothing was changed", args.dir.display())));
    }
    let dir = args.dir.clone();
    let (stats, next) = tokio::task::spawn_blocking(move || {
        let store = annals_log::LogStore::builder(&dir).repair(true).open()?;
        let stats = store.stats();
        store.close()?;
        Ok::<_, annals_log::LogError>((stats.truncated_on_open, stats.next_position))
    })
    .await
    .map_err(|e| CliError::Other(format!("repair task failed: {e}")))?
    .map_err(|e| match e {
        annals_log::LogError::Locked { .. } => {
            CliError::Usage(format!("{e}; stop the server using it first"))
        }
        other => CliError::Other(format!("cannot repair {}: {other}", args.dir.display())),
    })?;
    if args.json {
        emit(serde_json::json!({ "ok": true, "first_bad": plan, "cut": stats.is_some(), "events": next }))
    } else {
        emit(format_args!(
            "cut {} back to position {}; it holds {next} events now",
            args.dir.display(),
            bad.cut_position
        ))
    }
}

/// Rebuilds the index checkpoint from the log alone.
pub async fn rebuild_index(args: RebuildArgs) -> Result<(), CliError> {
    let dir = args.dir.clone();
    let report = tokio::task::spawn_blocking(move || annals_log::rebuild_indexes(&dir))
        .await
        .map_err(|e| CliError::Other(format!("rebuild task failed: {e}")))?
        .map_err(|e| match e {
            annals_log::LogError::Locked { .. } => {
                CliError::Usage(format!("{e}; stop the server using it first"))
            }
            other => CliError::Other(format!("cannot rebuild the index of {}: {other}", args.dir.display())),
        })?;
    if args.json {
        let value = serde_json::json!({
            "events": report.events, "records": report.records, "streams": report.streams,
            "seconds": report.seconds, "events_per_second": report.events_per_second,
        });
        emit(value)
    } else {
        emit(format_args!(
            "rebuilt the index of {}: {} events, {} streams in {:.2} s ({:.0} events/s)",
            args.dir.display(),
            report.events,
            report.streams,
            report.seconds,
            report.events_per_second
        ))
    }
}

/// Runs the embedded log benchmark and prints its table.
pub async fn bench_log(args: BenchLogArgs) -> Result<(), CliError> {
    use annals_log::bench::{self, BenchConfig};
    let mut cfg = if args.small { BenchConfig::small(&args.dir) } else { BenchConfig::new(&args.dir) };
    if let Some(n) = args.events {
        cfg.store_events = n;
    }
    if let Some(s) = args.seconds {
        cfg.append_seconds = s;
    }
    if let Some(s) = args.raw_seconds {
        cfg.raw_seconds = s;
    }
    if let Some(w) = args.writers {
        cfg.writers = w;
    }
    eprintln!(
        "annals-log bench in {} ({} events in the large store) ...",
        args.dir.display(),
        cfg.store_events
    );
    let report = tokio::task::spawn_blocking(move || bench::run(&cfg))
        .await
        .map_err(|e| CliError::Other(format!("bench task failed: {e}")))?
        .map_err(|e| CliError::Other(format!("bench failed: {e}")))?;
    emit(report)
}
