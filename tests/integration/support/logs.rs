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
    for secret in secrets() {
        assert!(
            !logs.contains(&secret),
            "a secret appeared in the proxy logs"
        );
    }
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
    for secret in &secrets {
        assert!(
            !text.contains(secret),
            "a secret appeared in the proxy logs"
        );
    }
    *upto = end;
}
