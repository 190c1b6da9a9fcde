//! `annals export` / `annals import`: `$all` as JSON Lines, one event (the
//! API's event shape) per line, with a progress bar. Both resume: export
//! from the last position already in the output file, import by skipping
//! events the target already has.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    path::PathBuf,
};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json, value::RawValue};

use crate::{
    client::{Client, ClientArgs, RawPage, enc, one_line},
    commands::data::Head,
    error::CliError,
    output::{emit, stdout_error},
};

/// `annals export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Output file (stdout when absent).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// First position to export (inclusive).
    #[arg(long, default_value_t = 0)]
    pub from: u64,
    /// Continue an interrupted export: start after the last event already
    /// in --output and append to it.
    #[arg(long, requires = "output")]
    pub resume: bool,
    /// Only streams starting with this.
    #[arg(long)]
    pub stream_prefix: Option<String>,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    pub page: usize,
    /// Run on a data directory instead of a server.
    #[command(flatten)]
    pub local: crate::local::LocalArgs,
}

/// `annals import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// JSON Lines file written by `annals export` (stdin when absent or `-`).
    pub input: Option<PathBuf>,
    /// Events per append request (per stream); a request the server finds
    /// too large (413) is split.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Run on a data directory instead of a server.
    #[command(flatten)]
    pub local: crate::local::LocalArgs,
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// The position of an exported event; its other fields are skipped unparsed.
#[derive(serde::Deserialize)]
struct Exported {
    #[serde(default)]
    position: Option<u64>,
}

fn last_position_in(path: &PathBuf) -> Result<Option<u64>, CliError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut last = None;
    for line in BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        // A torn last line (interrupted write) is ignored and rewritten.
        // Only the position is parsed: the data is exported exactly, and a
        // number in it that `Value` cannot hold must not hide the line.
        if let Ok(Exported { position: Some(p) }) = serde_json::from_str::<Exported>(&line) {
            last = Some(p);
        }
    }
    Ok(last)
}

/// Exports `$all`.
pub async fn export(args: ExportArgs, c: &ClientArgs) -> Result<(), CliError> {
    let client = Client::new(c)?;
    let mut from = args.from;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => {
            if args.resume {
                // An unterminated last line goes first, even when it is a
                // whole event (the export stopped just before its newline):
                // counted as exported and then cut off, it would be lost.
                // Cut off first, it is simply exported again.
                truncate_torn_tail(path)?;
                if let Some(last) = last_position_in(path)? {
                    from = from.max(last + 1);
                }
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(args.resume)
                .write(true)
                .truncate(!args.resume)
                .open(path)?;
            Box::new(std::io::BufWriter::new(file))
        }
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    // Only the head is wanted; a key restricted to stream prefixes may read
    // `$all` only through one, as the pages below do.
    let mut head_path = "/all?limit=1&direction=backward".to_owned();
    if let Some(p) = &args.stream_prefix {
        head_path.push_str(&format!("&stream_prefix={}", enc(p)));
    }
    let info: Head = client.parse(client.request(Method::GET, &head_path)).await?;
    let head = info.head.unwrap_or(0);
    let bar = progress(head.saturating_sub(from), "exporting");
    if args.output.is_none() || c.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut exported = 0u64;
    loop {
        let mut path = format!("/all?from={from}&limit={}", args.page);
        if let Some(p) = &args.stream_prefix {
            path.push_str(&format!("&stream_prefix={}", enc(p)));
        }
        // Each event is written as the server sent it, on one line: the
        // data's exact JSON text, which a `Value` would change (numbers).
        let page: RawPage = client.parse(client.request(Method::GET, &path)).await?;
        for e in &page.events {
            writeln!(out, "{}", one_line(e.get())).map_err(stdout_error)?;
        }
        exported += page.events.len() as u64;
        let next = page.next.unwrap_or(from);
        bar.inc(next.saturating_sub(from));
        if next <= from || next >= head {
            break;
        }
        from = next;
    }
    out.flush().map_err(stdout_error)?;
    bar.finish_and_clear();
    if args.output.is_some() {
        let summary = json!({ "exported": exported, "next_position": head });
        if c.json {
            emit(summary)?;
        } else {
            eprintln!("exported {exported} event(s); resume later with --resume");
        }
    }
    Ok(())
}

/// Drops an unterminated last line left by an interrupted export. Reads
/// the file backwards from its end, so a large export is not loaded whole.
fn truncate_torn_tail(path: &PathBuf) -> Result<(), CliError> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let len = file.metadata()?.len();
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(start))?;
        (&mut file).take(end - start).read_to_end(&mut buf)?;
        if let Some(i) = buf.iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                file.set_len(keep)?;
            }
            return Ok(());
        }
        end = start;
    }
    // No newline at all: the one line there is unterminated.
    if len > 0 {
        file.set_len(0)?;
    }
    Ok(())
}

struct Pending {
    stream: String,
    /// The line of its first event.
    line: usize,
    first_version: u64,
    last_version: u64,
    events: Vec<EventBody>,
}

/// The input of `import`, readable twice: the file itself, or what stdin
/// held, copied to an anonymous temporary file (removed when closed).
fn open_input(input: Option<&PathBuf>) -> Result<std::fs::File, CliError> {
    match input {
        Some(p) if p.as_os_str() != "-" => Ok(std::fs::File::open(p)?),
        _ => {
            let mut spool = tempfile::tempfile()?;
            std::io::copy(&mut std::io::stdin().lock(), &mut spool)?;
            Ok(spool)
        }
    }
}

/// The lines of `input` from its start, numbered from 1.
fn lines_of(
    input: &std::fs::File,
) -> Result<impl Iterator<Item = (usize, std::io::Result<String>)>, CliError> {
    use std::io::{Seek as _, SeekFrom};
    let mut file = input.try_clone()?;
    file.seek(SeekFrom::Start(0))?;
    Ok(BufReader::new(file).lines().enumerate().map(|(i, line)| (i + 1, line)))
}

/// One event of an import file.
struct Line {
    stream: String,
    version: u64,
    /// The event as the append endpoint takes it.
    event: EventBody,
}

/// A line of an export file. The event's fields are kept as their JSON
/// text, so that the data is appended exactly as it was exported.
#[derive(serde::Deserialize)]
struct ExportedLine {
    #[serde(default)]
    stream: Option<Value>,
    #[serde(default)]
    version: Option<Value>,
    #[serde(default)]
    id: Option<Box<RawValue>>,
    #[serde(default, rename = "type")]
    event_type: Option<Box<RawValue>>,
    #[serde(default)]
    content_type: Option<Box<RawValue>>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    metadata: Option<Box<RawValue>>,
}

/// An event of an append request, its fields as exported.
#[derive(serde::Serialize)]
struct EventBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Box<RawValue>>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    event_type: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Box<RawValue>>,
}

/// Parses line `n` and checks it as the server checks an appended event
/// (stream name, event shape, content type, event type, id), so that a
/// bad line is found before anything is written.
fn parse_line(n: usize, line: &str) -> Result<Line, CliError> {
    let bad = |what: String| CliError::Usage(format!("line {n}: {what}"));
    let e: ExportedLine = serde_json::from_str(line).map_err(|err| match err.classify() {
        serde_json::error::Category::Data => bad(format!("not an event: {err}")),
        _ => bad(format!("not JSON: {err}")),
    })?;
    let (Some(stream), Some(version)) =
        (e.stream.as_ref().and_then(Value::as_str), e.version.as_ref().and_then(Value::as_u64))
    else {
        return Err(bad("missing stream or version".into()));
    };
    annals_core::StreamName::new(stream).map_err(|err| bad(format!("stream '{stream}': {err}")))?;
    let event = EventBody {
        id: e.id,
        event_type: e.event_type,
        content_type: e.content_type,
        data: e.data,
        metadata: e.metadata,
    };
    let text = serde_json::to_string(&event).map_err(|err| bad(format!("not an event: {err}")))?;
    let parsed: annals_server::wire::EventIn =
        serde_json::from_str(&text).map_err(|err| bad(format!("not an event: {err}")))?;
    // Its messages name the event by its index in a request ("event N: …");
    // here the line number says which.
    let data = parsed.into_event_data(n, None).map_err(|err| {
        let prefix = format!("event {n}: ");
        bad(err.message.strip_prefix(&prefix).unwrap_or(&err.message).to_owned())
    })?;
    annals_core::validate_event_type(&data.event_type).map_err(|err| bad(err.to_string()))?;
    if data.id.is_nil() {
        return Err(bad("the event id is the nil UUID".into()));
    }
    Ok(Line { stream: stream.to_owned(), version, event })
}

/// Imports JSON Lines. The whole input is checked first: a bad line fails
/// the import (exit 2) before any event is written, instead of leaving
/// the lines before it imported.
pub async fn import(args: ImportArgs, c: &ClientArgs) -> Result<(), CliError> {
    let client = Client::new(c)?;
    let input = open_input(args.input.as_ref())?;
    let mut total = 0u64;
    let mut spans: HashMap<String, Span> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for (n, line) in lines_of(&input)? {
        let line = line.map_err(|e| CliError::Usage(format!("line {n}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let Line { stream, version, .. } = parse_line(n, &line)?;
        total += 1;
        match spans.get_mut(&stream) {
            // A repeated version (the same export twice in one file) is
            // skipped like one already imported; a hole cannot be filled.
            Some(span) if version > span.highest.saturating_add(1) => {
                return Err(CliError::Usage(format!(
                    "line {n}: stream {stream} jumps from version {} to {version}; the file lacks the events \
                     in between, and importing would renumber the ones after them",
                    span.highest
                )));
            }
            Some(span) => span.highest = span.highest.max(version),
            None => {
                spans.insert(stream.clone(), Span { first: version, highest: version, line: n });
                order.push(stream);
            }
        }
    }
    let mut known = target_versions(&client, &order, &spans).await?;
    let bar = progress(total, "importing");
    if total == 0 || c.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut stats = (0u64, 0u64); // (written, skipped)
    let mut pending: Option<Pending> = None;
    for (n, line) in lines_of(&input)? {
        let line = line.map_err(|e| CliError::Usage(format!("line {n}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let Line { stream, version, event } = parse_line(n, &line)?;
        let flush = pending.as_ref().is_some_and(|p| {
            p.stream != stream || p.events.len() >= args.batch || version != p.last_version + 1
        });
        if flush && let Some(p) = pending.take() {
            let count = p.events.len() as u64;
            import_batch(&client, p, &mut known, &mut stats).await?;
            bar.inc(count);
        }
        match &mut pending {
            Some(p) => {
                p.events.push(event);
                p.last_version = version;
            }
            None => {
                pending = Some(Pending {
                    stream,
                    line: n,
                    first_version: version,
                    last_version: version,
                    events: vec![event],
                })
            }
        }
    }
    if let Some(p) = pending.take() {
        let count = p.events.len() as u64;
        import_batch(&client, p, &mut known, &mut stats).await?;
        bar.inc(count);
    }
    bar.finish_and_clear();
    let summary = json!({ "written": stats.0, "skipped": stats.1 });
    if c.json {
        emit(summary)
    } else {
        emit(format_args!("imported {} event(s), skipped {} already present", stats.0, stats.1))
    }
}

/// The versions one stream has in an import file.
struct Span {
    /// Its first version in the file.
    first: u64,
    /// Its highest version so far.
    highest: u64,
    /// The line of its first event.
    line: usize,
}

/// The target's last version of every stream in the file, checked before
/// anything is written: a stream whose first version in the file is past
/// the target's next one (an `export --from N` or `--stream-prefix` file
/// imported where the versions before are missing) is refused. Appended
/// anyway it would get other version numbers than in the source, and a
/// re-run, which skips by version, would then write it a second time.
async fn target_versions(
    client: &Client,
    order: &[String],
    spans: &HashMap<String, Span>,
) -> Result<HashMap<String, Option<u64>>, CliError> {
    let mut known = HashMap::with_capacity(order.len());
    for stream in order {
        let Some(span) = spans.get(stream) else { continue };
        let info =
            client.json(client.request(Method::GET, &format!("/streams/{}/info", enc(stream)))).await?;
        let last = info["last_version"].as_u64();
        check_continues(stream, span.line, span.first, last)?;
        known.insert(stream.clone(), last);
    }
    Ok(known)
}

/// `Err` when events starting at version `first` cannot follow a stream
/// whose last version is `last` without a hole.
fn check_continues(stream: &str, line: usize, first: u64, last: Option<u64>) -> Result<(), CliError> {
    let next = last.map_or(0, |l| l.saturating_add(1));
    if first > next {
        return Err(CliError::Usage(format!(
            "line {line}: stream {stream} starts at version {first} in the file, but the target's next \
             version is {next}; importing would renumber its events (import where the versions before \
             are present, or export the stream from its start)"
        )));
    }
    Ok(())
}

/// Writes one batch. The target's last version of each stream is looked
/// up once; events at or below it were written by an earlier (interrupted)
/// run and are skipped, the rest is appended expecting exactly that
/// version, so a re-run never duplicates. Assumes the target's versions
/// match the export's (an import into an empty store, or a re-run of one);
/// a file that starts past the target's next version is refused
/// ([`check_continues`]).
async fn import_batch(
    client: &Client,
    p: Pending,
    known: &mut HashMap<String, Option<u64>>,
    stats: &mut (u64, u64),
) -> Result<(), CliError> {
    let last = match known.get(&p.stream) {
        Some(v) => *v,
        None => {
            let info = client
                .json(client.request(Method::GET, &format!("/streams/{}/info", enc(&p.stream))))
                .await?;
            info["last_version"].as_u64()
        }
    };
    // Checked for every stream before the first write; checked again here
    // because the batches after the first rely on it as well.
    check_continues(&p.stream, p.line, p.first_version, last)?;
    let mut fresh = Vec::with_capacity(p.events.len());
    for (version, e) in (p.first_version..).zip(p.events) {
        if last.is_some_and(|l| version <= l) {
            stats.1 += 1;
        } else {
            fresh.push(e);
        }
    }
    if fresh.is_empty() {
        known.insert(p.stream, last);
        return Ok(());
    }
    // A batch the server finds too large for one request (413: its body
    // limit, or the store's append limits) is written in halves, in order,
    // each expecting the version the one before left; a single event it
    // refuses fails the import as before.
    let mut last = last;
    let mut chunks = std::collections::VecDeque::from([fresh]);
    while let Some(mut chunk) = chunks.pop_front() {
        let expected = match last {
            Some(v) => v.to_string(),
            None => "no_stream".to_owned(),
        };
        let path = format!("/streams/{}?expected={expected}", enc(&p.stream));
        match client.json(client.request(Method::POST, &path).json(&chunk)).await {
            Ok(out) => {
                stats.0 += chunk.len() as u64;
                last = out["last_version"].as_u64();
            }
            Err(CliError::Api { status: 413, .. }) if chunk.len() > 1 => {
                let second = chunk.split_off(chunk.len() / 2);
                chunks.push_front(second);
                chunks.push_front(chunk);
            }
            Err(e) => return Err(e),
        }
    }
    known.insert(p.stream, last);
    Ok(())
}
