//! Human output: tables and short value rendering.

use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

use crate::error::CliError;

/// A table with the house style.
pub fn table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(headers);
    t
}

/// A JSON value as a short single-line string.
pub fn short(v: &Value, max: usize) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    if s.chars().count() > max {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    } else {
        s
    }
}

/// Stored JSON text as a short single-line string: a string's value, or
/// the text itself (every digit of a number as it was written).
pub fn short_raw(raw: &serde_json::value::RawValue, max: usize) -> String {
    match serde_json::from_str::<String>(raw.get()) {
        Ok(s) => short(&Value::String(s), max),
        Err(_) => short(&Value::String(crate::client::one_line(raw.get()).into_owned()), max),
    }
}

/// Prints one line on stdout. When stdout is closed (`annals tail | head`)
/// the command has nothing left to do: [`CliError::StdoutClosed`] ends it
/// quietly with 0 (after a `--data-dir` command has closed its log),
/// instead of the panic of `println!`. Any other write error (a full disk
/// under `> file`) is an error.
pub fn emit(line: impl std::fmt::Display) -> Result<(), CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).map_err(stdout_error)
}

/// A failed write to stdout as a [`CliError`].
pub fn stdout_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::StdoutClosed
    } else {
        CliError::Other(format!("cannot write to stdout: {e}"))
    }
}

/// Prints JSON compactly (for `--json`).
pub fn print_json(v: &Value) -> Result<(), CliError> {
    emit(v)
}

/// A table of events.
pub fn events_table(events: &[crate::client::EventView]) -> Table {
    let mut t = table(&["position", "stream", "version", "type", "recorded_at", "data"]);
    for e in events {
        t.add_row(vec![
            short(&e.position, 20),
            short(&e.stream, 40),
            short(&e.version, 20),
            short(&e.event_type, 40),
            short(&e.recorded_at, 32),
            short_raw(&e.data, 60),
        ]);
    }
    t
}
