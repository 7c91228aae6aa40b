//! The app side of `scripts/soak.sh`: a bounded number of clients, each sending requests at a
//! fixed rate through a proxy replica for a fixed time, and an account of every answer.
//!
//! ```text
//! soak_load --duration 600 --clients 4 --rate 20 --out summary.json --events events.jsonl \
//!     a1=http://127.0.0.1:18080 a2=http://127.0.0.1:18082
//! ```
//!
//! Every client sends one request at a time (so at most `clients` per target are in flight):
//! mostly `GET /raas/v2/catalogs`, and every tenth a `POST /raas/v2/orders` of one cent with a
//! new `externalRefID`, a small body the proxy keeps for a replay after a 401. The summary
//! counts answers by status and by the proxy's own cause (`x-tango-proxy-error`), and splits
//! `token_unavailable` by its message: the token endpoint failing (no token could be had) or
//! anything else. Every answer that is not 2xx, or took over 250 ms, is written to the events
//! file with its time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// How long one request may take before it is counted as a client-side timeout: above the
/// proxy's longest wait for a token (4 × token_timeout + 5 s = 45 s by default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many events are written (a broken run should not fill the disk).
const MAX_EVENTS: usize = 50_000;
/// Answers slower than this are written to the events file too, whatever their status.
const SLOW: Duration = Duration::from_millis(250);
/// The message the proxy gives when the token endpoint itself failed.
const ENDPOINT_FAILING: &str = "token endpoint failed with";

#[derive(Debug)]
struct Args {
    duration: Duration,
    clients: usize,
    rate: f64,
    out: String,
    events: String,
    targets: Vec<(String, String)>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        duration: Duration::from_secs(60),
        clients: 4,
        rate: 20.0,
        out: "soak-summary.json".into(),
        events: "soak-events.jsonl".into(),
        targets: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => args.duration = Duration::from_secs_f64(value()?.parse()?),
            "--clients" => args.clients = value()?.parse()?,
            "--rate" => args.rate = value()?.parse()?,
            "--out" => args.out = value()?,
            "--events" => args.events = value()?,
            t => {
                let (name, url) = t
                    .split_once('=')
                    .with_context(|| format!("a target is NAME=URL, not {t:?}"))?;
                if !url.starts_with("http://127.") && !url.starts_with("http://[::1]") {
                    bail!("targets must be on loopback: {url}");
                }
                args.targets.push((name.to_string(), url.to_string()));
            }
        }
    }
    if args.targets.is_empty() || args.clients == 0 || !(args.rate > 0.0 && args.rate <= 1000.0) {
        bail!("usage: soak_load [--duration S] [--clients N] [--rate PER_S] [--out F] [--events F] NAME=URL...");
    }
    Ok(args)
}

/// What one target's clients saw.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    by_status: BTreeMap<String, u64>,
    by_cause: BTreeMap<String, u64>,
    token_unavailable_endpoint_failing: u64,
    token_unavailable_other: u64,
    unauthorized: u64,
    transport_errors: u64,
    orders_created: u64,
    orders_repeated: u64,
    latencies_us: Vec<u32>,
    /// The whole seconds since the start in which `token_unavailable` was answered.
    token_unavailable_seconds: std::collections::BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct Shared {
    tallies: BTreeMap<String, Tally>,
    events: Vec<Value>,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1000.0
}

async fn client_loop(
    http: reqwest::Client,
    target: (String, String),
    client_no: usize,
    period: Duration,
    started: Instant,
    end: Instant,
    shared: Arc<Mutex<Shared>>,
) {
    let (name, base) = target;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            return;
        }
        n += 1;
        let is_order = n.is_multiple_of(10);
        let request = if is_order {
            http.post(format!("{base}/raas/v2/orders")).json(&json!({
                "accountIdentifier": "A00000001",
                "customerIdentifier": "demo-customer",
                "amount": 0.01,
                "utid": "U561593",
                "externalRefID": format!("soak{name}c{client_no}n{n}"),
            }))
        } else {
            http.get(format!("{base}/raas/v2/catalogs"))
        };
        let sent_at = Instant::now();
        let outcome = request.send().await;
        let (status, cause, message) = match outcome {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let cause = resp
                    .headers()
                    .get("x-tango-proxy-error")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = resp.bytes().await.unwrap_or_default();
                let message = if status >= 300 {
                    serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v["message"].as_str().map(str::to_string))
                        .unwrap_or_else(|| {
                            String::from_utf8_lossy(&body).chars().take(200).collect()
                        })
                } else {
                    String::new()
                };
                (Some(status), cause, message)
            }
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "io"
                };
                (None, Some(format!("client_{kind}")), e.to_string())
            }
        };
        let elapsed = sent_at.elapsed();
        let mut s = match shared.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let t = s.tallies.entry(name.clone()).or_default();
        t.sent += 1;
        t.latencies_us
            .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
        match status {
            Some(code) => *t.by_status.entry(code.to_string()).or_default() += 1,
            None => t.transport_errors += 1,
        }
        match (status, cause.as_deref()) {
            (Some(201), _) if is_order => t.orders_created += 1,
            (Some(200), _) if is_order => t.orders_repeated += 1,
            (Some(503), Some("token_unavailable")) if message.contains(ENDPOINT_FAILING) => {
                t.token_unavailable_endpoint_failing += 1
            }
            (Some(503), Some("token_unavailable")) => t.token_unavailable_other += 1,
            (Some(401), None) => t.unauthorized += 1,
            _ => {}
        }
        if let Some(c) = &cause {
            *t.by_cause.entry(c.clone()).or_default() += 1;
            if c == "token_unavailable" {
                t.token_unavailable_seconds
                    .insert((sent_at - started).as_secs());
            }
        }
        let failed = status.is_none_or(|c| !(200..300).contains(&c));
        if (failed || elapsed > SLOW) && s.events.len() < MAX_EVENTS {
            s.events.push(json!({
                "t_s": (sent_at - started).as_secs_f64(),
                "unix_ms": unix_ms() as u64,
                "target": name,
                "method": if is_order { "POST" } else { "GET" },
                "status": status,
                "cause": cause,
                "latency_ms": elapsed.as_secs_f64() * 1000.0,
                "message": message.chars().take(300).collect::<String>(),
            }));
        }
    }
}

fn summary(shared: &mut Shared, wall: Duration) -> Value {
    let mut total = Tally::default();
    let mut per_target = serde_json::Map::new();
    for (name, t) in shared.tallies.iter_mut() {
        t.latencies_us.sort_unstable();
        per_target.insert(
            name.clone(),
            json!({
                "sent": t.sent,
                "by_status": t.by_status,
                "by_cause": t.by_cause,
                "token_unavailable_endpoint_failing": t.token_unavailable_endpoint_failing,
                "token_unavailable_other": t.token_unavailable_other,
                "token_unavailable_seconds": t.token_unavailable_seconds.len(),
                "unauthorized": t.unauthorized,
                "transport_errors": t.transport_errors,
                "p99_ms": percentile(&t.latencies_us, 0.99),
                "max_ms": percentile(&t.latencies_us, 1.0),
            }),
        );
        total.sent += t.sent;
        for (k, v) in &t.by_status {
            *total.by_status.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &t.by_cause {
            *total.by_cause.entry(k.clone()).or_default() += v;
        }
        total.token_unavailable_endpoint_failing += t.token_unavailable_endpoint_failing;
        total.token_unavailable_other += t.token_unavailable_other;
        total.unauthorized += t.unauthorized;
        total.transport_errors += t.transport_errors;
        total.orders_created += t.orders_created;
        total.orders_repeated += t.orders_repeated;
        total.latencies_us.extend_from_slice(&t.latencies_us);
        total
            .token_unavailable_seconds
            .extend(t.token_unavailable_seconds.iter().copied());
    }
    total.latencies_us.sort_unstable();
    json!({
        "seconds": wall.as_secs_f64(),
        "sent": total.sent,
        "by_status": total.by_status,
        "by_cause": total.by_cause,
        "token_unavailable_endpoint_failing": total.token_unavailable_endpoint_failing,
        "token_unavailable_other": total.token_unavailable_other,
        "token_unavailable_seconds": total.token_unavailable_seconds.len(),
        "unauthorized": total.unauthorized,
        "transport_errors": total.transport_errors,
        "orders_created": total.orders_created,
        "orders_repeated": total.orders_repeated,
        "p50_ms": percentile(&total.latencies_us, 0.50),
        "p99_ms": percentile(&total.latencies_us, 0.99),
        "max_ms": percentile(&total.latencies_us, 1.0),
        "events_written": shared.events.len(),
        "per_target": per_target,
    })
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // reqwest is built on the proxy's rustls, which brings ring but no process-wide default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let started = Instant::now();
    rt.block_on(async {
        let end = started + args.duration;
        let period = Duration::from_secs_f64(1.0 / args.rate);
        let mut tasks = Vec::new();
        for target in &args.targets {
            let http = reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .pool_max_idle_per_host(args.clients)
                .build()?;
            for c in 0..args.clients {
                tasks.push(tokio::spawn(client_loop(
                    http.clone(),
                    target.clone(),
                    c,
                    period,
                    started,
                    end,
                    shared.clone(),
                )));
            }
        }
        for t in tasks {
            t.await?;
        }
        anyhow::Ok(())
    })?;
    let wall = started.elapsed();
    let mut s = match shared.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    let sum = summary(&mut s, wall);
    std::fs::write(&args.out, serde_json::to_vec_pretty(&sum)?)
        .with_context(|| format!("cannot write {}", args.out))?;
    let mut lines = String::new();
    for e in &s.events {
        lines.push_str(&e.to_string());
        lines.push('\n');
    }
    std::fs::write(&args.events, lines).with_context(|| format!("cannot write {}", args.events))?;
    Ok(())
}
