//! A fixed-rate (open-loop) HTTP/1.1 load client for `scripts/bench.sh`: the latency of a server
//! at a given request rate, free of coordinated omission — what `wrk2 -R` measures, which
//! Debian's `wrk` cannot.
//!
//! ```text
//! fixed_rate URL --rate R --connections C --duration D [--warmup W] [--header "Name: value"]...
//! ```
//!
//! * `URL`: `http://127.0.0.1:PORT/path` (any loopback address, or `localhost`); nothing else is
//!   accepted, so the load never leaves the machine.
//! * `--rate R`: requests per second, over all connections.
//! * `--connections C`: keep-alive connections, opened before the run starts.
//! * `--duration D`, `--warmup W`: seconds (`10`, `10s`, `2.5s`, `500ms`); the warmup (default
//!   2 s) runs at the same rate and is not recorded.
//! * `--header "Name: value"`: added to every request (repeatable); `Host` defaults to the URL's.
//!
//! Every request has an intended start on one global schedule: request k at t0 + k/R. Requests
//! go round-robin to the connections; a connection sends its own one after another (no
//! pipelining), never before their intended start. A slow answer therefore delays the requests
//! queued behind it on its connection, and they are charged for that wait: latency runs from the
//! intended start to the end of the response body, not from the moment the client got round to
//! sending, so a stalled server shows in the percentiles (coordinated omission).
//!
//! What the server is not charged for is the client's own lateness while a connection was free:
//! the pacing thread's sleeps overshoot by tens of microseconds, and one thread serves every
//! connection. Each request's measured service time (send to last body byte) is laid onto the
//! schedule as if it had been sent on time: latency = max(intended start, the previous request's
//! corrected end on its connection) + service time − intended start. Against a fast loopback
//! server, charging that lateness too would more than double the p50. `client_lag_p99_us` shows
//! how late the client's sends were.
//!
//! The schedule is kept by a small pacing thread rather than tokio timers: those tick in
//! milliseconds, which would send the load in 1 ms bursts and add up to 1 ms to every request.
//!
//! Output, one `key value` per line on stdout:
//! * `target_rate`, `achieved_rate` (answers to recorded requests that came within the window,
//!   / D);
//! * `requests` (answers to requests scheduled in the window, however late), `errors` (failed
//!   requests: refused or broken connections, answers missing 2 s after the end), `non_2xx`,
//!   `unsent` (requests of the window still unsent 1 s after its end), `reconnects`;
//! * `p50_us`, `p90_us`, `p99_us`, `p999_us`, `max_us`: latency of the recorded answers;
//! * `client_lag_p99_us`, `client_cpu` (share of the window the client's thread was on a CPU).
//!
//! The exit code is 1, with the likely reason on stderr, when the run is not valid: any error or
//! non-2xx answer, any unsent request, an achieved rate below 99 % of the target, or a client
//! busy 90 % of the window or more (answers then wait for the client). Usage errors, including a
//! URL that is not `http://` to a loopback address, exit with 2.
//!
//! ```text
//! cargo run --release --example fixed_rate -- http://127.0.0.1:18080/raas/v2/catalogs \
//!     --rate 20000 --connections 50 --duration 10s
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, HOST};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Sleep;

const USAGE: &str = "usage: fixed_rate URL --rate R --connections C --duration D [--warmup W] \
                     [--header \"Name: value\"]...";

/// How long after the end of the recorded window its requests may still be sent (a client or
/// server running behind catches up; past this the rest count as `unsent`).
const SEND_GRACE: Duration = Duration::from_secs(1);
/// How long after the end of the window the run waits for answers still in flight.
const DRAIN: Duration = Duration::from_secs(2);
/// Caps on the command line, so that the schedule's arithmetic and the kept latencies stay sane.
const MAX_CONNECTIONS: usize = 10_000;
const MAX_SECONDS: Duration = Duration::from_secs(24 * 3600);
const MAX_RECORDED: u64 = 100_000_000;
/// A connection attempt on loopback that takes longer than this has failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A client whose sends were late by more than this (p99) is the likely bottleneck.
const CLIENT_LAG_LIMIT_US: u32 = 1_000;
/// A client whose thread was on the CPU this share of the window or more was saturated: answers
/// waited in its socket buffers, which the latencies would charge to the server.
const CLIENT_CPU_LIMIT: f64 = 0.9;

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("fixed_rate: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fixed_rate: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(&args)) {
        Ok(totals) => report(&args, totals),
        Err(e) => {
            eprintln!("fixed_rate: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// What to load and how hard.
#[derive(Debug)]
struct Args {
    target: Arc<Target>,
    rate: f64,
    connections: usize,
    duration: Duration,
    warmup: Duration,
}

/// Where requests go and what they carry.
#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    /// Origin-form request target (`/path?query`).
    path: Uri,
    /// `Host` plus the `--header`s, cloned into every request.
    headers: HeaderMap,
}

/// Parses the command line; `Ok(None)` asks for the usage text.
fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut url = None;
    let (mut rate, mut connections, mut duration) = (None, None, None);
    let mut warmup = Duration::from_secs(2);
    let mut extra = Vec::new();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--rate" => {
                let v = value()?;
                match v.parse::<f64>() {
                    Ok(r) if r.is_finite() && r > 0.0 => rate = Some(r),
                    _ => return Err(format!("--rate {v}: expected requests per second > 0")),
                }
            }
            "--connections" => {
                let v = value()?;
                match v.parse::<usize>() {
                    Ok(c) if (1..=MAX_CONNECTIONS).contains(&c) => connections = Some(c),
                    _ => {
                        return Err(format!(
                            "--connections {v}: expected a whole number from 1 to {MAX_CONNECTIONS}"
                        ))
                    }
                }
            }
            "--duration" => duration = Some(parse_seconds("--duration", &value()?)?),
            "--warmup" => warmup = parse_seconds("--warmup", &value()?)?,
            "--header" => extra.push(parse_header(&value()?)?),
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            other if url.is_none() => url = Some(other.to_owned()),
            other => return Err(format!("unexpected argument {other}")),
        }
    }
    let url = url.ok_or("the URL is missing")?;
    let rate = rate.ok_or("--rate is missing")?;
    let connections = connections.ok_or("--connections is missing")?;
    let duration = duration.ok_or("--duration is missing")?;
    if duration.is_zero() {
        return Err("--duration must be more than 0".into());
    }
    if duration > MAX_SECONDS || warmup > MAX_SECONDS {
        return Err(format!(
            "--duration and --warmup are capped at {} s",
            MAX_SECONDS.as_secs()
        ));
    }
    if rate * duration.as_secs_f64() > MAX_RECORDED as f64 {
        return Err(format!(
            "--rate × --duration is over {MAX_RECORDED} requests (each is kept to the end); \
             shorten the run"
        ));
    }
    let (addr, path, host) = parse_url(&url)?;
    let mut headers = HeaderMap::new();
    headers.insert(HOST, host);
    for (name, value) in extra {
        if name == HOST {
            headers.insert(name, value);
        } else {
            headers.append(name, value);
        }
    }
    Ok(Some(Args {
        target: Arc::new(Target {
            addr,
            path,
            headers,
        }),
        rate,
        connections,
        duration,
        warmup,
    }))
}

/// `10`, `2.5`, `10s`, `2.5s`, or anything `humantime` reads (`500ms`, `1m`).
fn parse_seconds(option: &str, text: &str) -> Result<Duration, String> {
    let number = text.strip_suffix('s').unwrap_or(text);
    if let Ok(secs) = number.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{option} {text}: expected seconds >= 0"));
    }
    humantime::parse_duration(text).map_err(|e| format!("{option} {text}: {e}"))
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("--header {text}: expected \"Name: value\""))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("--header {text}: {e}"))?;
    let value = HeaderValue::from_str(value.trim()).map_err(|e| format!("--header {text}: {e}"))?;
    Ok((name, value))
}

/// Accepts only `http://` to a loopback address: this tool loads the machine it runs on.
fn parse_url(text: &str) -> Result<(SocketAddr, Uri, HeaderValue), String> {
    let refuse = |why: &str| {
        format!("{text}: {why}; only http:// URLs to a loopback address (127.0.0.0/8, [::1], localhost) are accepted")
    };
    let uri: Uri = text.parse().map_err(|e| refuse(&format!("{e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(refuse("not an http:// URL"));
    }
    let authority = uri.authority().ok_or_else(|| refuse("no host"))?;
    if authority.as_str().contains('@') {
        return Err(refuse("user information is not supported"));
    }
    let host = authority.host();
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| refuse("the host is not an IP address"))?
    };
    if !ip.is_loopback() {
        return Err(refuse("not a loopback address"));
    }
    let addr = SocketAddr::new(ip, authority.port_u16().unwrap_or(80));
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = path.parse::<Uri>().map_err(|e| refuse(&format!("{e}")))?;
    let host = HeaderValue::from_str(authority.as_str()).map_err(|e| refuse(&format!("{e}")))?;
    Ok((addr, path, host))
}

/// The global schedule: request k is intended to start at `t0 + k / rate`.
#[derive(Debug)]
struct Plan {
    t0: Instant,
    nanos_per_request: f64,
    /// Requests scheduled, warmup and recorded window together.
    total: u64,
    /// The first request of the recorded window.
    first_recorded: u64,
    connections: u64,
    /// The end of the recorded window.
    window_end: Instant,
    /// No request is sent after this.
    send_until: Instant,
}

impl Plan {
    fn new(args: &Args, t0: Instant) -> Self {
        let per_request = 1e9 / args.rate;
        let count = |d: Duration| (d.as_secs_f64() * args.rate).ceil() as u64;
        Plan {
            t0,
            nanos_per_request: per_request,
            total: count(args.warmup + args.duration),
            first_recorded: count(args.warmup),
            connections: args.connections as u64,
            window_end: t0 + args.warmup + args.duration,
            send_until: t0 + args.warmup + args.duration + SEND_GRACE,
        }
    }

    fn intended(&self, k: u64) -> Instant {
        self.t0 + Duration::from_nanos((k as f64 * self.nanos_per_request) as u64)
    }

    /// How many of requests k, k + C, k + 2C, ... fall in the recorded window.
    fn recorded_from(&self, k: u64) -> u64 {
        let c = self.connections;
        let first = if k >= self.first_recorded {
            k
        } else {
            k + (self.first_recorded - k).div_ceil(c) * c
        };
        if first < self.total {
            (self.total - 1 - first) / c + 1
        } else {
            0
        }
    }
}

/// Releases requests on time: the pacing thread raises `released` and rings `tick`; one task in
/// the runtime passes that on to the connections whose requests came due.
#[derive(Debug)]
struct Schedule {
    /// Requests 0..released are due.
    released: AtomicU64,
    tick: Notify,
    wake: Vec<Notify>,
    stop: AtomicBool,
}

/// The pacing thread: sleeps until the next request is due and releases every due request.
fn pace(plan: &Plan, schedule: &Schedule) {
    let mut released = 0;
    while released < plan.total && !schedule.stop.load(Ordering::Relaxed) {
        let elapsed = plan.t0.elapsed().as_nanos() as f64;
        let due = ((elapsed / plan.nanos_per_request) as u64 + 1).min(plan.total);
        if due > released {
            released = due;
            schedule.released.store(due, Ordering::Release);
            schedule.tick.notify_one();
        }
        if released < plan.total {
            std::thread::sleep(
                plan.intended(released)
                    .saturating_duration_since(Instant::now()),
            );
        }
    }
}

/// Wakes the connections whose requests the pacing thread released (one cross-thread wake per
/// tick instead of one per request).
async fn dispatch(plan: Arc<Plan>, schedule: Arc<Schedule>) {
    let c = plan.connections;
    let mut woken = 0;
    while woken < plan.total {
        schedule.tick.notified().await;
        let released = schedule.released.load(Ordering::Acquire);
        if released.saturating_sub(woken) >= c {
            schedule.wake.iter().for_each(Notify::notify_one);
        } else {
            for k in woken..released {
                schedule.wake[(k % c) as usize].notify_one();
            }
        }
        woken = woken.max(released);
    }
}

type Sender = http1::SendRequest<Empty<Bytes>>;
type Driver = Pin<Box<http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<(Sender, Driver)> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, driver) = http1::handshake(TokioIo::new(stream)).await?;
    Ok((sender, Box::pin(driver)))
}

/// Why one request got no answer.
#[derive(Debug)]
enum Failure {
    Connect(anyhow::Error),
    Http(hyper::Error),
    Connection(hyper::Error),
    /// Still unanswered `DRAIN` after the end of the window.
    Deadline,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "{e:#}"),
            Failure::Http(e) => write!(f, "request failed: {e}"),
            Failure::Connection(e) => write!(f, "connection failed: {e}"),
            Failure::Deadline => write!(
                f,
                "no answer {} s after the end of the run",
                DRAIN.as_secs()
            ),
        }
    }
}

/// One connection's share of the results.
#[derive(Debug, Default)]
struct Totals {
    latencies_us: Vec<u32>,
    client_lag_us: Vec<u32>,
    /// Recorded answers that came before the end of the window.
    in_window: u64,
    errors: u64,
    non_2xx: u64,
    unsent: u64,
    reconnects: u64,
    first_error: Option<String>,
    /// Share of the window the runtime's thread spent on a CPU (for the whole run, not merged).
    client_cpu: Option<f64>,
}

impl Totals {
    fn merge(&mut self, other: Totals) {
        self.latencies_us.extend_from_slice(&other.latencies_us);
        self.client_lag_us.extend_from_slice(&other.client_lag_us);
        self.in_window += other.in_window;
        self.errors += other.errors;
        self.non_2xx += other.non_2xx;
        self.unsent += other.unsent;
        self.reconnects += other.reconnects;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Sends connection `index`'s requests (index, index + C, ...) on schedule.
async fn drive_connection(
    index: usize,
    mut conn: Option<(Sender, Driver)>,
    target: Arc<Target>,
    plan: Arc<Plan>,
    schedule: Arc<Schedule>,
    deadline: tokio::time::Instant,
) -> Totals {
    let mut totals = Totals::default();
    let expected = plan.recorded_from(index as u64) as usize;
    totals.latencies_us.reserve(expected);
    totals.client_lag_us.reserve(expected);
    let wake = &schedule.wake[index];
    let deadline = tokio::time::sleep_until(deadline);
    tokio::pin!(deadline);
    // When this connection last became free, and when it would have, had every send been on time.
    let mut free_at = plan.t0;
    let mut corrected_free_at = plan.t0;
    let mut k = index as u64;
    while k < plan.total {
        while schedule.released.load(Ordering::Acquire) <= k {
            wake.notified().await;
        }
        let intended = plan.intended(k);
        let sent = Instant::now();
        if sent >= plan.send_until {
            totals.unsent += plan.recorded_from(k);
            break;
        }
        let recorded = k >= plan.first_recorded;
        k += plan.connections;
        let outcome = exchange(
            &mut conn,
            &target,
            deadline.as_mut(),
            &mut totals.reconnects,
        )
        .await;
        let done = Instant::now();
        let corrected_done = intended.max(corrected_free_at) + (done - sent);
        let lag = sent.saturating_duration_since(intended.max(free_at));
        free_at = done;
        corrected_free_at = corrected_done;
        let deadline_passed = matches!(outcome, Err(Failure::Deadline));
        if recorded {
            match outcome {
                Ok(status) => {
                    totals.latencies_us.push(micros(corrected_done - intended));
                    totals.client_lag_us.push(micros(lag));
                    if done <= plan.window_end {
                        totals.in_window += 1;
                    }
                    if !status.is_success() {
                        totals.non_2xx += 1;
                    }
                }
                Err(e) => {
                    totals.errors += 1;
                    if totals.first_error.is_none() {
                        totals.first_error = Some(e.to_string());
                    }
                }
            }
        }
        if deadline_passed {
            totals.unsent += plan.recorded_from(k);
            break;
        }
    }
    totals
}

/// One request and its whole response body on `conn`, connecting first if needed. A failed
/// connection is dropped (the next request reconnects); so is one the server is closing.
async fn exchange(
    conn: &mut Option<(Sender, Driver)>,
    target: &Target,
    mut deadline: Pin<&mut Sleep>,
    reconnects: &mut u64,
) -> Result<StatusCode, Failure> {
    if conn.as_ref().is_some_and(|(sender, _)| sender.is_closed()) {
        *conn = None;
    }
    let (sender, driver) = match conn {
        Some(c) => c,
        None => {
            let c = tokio::select! {
                biased;
                c = connect(target.addr) => c.map_err(Failure::Connect)?,
                () = deadline.as_mut() => return Err(Failure::Deadline),
            };
            *reconnects += 1;
            conn.insert(c)
        }
    };
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = target.path.clone();
    *request.headers_mut() = target.headers.clone();
    let mut driver_done = false;
    let outcome = {
        let exchange = send(sender, request);
        tokio::pin!(exchange);
        tokio::select! {
            biased;
            r = &mut exchange => r.map_err(Failure::Http),
            r = driver.as_mut() => {
                // The connection ended (a `Connection: close` answer, or an error): what it
                // delivered before is still to be read, and the exchange now ends either way.
                driver_done = true;
                match r {
                    Ok(()) => tokio::select! {
                        biased;
                        r = &mut exchange => r.map_err(Failure::Http),
                        () = deadline.as_mut() => Err(Failure::Deadline),
                    },
                    Err(e) => Err(Failure::Connection(e)),
                }
            }
            () = deadline.as_mut() => Err(Failure::Deadline),
        }
    };
    match outcome {
        Ok((status, keep_alive)) => {
            if driver_done || !keep_alive {
                *conn = None;
            }
            Ok(status)
        }
        Err(e) => {
            *conn = None;
            Err(e)
        }
    }
}

/// Sends `request` and reads the whole body; also says whether the server keeps the connection.
async fn send(
    sender: &mut Sender,
    request: Request<Empty<Bytes>>,
) -> Result<(StatusCode, bool), hyper::Error> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let keep_alive = !response
        .headers()
        .get_all(CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok((status, keep_alive))
}

/// Opens the connections, runs warmup and window on schedule, and gathers the results.
async fn run(args: &Args) -> anyhow::Result<Totals> {
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let conn = connect(args.target.addr)
            .await
            .with_context(|| format!("opening {} connections before the run", args.connections))?;
        conns.push(conn);
    }
    let schedule = Arc::new(Schedule {
        released: AtomicU64::new(0),
        tick: Notify::new(),
        wake: (0..args.connections).map(|_| Notify::new()).collect(),
        stop: AtomicBool::new(false),
    });
    let t0 = Instant::now();
    let plan = Arc::new(Plan::new(args, t0));
    let deadline = tokio::time::Instant::from_std(t0 + args.warmup + args.duration + DRAIN);
    let pacer = {
        let (plan, schedule) = (Arc::clone(&plan), Arc::clone(&schedule));
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || pace(&plan, &schedule))
            .context("cannot start the pacing thread")?
    };
    let dispatcher = tokio::spawn(dispatch(Arc::clone(&plan), Arc::clone(&schedule)));
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(index, conn)| {
            tokio::spawn(drive_connection(
                index,
                Some(conn),
                Arc::clone(&args.target),
                Arc::clone(&plan),
                Arc::clone(&schedule),
                deadline,
            ))
        })
        .collect();
    // How busy the runtime's thread is in the window: near 100 % its own queueing inflates the
    // latencies, whatever the server does.
    tokio::time::sleep_until(tokio::time::Instant::from_std(t0 + args.warmup)).await;
    let cpu_before = runtime_thread_cpu();
    tokio::time::sleep_until(tokio::time::Instant::from_std(plan.window_end)).await;
    let client_cpu = match (cpu_before, runtime_thread_cpu()) {
        (Some(before), Some(after)) => {
            Some(after.saturating_sub(before).as_secs_f64() / args.duration.as_secs_f64())
        }
        _ => None,
    };
    let mut totals = Totals {
        client_cpu,
        ..Totals::default()
    };
    let mut failed = None;
    for task in tasks {
        match task.await {
            Ok(t) => totals.merge(t),
            Err(e) => failed = Some(e),
        }
    }
    dispatcher.abort();
    schedule.stop.store(true, Ordering::Relaxed);
    if pacer.join().is_err() {
        anyhow::bail!("the pacing thread failed");
    }
    if let Some(e) = failed {
        anyhow::bail!("a connection task failed: {e}");
    }
    Ok(totals)
}

/// CPU time of the calling thread so far (Linux schedstat), if the kernel tells.
fn runtime_thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// The `q` quantile (nearest rank) of sorted values.
fn quantile(sorted: &[u32], q: f64) -> u32 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

/// Prints the results and judges whether the run is valid.
fn report(args: &Args, mut totals: Totals) -> ExitCode {
    totals.latencies_us.sort_unstable();
    totals.client_lag_us.sort_unstable();
    let lat = &totals.latencies_us;
    let achieved = totals.in_window as f64 / args.duration.as_secs_f64();
    let lag_p99 = quantile(&totals.client_lag_us, 0.99);
    println!("target_rate {}", args.rate);
    println!("achieved_rate {achieved:.1}");
    println!("requests {}", lat.len());
    println!("errors {}", totals.errors);
    println!("non_2xx {}", totals.non_2xx);
    println!("unsent {}", totals.unsent);
    println!("reconnects {}", totals.reconnects);
    println!("p50_us {}", quantile(lat, 0.50));
    println!("p90_us {}", quantile(lat, 0.90));
    println!("p99_us {}", quantile(lat, 0.99));
    println!("p999_us {}", quantile(lat, 0.999));
    println!("max_us {}", lat.last().copied().unwrap_or(0));
    println!("client_lag_p99_us {lag_p99}");
    match totals.client_cpu {
        Some(cpu) => println!("client_cpu {cpu:.2}"),
        None => println!("client_cpu unknown"),
    }

    let mut problems = Vec::new();
    if totals.errors > 0 {
        problems.push(format!(
            "{} requests failed (first: {})",
            totals.errors,
            totals.first_error.as_deref().unwrap_or("?")
        ));
    }
    if totals.non_2xx > 0 {
        problems.push(format!("{} answers were not 2xx", totals.non_2xx));
    }
    let client_busy = totals.client_cpu.filter(|&cpu| cpu >= CLIENT_CPU_LIMIT);
    if let Some(cpu) = client_busy {
        problems.push(format!(
            "the client could not keep up: its thread was on the CPU {:.0} % of the window, so \
             answers waited for it and the latencies are partly its own; give it a core of its \
             own or lower the rate",
            cpu * 100.0
        ));
    }
    if achieved < 0.99 * args.rate || totals.unsent > 0 {
        let who = if totals.errors > 0 {
            "requests failed (above)".to_owned()
        } else if client_busy.is_some() {
            "the client could not keep up (above)".to_owned()
        } else if lag_p99 > CLIENT_LAG_LIMIT_US {
            format!(
                "the client could not keep up: its sends were {lag_p99} µs late (p99) on free \
                 connections; give it a core of its own or lower the rate"
            )
        } else {
            format!(
                "the server could not keep up: requests queued behind slow answers (p99 {} µs); \
                 or {} connections are too few for this rate at this latency",
                quantile(lat, 0.99),
                args.connections
            )
        };
        problems.push(format!(
            "{achieved:.0} requests/s answered in the window of {} scheduled, {} never sent: {who}",
            args.rate, totals.unsent
        ));
    }
    if problems.is_empty() {
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("fixed_rate: run not valid: {p}");
    }
    ExitCode::from(1)
}
