//! Runs `annals_log::bench` and prints the table.
//!
//! ```text
//! cargo run --release -p annals-log --example log_bench -- [--small] [--dir DIR] [--events N]
//!     [--seconds S] [--raw-seconds S] [--writers 1,8,64,256]
//! ```
//! Run on a quiet machine: fsync rates fall about tenfold during a compile.

use annals_log::bench::{self, BenchConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let dir = value("--dir").unwrap_or_else(|| "./annals-bench-data".to_owned());
    let mut cfg =
        if args.iter().any(|a| a == "--small") { BenchConfig::small(&dir) } else { BenchConfig::new(&dir) };
    if let Some(n) = value("--events") {
        cfg.store_events = n.parse()?;
    }
    if let Some(s) = value("--seconds") {
        cfg.append_seconds = s.parse()?;
    }
    if let Some(s) = value("--raw-seconds") {
        cfg.raw_seconds = s.parse()?;
    }
    if let Some(w) = value("--writers") {
        cfg.writers = w.split(',').map(str::parse).collect::<Result<_, _>>()?;
    }
    eprintln!("annals-log bench in {dir} ({} events in the large store) ...", cfg.store_events);
    let report = bench::run(&cfg)?;
    println!("{report}");
    Ok(())
}
