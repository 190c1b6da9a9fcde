//! `annals`: the command-line entry point. Arguments are parsed here; each
//! command lives in `commands/`, and the server itself in `annals-server`.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error (also 400/413/422), 3 conflict (409),
//! 4 not found or deleted (404/410), 5 unauthorized or forbidden (401/403),
//! 6 server unreachable, 7 damaged data found by `verify` or `repair`, 130 interrupted
//! (Ctrl-C during a `--data-dir` command).

mod client;
mod commands;
mod error;
mod local;
mod output;

use clap::{Parser, Subcommand};

use crate::{
    client::ClientArgs,
    error::CliError,
    local::{Missing, with_target},
};

/// Annals — an event store and event-sourcing toolkit.
#[derive(Debug, Parser)]
#[command(name = "annals", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP/SSE/WebSocket server.
    Serve(Box<commands::serve::ServeArgs>),
    /// Append events to a stream (JSON from the argument or stdin).
    Append(commands::data::AppendArgs),
    /// Read a stream, or `$all`.
    Read(commands::data::ReadArgs),
    /// Follow a stream or `$all` live (Server-Sent Events).
    Tail(commands::data::TailArgs),
    /// List streams.
    Streams(commands::data::StreamsArgs),
    /// Show store statistics.
    Stats(commands::data::StatsArgs),
    /// Export `$all` as JSON Lines (resumable).
    Export(commands::transfer::ExportArgs),
    /// Import JSON Lines written by `export` (resumable: already imported
    /// events are skipped).
    Import(commands::transfer::ImportArgs),
    /// Load-generate against a running server and report throughput and
    /// latency percentiles.
    Bench(commands::bench::BenchArgs),
    /// Check every record of an embedded log directory (CRCs, hash chain);
    /// exit 0 when intact, 7 when damaged.
    Verify(commands::log::VerifyArgs),
    /// Cut a damaged embedded log back to its last whole group before the
    /// damage (store closed; without --yes, only say what would go).
    Repair(commands::log::RepairArgs),
    /// Rebuild an embedded log's indexes from the log itself (store closed).
    RebuildIndex(commands::log::RebuildArgs),
    /// Benchmark the embedded log on this disk (durable appends, reads, open).
    BenchLog(commands::log::BenchLogArgs),
}

/// mimalloc instead of the system allocator: a request through hyper, axum
/// and serde makes a few dozen small allocations, and glibc's malloc/free
/// showed up as a third of the server's user time in profiles of small
/// appends.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let client = cli.client;
    // A client command runs against `--url`, or on `--data-dir` (see local.rs).
    macro_rules! on_target {
        ($args:expr, $missing:expr, $command:path) => {{
            let args = $args;
            with_target(args.local.clone(), &client, $missing, |c| async move { $command(args, &c).await })
                .await
        }};
    }
    let result: Result<(), CliError> = runtime.block_on(async move {
        match cli.command {
            Command::Serve(a) => commands::serve::run(*a).await,
            Command::Append(a) => on_target!(a, Missing::Create, commands::data::append),
            Command::Read(a) => on_target!(a, Missing::Refuse, commands::data::read),
            // Nothing else can append while this command holds the
            // directory's lock, so a tail from its end would wait forever.
            Command::Tail(a) if a.local.data_dir.is_some() && a.from.trim() == "end" => Err(CliError::Usage(
                "tail --data-dir --from end would never print: nothing else can append while this \
                     command holds the directory; use --from start or a version / position, or \
                     `annals read`"
                    .into(),
            )),
            Command::Tail(a) => on_target!(a, Missing::Refuse, commands::data::tail),
            Command::Streams(a) => on_target!(a, Missing::Refuse, commands::data::streams),
            Command::Stats(a) => on_target!(a, Missing::Refuse, commands::data::stats),
            Command::Export(a) => on_target!(a, Missing::Refuse, commands::transfer::export),
            Command::Import(a) => on_target!(a, Missing::Create, commands::transfer::import),
            Command::Bench(a) => commands::bench::run(a, &client).await,
            Command::Verify(a) => commands::log::verify(a).await,
            Command::Repair(a) => commands::log::repair(a).await,
            Command::RebuildIndex(a) => commands::log::rebuild_index(a).await,
            Command::BenchLog(a) => commands::log::bench_log(a).await,
        }
    });
    if let Err(e) = result {
        if !matches!(e, CliError::StdoutClosed) {
            eprintln!("error: {e}");
        }
        std::process::exit(e.exit_code());
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Clap checks argument definitions (unique names, valid `requires`)
    /// only when a command is parsed in a debug build; check all of them.
    #[test]
    fn argument_definitions_are_consistent() {
        super::Cli::command().debug_assert();
    }
}
