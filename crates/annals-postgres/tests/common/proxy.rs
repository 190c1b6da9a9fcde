//! A TCP proxy in front of the tests' PostgreSQL that can lose an answer:
//! the request is delivered, the server executes it (and commits), and the
//! client sees its connection close instead of the reply. That is what a
//! failover, a network cut or a killed pod does to an append in flight, at
//! the one moment a store cannot tell from an error alone.
//!
//! It can also swallow connections whole (`blackhole`): nothing closes
//! them and nothing they send arrives or is answered, as with a cut that
//! leaves both ends open. Or hold what open connections send (`hold`) and
//! deliver it later (`release`), as a proxy that wedges and recovers does,
//! even after the client has given up and closed its end.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use futures::future::BoxFuture;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// Runs once the server has answered the doomed request, before the
/// client's connection is cut.
pub type Hook = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

struct Doom {
    marker: Vec<u8>,
    hook: Hook,
}

/// The proxy; stops accepting when dropped.
pub struct Proxy {
    /// A connection URL through the proxy (plain TCP: the proxy must see
    /// the bytes).
    pub url: String,
    armed: Arc<Mutex<Option<Doom>>>,
    fired: Arc<Mutex<bool>>,
    hole: Hole,
    open: Open,
    held: Held,
    release_on: ReleaseOn,
    accept: JoinHandle<()>,
}

/// Every connection made so far.
type Open = Arc<Mutex<Vec<Arc<Swallow>>>>;
/// A connection's server side, shared by its pump and [`Proxy::release`].
type ToServer = Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>;
/// Held connections, with the server side to write what they kept to:
/// registered when one first keeps something (or closes while held), open
/// or closed since.
type Held = Arc<Mutex<Vec<(Arc<Swallow>, ToServer)>>>;

/// The startup-message marker of connections to swallow, if any.
type Hole = Arc<Mutex<Option<Vec<u8>>>>;

/// See [`Proxy::release_when_sent`]: the marker, the pause after it, and
/// whether it was seen.
#[derive(Default)]
struct Trigger {
    armed: Option<(Vec<u8>, std::time::Duration)>,
    fired: bool,
}
type ReleaseOn = Arc<Mutex<Trigger>>;

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards to the tests' server.
    pub async fn start() -> Proxy {
        let upstream: tokio_postgres::Config = super::url().parse().expect("test URL");
        let host = match &upstream.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[allow(unreachable_patterns)]
            other => panic!("the proxy needs a TCP host, not {other:?}"),
        };
        let port = upstream.get_ports().first().copied().unwrap_or(5432);
        let user = upstream.get_user().unwrap_or("postgres").to_owned();
        let dbname = upstream.get_dbname().unwrap_or(&user).to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let armed: Arc<Mutex<Option<Doom>>> = Arc::default();
        let fired: Arc<Mutex<bool>> = Arc::default();
        let hole: Hole = Arc::default();
        let open: Open = Arc::default();
        let held: Held = Arc::default();
        let release_on: ReleaseOn = Arc::default();
        let accept = {
            let (armed, fired, hole, open, held, release_on) =
                (armed.clone(), fired.clone(), hole.clone(), open.clone(), held.clone(), release_on.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect((host.as_str(), port)).await else { continue };
                    let swallow = Arc::new(Swallow::default());
                    open.lock().unwrap().push(swallow.clone());
                    let doors = Doors {
                        armed: armed.clone(),
                        fired: fired.clone(),
                        hole: hole.clone(),
                        held: held.clone(),
                        release_on: release_on.clone(),
                    };
                    tokio::spawn(pump(client, server, doors, swallow));
                }
            })
        };
        Proxy {
            url: format!("postgres://{user}@{local}/{dbname}?sslmode=disable"),
            armed,
            fired,
            hole,
            open,
            held,
            release_on,
            accept,
        }
    }

    /// Connections open now whose startup message contains `marker` stop
    /// passing what the client sends: it is kept, to be delivered by
    /// [`Proxy::release`] even if the client closes its end meanwhile.
    /// Nothing comes back to them. New connections are not held.
    pub fn hold(&self, marker: &[u8]) {
        for conn in self.open.lock().unwrap().iter() {
            let startup = conn.startup.lock().unwrap();
            if contains(&startup, marker) {
                conn.holding.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Held connections are closed towards their clients, as a reset
    /// between client and server would: the server side stays open, and
    /// what the clients sent is kept for [`Proxy::release`].
    pub fn cut_held(&self) {
        for conn in self.open.lock().unwrap().iter() {
            if conn.holding.load(Ordering::SeqCst) {
                conn.cut.notify_one();
            }
        }
    }

    /// The startup message of every connection made so far.
    pub fn startups(&self) -> Vec<Vec<u8>> {
        self.open.lock().unwrap().iter().map(|c| c.startup.lock().unwrap().clone()).collect()
    }

    /// Delivers what the held connections' clients sent so far, whether
    /// they have closed their end yet or not (to servers that may have
    /// closed those sessions meanwhile: then it goes nowhere). Connections
    /// still open stay held: what they send next waits for the next
    /// release.
    pub async fn release(&self) {
        release(&self.held, false).await;
    }

    /// Like [`Proxy::release`], and the held connections that are still
    /// open pass both ways again from then on, as through a proxy that
    /// recovers: what the server answers reaches their clients.
    pub async fn resume(&self) {
        release(&self.held, true).await;
    }

    /// The next time a connection that is not held sends something that
    /// contains `marker`, it is forwarded; `pause` later (time for the
    /// server to run it) what held connections sent is delivered
    /// ([`Proxy::release`]), and nothing more from the marker's connection
    /// passes for another `pause`: the late requests reach the server after
    /// the request with the marker has run, and before the next one.
    pub fn release_when_sent(&self, marker: &[u8], pause: std::time::Duration) {
        *self.release_on.lock().unwrap() = Trigger { armed: Some((marker.to_vec(), pause)), fired: false };
    }

    /// Whether [`Proxy::release_when_sent`]'s marker was seen.
    pub fn released_when_sent(&self) -> bool {
        self.release_on.lock().unwrap().fired
    }

    /// From now on, every connection whose startup message contains
    /// `marker` (e.g. an `application_name`), open or new, goes silent for
    /// good: what either side sends is dropped, and nothing is closed.
    pub fn blackhole(&self, marker: &[u8]) {
        *self.hole.lock().unwrap() = Some(marker.to_vec());
    }

    /// New connections get through again; swallowed ones stay swallowed.
    pub fn restore(&self) {
        *self.hole.lock().unwrap() = None;
    }

    /// The next request that carries `marker` (e.g. an event id's bytes)
    /// reaches the server, but its answer does not reach the client: once
    /// the server has replied, `hook` runs, then the connection is cut.
    pub fn lose_answer_to(&self, marker: &[u8], hook: Hook) {
        *self.armed.lock().unwrap() = Some(Doom { marker: marker.to_vec(), hook });
    }

    /// Whether an answer has been lost.
    pub fn fired(&self) -> bool {
        *self.fired.lock().unwrap()
    }
}

/// A connection's startup message and whether it has been swallowed.
#[derive(Default)]
struct Swallow {
    startup: Mutex<Vec<u8>>,
    gone: AtomicBool,
    /// Held by [`Proxy::hold`].
    holding: AtomicBool,
    /// [`Proxy::cut_held`]: close the client's side only.
    cut: tokio::sync::Notify,
    /// What the client sent while held, not yet delivered. The pump keeps
    /// bytes only under this lock and while `holding`, so a release that
    /// clears `holding` under it sees everything kept before.
    kept: Mutex<Vec<u8>>,
}

impl Swallow {
    /// Keeps `bytes` if the connection is held; whether it did.
    fn keep(&self, bytes: &[u8]) -> bool {
        let mut kept = self.kept.lock().unwrap();
        let holding = self.holding.load(Ordering::SeqCst);
        if holding {
            kept.extend_from_slice(bytes);
        }
        holding
    }
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Delivers what every held connection kept; with `resume`, they stop
/// being held.
async fn release(held: &Held, resume: bool) {
    let held: Vec<_> = held.lock().unwrap().clone();
    for (conn, server) in held {
        // Under the server side's lock, which the pump takes to forward
        // once it is no longer held: nothing overtakes what was kept.
        let mut server = server.lock().await;
        let bytes = {
            let mut kept = conn.kept.lock().unwrap();
            if resume {
                conn.holding.store(false, Ordering::SeqCst);
            }
            std::mem::take(&mut *kept)
        };
        let _ = server.write_all(&bytes).await;
    }
}

/// What every connection's pump shares with the proxy.
struct Doors {
    armed: Arc<Mutex<Option<Doom>>>,
    fired: Arc<Mutex<bool>>,
    hole: Hole,
    held: Held,
    release_on: ReleaseOn,
}

impl Swallow {
    /// Whether this connection is (now) in the hole.
    fn gone(&self, hole: &Hole) -> bool {
        if !self.gone.load(Ordering::SeqCst) {
            let hole = hole.lock().unwrap();
            let startup = self.startup.lock().unwrap();
            if hole.as_ref().is_some_and(|m| contains(&startup, m)) {
                self.gone.store(true, Ordering::SeqCst);
            }
        }
        self.gone.load(Ordering::SeqCst)
    }
}

async fn pump(client: TcpStream, server: TcpStream, doors: Doors, swallow: Arc<Swallow>) {
    let Doors { armed, fired, hole, held, release_on } = doors;
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, to_server) = server.into_split();
    let to_server: ToServer = Arc::new(tokio::sync::Mutex::new(to_server));
    let doomed: Arc<Mutex<Option<Hook>>> = Arc::default();
    let upstream = {
        let doomed = doomed.clone();
        let (swallow, hole) = (swallow.clone(), hole.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut first = true;
            let mut registered = false;
            let register = |registered: &mut bool| {
                if !std::mem::replace(registered, true) {
                    held.lock().unwrap().push((swallow.clone(), to_server.clone()));
                }
            };
            loop {
                let n = match from_client.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        if swallow.holding.load(Ordering::SeqCst) {
                            // The client gave up; the server side stays
                            // open for the release.
                            register(&mut registered);
                        }
                        return;
                    }
                    Ok(n) => n,
                };
                if std::mem::take(&mut first) {
                    *swallow.startup.lock().unwrap() = buf[..n].to_vec();
                }
                if swallow.gone(&hole) {
                    continue;
                }
                if swallow.keep(&buf[..n]) {
                    register(&mut registered);
                    continue;
                }
                {
                    let mut armed = armed.lock().unwrap();
                    let hit = armed.as_ref().is_some_and(|d| contains(&buf[..n], &d.marker));
                    if hit {
                        // Set before the request is forwarded, so before
                        // any of its answer can come back.
                        *doomed.lock().unwrap() = armed.take().map(|d| d.hook);
                    }
                }
                let pause = {
                    let mut trigger = release_on.lock().unwrap();
                    let hit = trigger.armed.as_ref().is_some_and(|(m, _)| contains(&buf[..n], m));
                    trigger.fired |= hit;
                    trigger.armed.take_if(|_| hit).map(|(_, pause)| pause)
                };
                if to_server.lock().await.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                    release(&held, false).await;
                    tokio::time::sleep(pause).await;
                }
            }
        })
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            read = from_server.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            () = swallow.cut.notified() => {
                // Only the client's side closes; the upstream half keeps
                // what the client sent, and the server side, for release.
                drop(to_client);
                return;
            }
        };
        if swallow.gone(&hole) || swallow.holding.load(Ordering::SeqCst) {
            continue;
        }
        let hook = doomed.lock().unwrap().take();
        if let Some(hook) = hook {
            // The server flushes its reply at the request's Sync, after the
            // commit: the request is done on the server.
            hook().await;
            *fired.lock().unwrap() = true;
            break;
        }
        if to_client.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Cut both ways: the client sees the connection close, the server
    // sees its client go.
    upstream.abort();
    drop(to_client);
}
