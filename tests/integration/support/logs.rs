//! Every in-process proxy run in this test binary logs at TRACE into one buffer, and every
//! proxy (in-process or child process) is checked for known secrets when it stops: the API key,
//! its Basic encoding, the client secret, the password, every token a mock issued and every
//! secret a test registered with [`watch_secret`] (gateway caller keys, reward codes).

use std::io::Write;
use std::sync::{Mutex, Once};

use tango_auth_proxy::mock::MockTango;

static CAPTURED: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static MOCKS: Mutex<Vec<MockTango>> = Mutex::new(Vec::new());
static EXTRA: Mutex<Vec<String>> = Mutex::new(Vec::new());
static INIT: Once = Once::new();

struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURED.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing TRACE subscriber once for the whole test binary.
pub fn capture() {
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(|| Sink)
            .with_ansi(false)
            .try_init();
    });
}

/// Adds a mock's issued tokens to the secrets that must never be logged.
pub fn watch_mock(mock: &MockTango) {
    MOCKS.lock().unwrap().push(mock.clone());
}

/// Adds a secret a test made up (a gateway caller's key, a reward code) to those that must
/// never be logged.
pub fn watch_secret(secret: String) {
    if !secret.is_empty() {
        EXTRA.lock().unwrap().push(secret);
    }
}

fn secrets() -> Vec<String> {
    let mut s: Vec<String> = vec![
        super::API_KEY.into(),
        super::expected_basic()["Basic ".len()..].to_string(),
        super::CLIENT_SECRET.into(),
        super::PASSWORD.into(),
    ];
    for mock in MOCKS.lock().unwrap().iter() {
        s.extend(mock.issued_tokens());
        s.extend(mock.reward_credentials());
    }
    s.extend(EXTRA.lock().unwrap().iter().cloned());
    s
}

/// Panics if `logs` holds a known secret.
pub fn assert_no_secret_in(logs: &str) {
    assert!(
        !holds_any(logs.as_bytes(), &secrets()),
        "a secret appeared in the proxy logs"
    );
}

/// Whether `text` holds any of `secrets`, in one pass over `text` however many there are.
///
/// A `contains` per secret reads the text once per secret; a test binary watches thousands of
/// secrets and captures tens of megabytes (TLS and HTTP/2 at TRACE), and the tests are built
/// without optimisation. Here each position's next eight bytes are looked up among the
/// secrets' last eight bytes (a bitmap first, then a map), and only a match is compared whole.
/// Secrets sharing their last eight bytes share a bucket: that costs comparisons only where
/// those bytes occur.
fn holds_any(text: &[u8], secrets: &[String]) -> bool {
    const KEY: usize = 8;
    const SLOTS: usize = 1 << 20;
    let slot = |key: u64| (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 44) as usize;
    let mut bitmap = vec![0u64; SLOTS / 64];
    let mut by_end: std::collections::HashMap<u64, Vec<&[u8]>> = Default::default();
    for secret in secrets.iter().map(String::as_bytes) {
        if secret.len() < KEY {
            // Too short for the index (none of the suite's are): searched on its own.
            if text.windows(secret.len().max(1)).any(|w| w == secret) {
                return true;
            }
            continue;
        }
        let key = u64::from_le_bytes(secret[secret.len() - KEY..].try_into().unwrap());
        bitmap[slot(key) / 64] |= 1 << (slot(key) % 64);
        by_end.entry(key).or_default().push(secret);
    }
    if by_end.is_empty() {
        return false;
    }
    for end in KEY..=text.len() {
        let key = u64::from_le_bytes(text[end - KEY..end].try_into().unwrap());
        if bitmap[slot(key) / 64] & (1 << (slot(key) % 64)) == 0 {
            continue;
        }
        let found = by_end.get(&key).is_some_and(|candidates| {
            candidates
                .iter()
                .any(|s| end >= s.len() && &text[end - s.len()..end] == *s)
        });
        if found {
            return true;
        }
    }
    false
}

/// Everything the in-process proxies of this test binary logged so far.
pub fn captured() -> String {
    captured_since(0)
}

/// How much has been captured so far: an offset for [`captured_since`].
pub fn captured_len() -> usize {
    CAPTURED.lock().unwrap().len()
}

/// What was captured from `offset` on (tests polling for a line read only what is new).
pub fn captured_since(offset: usize) -> String {
    let buf = CAPTURED.lock().unwrap();
    String::from_utf8_lossy(&buf[offset.min(buf.len())..]).into_owned()
}

/// Where the last scan of the shared buffer ended.
static SCANNED_UPTO: Mutex<usize> = Mutex::new(0);

/// Panics if anything captured so far holds a known secret.
///
/// Every test in this binary logs into one buffer, so scanning all of it for every secret at
/// every proxy's stop grows with the square of the suite. Each scan reads only what is new (plus
/// a secret's length of overlap): a secret it finds for the first time was created after the
/// previous scan collected the secrets, which was after that scan's end was taken, so no line
/// holding it can lie before that end.
pub fn assert_no_secret_captured() {
    // A failed scan must not poison the next test's.
    let mut upto = SCANNED_UPTO.lock().unwrap_or_else(|p| p.into_inner());
    let end = captured_len();
    assert!(end > 0, "no logs were captured");
    let secrets = secrets();
    let overlap = secrets.iter().map(String::len).max().unwrap_or(0);
    let start = upto.saturating_sub(overlap);
    let text = {
        let buf = CAPTURED.lock().unwrap();
        String::from_utf8_lossy(&buf[start.min(end)..end]).into_owned()
    };
    assert!(
        !holds_any(text.as_bytes(), &secrets),
        "a secret appeared in the proxy logs"
    );
    *upto = end;
}

#[test]
fn the_log_scan_finds_a_secret_anywhere_and_nothing_else() {
    let secrets: Vec<String> = [
        "eyJhbGciOiJFUzI1NiJ9.a.sig-one",
        "eyJhbGciOiJFUzI1NiJ9.b.sig-two",
        "pos-key-7-f0e1d2c3b4a5",
        "MOCK-1",
    ]
    .map(String::from)
    .to_vec();
    for text in [
        "eyJhbGciOiJFUzI1NiJ9.b.sig-two at the start",
        "at the end: pos-key-7-f0e1d2c3b4a5",
        "a short one: MOCK-1.",
        "xx eyJhbGciOiJFUzI1NiJ9.a.sig-one",
    ] {
        assert!(holds_any(text.as_bytes(), &secrets), "{text}");
    }
    for text in [
        "",
        "short",
        "eyJhbGciOiJFUzI1NiJ9.c.sig-two and pos-key-7-f0e1d2c3b4a and MOCK-",
        "ig-one sig-two",
    ] {
        assert!(!holds_any(text.as_bytes(), &secrets), "{text}");
    }
}
