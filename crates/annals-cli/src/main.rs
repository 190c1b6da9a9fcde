//! `annals`: the command-line entry point. Parsing lives here; the work lives
//! in the library crates.

use clap::Parser;

/// Annals — an event store and event-sourcing toolkit.
#[derive(Debug, Parser)]
#[command(name = "annals", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
