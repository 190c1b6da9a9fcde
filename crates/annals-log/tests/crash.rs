//! Real process crashes: this test binary re-runs itself as a child that
//! appends with `Durability::Always` from several tasks and prints every
//! acknowledged append; the parent SIGKILLs it at random moments, reopens,
//! and checks that every acknowledged event is present and intact, positions
//! are gapless and the hash chain verifies.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use annals_core::{AllReader, Appender, EventData, ExpectedVersion, ReadAll, StreamName, Uuid};
use annals_log::{Durability, LogStore};

const CHILD_ENV: &str = "ANNALS_LOG_CRASH_CHILD_DIR";
const ROUND_ENV: &str = "ANNALS_LOG_CRASH_ROUND";
const TASKS: u64 = 4;
const SEGMENT: u64 = 64 * 1024;

fn payload(round: u64, task: u64, i: u64) -> Vec<u8> {
    format!("{{\"round\":{round},\"task\":{task},\"i\":{i},\"pad\":\"{}\"}}", "z".repeat((i % 50) as usize))
        .into_bytes()
}

/// The child: a no-op unless started by `crash_recovery`.
#[test]
fn child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let round: u64 = std::env::var(ROUND_ENV).ok().and_then(|r| r.parse().ok()).unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store =
            LogStore::builder(&dir).durability(Durability::Always).segment_size(SEGMENT).open().unwrap();
        let out = Arc::new(Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let store = store.clone();
            let out = out.clone();
            tasks.push(tokio::spawn(async move {
                let s = StreamName::new(format!("r{round}-t{task}")).unwrap();
                for i in 0.. {
                    let e = EventData::raw("Tick", payload(round, task, i), annals_core::ContentType::Json);
                    let id = e.id;
                    let expected =
                        if i == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(i - 1) };
                    let r = store.append(&s, expected, vec![e]).await.unwrap();
                    let mut out = out.lock().unwrap();
                    writeln!(out, "ACK {} {} {} {}", s, r.last_version(), r.position, id).unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

struct Ack {
    stream: String,
    version: u64,
    position: u64,
    id: Uuid,
}

fn parse(line: &str) -> Option<Ack> {
    let mut parts = line.strip_prefix("ACK ")?.split(' ');
    Some(Ack {
        stream: parts.next()?.to_owned(),
        version: parts.next()?.parse().ok()?,
        position: parts.next()?.parse().ok()?,
        id: parts.next()?.parse().ok()?,
    })
}

/// A small deterministic generator, seeded from the clock, for kill delays.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn crash_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut acked: HashMap<u64, Ack> = HashMap::new();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for round in 0..20u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "child_writer", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, dir.path())
            .env(ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut announced = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !announced && line.starts_with("ACK ") {
                    announced = true;
                    let _ = first_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        // Wait until the child is appending (however slow the machine), then
        // kill it at a random moment.
        let started = first_rx.recv_timeout(Duration::from_secs(60)).is_ok();
        if started && round % 5 == 0 {
            // Another process holds the directory: a clear, typed refusal.
            let err = LogStore::builder(dir.path()).segment_size(SEGMENT).open().unwrap_err();
            assert!(matches!(err, annals_log::LogError::Locked { .. }), "{err:?}");
        }
        std::thread::sleep(Duration::from_millis(next(&mut seed) % 300));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let round_acks: Vec<Ack> = lines.iter().filter_map(|l| parse(l)).collect();
        for a in round_acks {
            acked.insert(a.position, a);
        }
        // Reopen and check everything acknowledged so far.
        rt.block_on(async {
            let store = LogStore::builder(dir.path()).segment_size(SEGMENT).open().unwrap();
            let all = store.read_all(ReadAll::forward(usize::MAX)).await.unwrap().events;
            assert!(all.iter().enumerate().all(|(i, e)| e.position == i as u64), "positions gapless");
            for (pos, a) in &acked {
                let e =
                    all.get(*pos as usize).unwrap_or_else(|| panic!("acknowledged position {pos} missing"));
                assert_eq!((e.stream.as_str(), e.version, e.id), (a.stream.as_str(), a.version, a.id));
                let task: u64 = a.stream.rsplit('t').next().unwrap().parse().unwrap();
                let r: u64 = a.stream[1..a.stream.find('-').unwrap()].parse().unwrap();
                assert_eq!(e.data.as_ref(), payload(r, task, a.version).as_slice(), "payload intact");
            }
            store.close().unwrap();
        });
        let report = annals_log::verify(dir.path()).unwrap();
        assert!(report.is_ok(), "round {round}: {report:?}");
    }
    assert!(acked.len() >= 20, "the children acknowledged too little to test anything ({})", acked.len());
}
