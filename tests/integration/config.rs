//! Configuration as an operator meets it: `check-config` and `serve` on real files and variables.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn environment_overrides_beat_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        "[upstream]\ntimeout = \"10s\"\n[profiles.default]\nauth = \"basic\"\nplatform_name = \"from-file\"\napi_key = \"file-key\"\n",
    );
    let (code, out, err) = run_bin(
        &["check-config", "--config", &cfg],
        &[
            ("TANGO_PROXY_UPSTREAM__TIMEOUT", "5s"),
            ("TANGO_PROXY_PROFILES__DEFAULT__PLATFORM_NAME", "12345"),
            ("TANGO_PROXY_LISTEN__WORKERS", "3"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("timeout = \"5s\""), "{out}");
    assert!(out.contains("platform_name = \"12345\""), "{out}");
    assert!(out.contains("workers = 3"), "{out}");
    assert!(!out.contains("from-file"));
}

#[test]
fn the_config_file_can_come_from_tango_proxy_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        "[profiles.default]\nauth = \"basic\"\nplatform_name = \"via-env-path\"\napi_key = \"k\"\n",
    );
    let (code, out, err) = run_bin(&["check-config"], &[("TANGO_PROXY_CONFIG", &cfg)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("via-env-path"));
}

#[test]
fn secrets_load_from_files_and_never_print() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = write(dir.path(), "api_key", "file-s3cret-value\n");
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key_file = \"{key_file}\"\n"
        ),
    );
    let (code, out, err) = run_bin(&["check-config", "--config", &cfg], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("api_key = \"<redacted>\""), "{out}");
    assert!(out.contains(&key_file));
    assert!(!out.contains("file-s3cret-value") && !err.contains("file-s3cret-value"));

    // Inline secrets are redacted too, including one given by environment variable.
    let cfg2 = write(
        dir.path(),
        "c2.toml",
        "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\n",
    );
    let (code, out, err) = run_bin(
        &["check-config", "--config", &cfg2],
        &[("TANGO_PROXY_PROFILES__DEFAULT__API_KEY", "env-s3cret-value")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("api_key = \"<redacted>\""));
    assert!(!out.contains("env-s3cret-value"));
}

#[tokio::test]
async fn a_secret_file_is_what_goes_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = write(dir.path(), "api_key", &format!("{API_KEY}\n"));
    let upstream = FakeUpstream::start().await;
    let toml = config_toml(&upstream.url(), "", "").replace(
        &format!("api_key = \"{API_KEY}\""),
        &format!("api_key_file = \"{key_file}\""),
    );
    let proxy = TestProxy::start(&toml).await;
    proxy.get("/x").await;
    assert_eq!(
        upstream.last().headers["authorization"],
        expected_basic().as_str()
    );
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        "[listen]\nproxyy = \"127.0.0.1:1\"\n[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\napi_kee = \"x\"\n[extra]\na = 1\n",
    );
    let (code, _, err) = run_bin(&["check-config", "--config", &cfg], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("proxyy"), "{err}");
    assert!(err.contains("api_kee"), "{err}");
    assert!(err.contains("extra: unknown section"), "{err}");
}

#[test]
fn every_problem_is_reported_at_once_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        r#"
[listen]
proxy = "not-an-address"
max_body = "lots"
[upstream]
url = "http://plain.example"
timeout = "soon"
[profiles.default]
auth = "basic"
platform_name = "p"
api_key_file = "/nonexistent/api_key"
"#,
    );
    let (code, out, err) = run_bin(&["check-config", "--config", &cfg], &[]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    for expected in [
        "listen.proxy: not an IP:port address",
        "listen.max_body: not a size",
        "upstream.url: http://plain.example is plain http",
        "upstream.timeout: not a duration",
        "profiles.default.api_key_file: secret file /nonexistent/api_key does not exist",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(err.contains("5 problems"), "{err}");
}

#[test]
fn an_http_upstream_without_allow_http_is_refused_by_check_config_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\n[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n",
    );
    let (code, _, err) = run_bin(&["check-config", "--config", &cfg], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("upstream.url") && err.contains("allow_http"),
        "{err}"
    );

    let (code, _, err) = run_bin(&["serve", "--config", &cfg], &[]);
    assert_ne!(code, 0, "serve started with an http upstream");
    assert!(
        err.contains("upstream.url") && err.contains("allow_http"),
        "{err}"
    );
}

#[test]
fn a_non_loopback_listener_needs_an_explicit_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n";
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!("[listen]\nproxy = \"0.0.0.0:8080\"\n{base}"),
    );
    let (code, _, err) = run_bin(&["check-config", "--config", &cfg], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("listen.proxy") && err.contains("allow_non_loopback"),
        "{err}"
    );
    let cfg = write(
        dir.path(),
        "c2.toml",
        &format!("[listen]\nproxy = \"0.0.0.0:8080\"\nallow_non_loopback = true\n{base}"),
    );
    let (code, _, err) = run_bin(&["check-config", "--config", &cfg], &[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn the_shipped_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let secret = write(dir.path(), "client_secret", "example-client-secret\n");
    let password = write(dir.path(), "password", "example-password\n");
    let (code, out, err) = run_bin(
        &["check-config", "--config", example.to_str().unwrap()],
        &[
            ("TANGO_PROXY_PROFILES__DEFAULT__CLIENT_SECRET_FILE", &secret),
            ("TANGO_PROXY_PROFILES__DEFAULT__PASSWORD_FILE", &password),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[profiles.default]"));
    assert!(out.contains("auth = \"service_account\""));
    assert!(!out.contains("example-client-secret") && !out.contains("example-password"));
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let (code, _, err) = run_bin(
        &["check-config", "--config", "/nonexistent/proxy.toml"],
        &[],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("/nonexistent/proxy.toml does not exist"),
        "{err}"
    );
}

/// `run_bin`, but the binary is killed (and the test fails) if it has not exited within 20 s:
/// for inputs that used to block or read forever.
fn run_bin_promptly(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(envs.iter().copied())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BASIC: &str =
    "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n";

/// `check-config` on `toml` (plus variables): exit code, stdout, stderr.
fn check(toml: &str, envs: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.toml", toml);
    run_bin_promptly(&["check-config", "--config", &cfg], envs)
}

#[test]
fn type_errors_name_the_key_the_way_the_readme_does() {
    let (code, _, err) = check(&format!("[listen]\nworkers = \"x\"\n{BASIC}"), &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("listen.workers: expected a whole number, found \"x\""),
        "{err}"
    );
    assert!(
        !err.contains("workers.listen") && !err.contains("usize"),
        "{err}"
    );

    let (code, _, err) = check(
        "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\n",
        &[
            ("TANGO_PROXY_PROFILES__DEFAULT__API_KEY", "k"),
            ("TANGO_PROXY_UPSTREAM__ALLOW_HTTP", "maybe"),
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "upstream.allow_http: expected true or false, found \"maybe\" \
             (from TANGO_PROXY_UPSTREAM__ALLOW_HTTP)"
        ),
        "{err}"
    );
    assert!(err.contains("1 problem:"), "{err}");

    let (_, _, err) = check("[profiles.default]\nauth = \"oauth2\"\n", &[]);
    assert!(
        err.contains(
            "profiles.default.auth: expected \"basic\", \"client_credentials\" or \
             \"service_account\", found \"oauth2\""
        ),
        "{err}"
    );
    assert!(
        !err.contains("AuthMethod") && !err.contains("no profile configured"),
        "{err}"
    );
}

#[test]
fn a_toml_syntax_error_is_reported_alone() {
    let (code, out, err) = check(&format!("[listen\nworkers = 1\n{BASIC}"), &[]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(err.contains("configuration has 1 problem:"), "{err}");
    assert!(
        err.contains("c.toml is not valid TOML: line 1, column 8: invalid table header"),
        "{err}"
    );
    assert!(!err.contains("no profile configured"), "{err}");
}

#[test]
fn a_config_path_that_is_not_a_regular_file_says_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let dir_path = dir.path().display().to_string();
    let fifo = fifo.display().to_string();
    for (path, what) in [
        (dir_path.as_str(), "is a directory"),
        (fifo.as_str(), "is a named pipe (FIFO)"),
        ("/dev/zero", "is a device"),
    ] {
        let (code, _, err) = run_bin_promptly(&["check-config", "--config", path], &[]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!("config file {path} {what}, not a regular file")),
            "{err}"
        );
        // TANGO_PROXY_CONFIG is read the same way.
        let (code, _, err) = run_bin_promptly(&["check-config"], &[("TANGO_PROXY_CONFIG", path)]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(what), "{err}");
        // The container health check reads the config too, and must not block on it either.
        let (code, _, err) = run_bin_promptly(&["healthcheck", "--config", path], &[]);
        assert!(code == 0 || code == 1, "{err}");
    }
    let big = write(dir.path(), "big.toml", &"#\n".repeat(600 << 10));
    let (code, _, err) = run_bin_promptly(&["check-config", "--config", &big], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("is larger than 1MiB (the limit)"), "{err}");
}

#[test]
fn a_secret_file_that_is_dev_zero_is_refused_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("secret-fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let fifo = fifo.display().to_string();
    for (path, what) in [
        ("/dev/zero", "is a device"),
        (fifo.as_str(), "is a named pipe (FIFO)"),
    ] {
        let (code, _, err) = check(
            &format!(
                "[profiles.default]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key_file = \"{path}\"\n"
            ),
            &[],
        );
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!(
                "profiles.default.api_key_file: secret file {path} {what}, not a regular file"
            )),
            "{err}"
        );
    }
    let (code, _, err) = check(
        &format!("[cache]\nredis_password_file = \"/dev/zero\"\n{BASIC}"),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("cache.redis_password_file: secret file /dev/zero is a device"),
        "{err}"
    );
}

#[test]
fn sizes_and_durations_are_exact_and_bounded() {
    let (code, out, err) = check(&format!("[listen]\nmax_body = 1.5\n{BASIC}"), &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains(
            "listen.max_body: expected a size such as \"10MiB\" or a whole number of bytes, \
             found 1.5"
        ),
        "{err}"
    );
    let (code, _, err) = check(&format!("[listen]\nmax_body = \"1.5\"\n{BASIC}"), &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("listen.max_body: \"1.5\" is not a whole number of bytes"),
        "{err}"
    );
}

#[test]
fn an_absurd_duration_names_the_key_and_its_range() {
    let (code, _, err) = check(
        "[profiles.default]\nauth = \"client_credentials\"\nclient_id = \"c\"\nclient_secret = \"s\"\nmin_token_interval = 9223372036854775807\n",
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "profiles.default.min_token_interval: must be at most 7days, not \"9223372036854775807\""
        ),
        "{err}"
    );
    let (code, _, err) = check(
        BASIC,
        &[(
            "TANGO_PROXY_UPSTREAM__REPLAY_MAX_BODY",
            "18446744073709551615",
        )],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "upstream.replay_max_body: must be between 0 and 1GiB, not \"18446744073709551615\" \
             (from TANGO_PROXY_UPSTREAM__REPLAY_MAX_BODY)"
        ),
        "{err}"
    );
}

#[test]
fn a_unix_socket_url_does_not_show_its_pass_parameter() {
    let redis = |url: &str| format!("[cache]\nbackend = \"redis\"\nredis_url = \"{url}\"\n{BASIC}");
    let (code, out, err) = check(&redis("unix:///tmp/r.sock?pass=hunter2"), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("redis_url = \"unix:///tmp/r.sock?pass=<redacted>\""),
        "{out}"
    );
    assert!(!out.contains("hunter2") && !err.contains("hunter2"));
}

#[test]
fn a_cluster_url_shows_every_seed_and_no_password() {
    let redis = |url: &str| format!("[cache]\nbackend = \"redis\"\nredis_url = \"{url}\"\n{BASIC}");
    let (code, out, err) = check(
        &redis("redis+cluster://u:hunter2@h1:7000,u:hunter2@h2:7001,h3:7002"),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "redis_url = \"redis+cluster://u:<redacted>@h1:7000,u:<redacted>@h2:7001,h3:7002\""
        ),
        "{out}"
    );
    assert!(!out.contains("hunter2") && !err.contains("hunter2"));

    // Different passwords on the seeds: one cluster has one.
    let (code, _, err) = check(
        &redis("redis+cluster://u:hunter1@h1:7000,u:hunter2@h2:7001,h3:7002"),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("cache.redis_url: the hosts carry different"),
        "{err}"
    );
    assert!(!err.contains("hunter"), "{err}");
}

#[test]
fn a_redis_url_with_an_impossible_port_is_refused() {
    let redis = |url: &str| format!("[cache]\nbackend = \"redis\"\nredis_url = \"{url}\"\n{BASIC}");
    // A bad port is refused, with or without the redis backend, and the URL is not repeated.
    for toml in [
        redis("redis://app:hunter2@h:99999"),
        format!("[cache]\nredis_url = \"redis://app:hunter2@h:99999\"\n{BASIC}"),
    ] {
        let (code, _, err) = check(&toml, &[]);
        assert_eq!(code, 1, "{toml}");
        assert!(
            err.contains("cache.redis_url: port must be 1 to 65535"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }
    let (code, _, err) = check(
        BASIC,
        &[
            ("TANGO_PROXY_CACHE__BACKEND", "redis"),
            ("TANGO_PROXY_CACHE__REDIS_URL", "redis://h:99999"),
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "cache.redis_url: port must be 1 to 65535 (from TANGO_PROXY_CACHE__REDIS_URL)"
        ),
        "{err}"
    );
}

#[test]
fn the_shipped_gateway_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.example.toml");
    let mut envs: Vec<(String, String)> = Vec::new();
    let mut file = |var: &str, name: &str, text: &str| {
        envs.push((var.to_string(), write(dir.path(), name, text)));
    };
    file(
        "TANGO_PROXY_CACHE__REDIS_PASSWORD_FILE",
        "redis",
        "redis-pass\n",
    );
    file(
        "TANGO_PROXY_CACHE__ENCRYPTION_KEY_FILE",
        "key",
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
    );
    for profile in ["STORE-17", "STORE-18", "FRANCHISOR"] {
        file(
            &format!("TANGO_PROXY_PROFILES__{profile}__CLIENT_SECRET_FILE"),
            &format!("{profile}-secret"),
            "example-client-secret\n",
        );
        file(
            &format!("TANGO_PROXY_PROFILES__{profile}__PASSWORD_FILE"),
            &format!("{profile}-password"),
            "example-password\n",
        );
    }
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_bin(
        &["check-config", "--config", example.to_str().unwrap()],
        &envs,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[callers.store-17]"), "{out}");
    assert!(out.contains("daily_spend_limit = \"2000.00 USD\""), "{out}");
    // Key hashes show only their first 8 hex digits; secrets not at all.
    assert!(out.contains("key_sha256 = \"18157d57…\""), "{out}");
    assert!(!out.contains("18157d5787df80c77e95"), "{out}");
    assert!(!out.contains("example-client-secret") && !out.contains("example-password"));
}

#[test]
fn gateway_callers_are_validated_and_every_problem_named() {
    let profile = |name: &str| {
        format!("[profiles.{name}]\nauth = \"basic\"\nplatform_name = \"p\"\napi_key = \"k\"\n")
    };
    let hash = "ab".repeat(32);
    let base = format!("{}{}", profile("one"), profile("two"));
    let cases: Vec<(String, &str)> = vec![
        (base.clone(), "profiles: 2 profiles configured (one, two); a sidecar serves exactly one"),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\n"), "callers.a.profile: required when several profiles are configured"),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\nprofile = \"three\"\n"), "callers.a.profile: no profile named \"three\"; configured: one, two"),
        (format!("{base}[callers.a]\nprofile = \"one\"\n"), "callers.a.key_sha256: required"),
        (format!("{base}[callers.a]\nkey_sha256 = \"secret-key\"\nprofile = \"one\"\n"), "callers.a.key_sha256: expected 64 hex digits"),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\nprofile = \"one\"\n[callers.b]\nkey_sha256 = \"{hash}\"\nprofile = \"two\"\n"), "callers.b.key_sha256: the same as callers.a.key_sha256"),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\nprofile = \"one\"\nallow = [\"get /raas/v2/orders\"]\n"), "callers.a.allow[0]:"),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\nprofile = \"one\"\nallow = [\"GET /raas/v2/ord*\"]\n"), "callers.a.allow[0]:"),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\nprofile = \"one\"\nrate = \"10\"\n"), "callers.a.rate: expected a rate such as \"10/s\""),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\nprofile = \"one\"\nburst = 5\n"), "callers.a.burst: only used together with rate"),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\nprofile = \"one\"\ndaily_spend_limit = \"500\"\n"), "callers.a.daily_spend_limit: expected an amount and a currency"),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\nprofile = \"one\"\naccounts = []\n"), "callers.a.accounts: an empty list would refuse"),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\nprofile = \"one\"\nspend_limit_fail_open = true\n"), "callers.a.spend_limit_fail_open: only used together with daily_spend_limit"),
        (format!("{base}[callers.a]\nkey_sha256 = \"{hash}\"\nprofile = \"one\"\nkey = \"plain\"\n"), "callers.a.key: unknown key"),
        (format!("{base}[callers.\"a:b\"]\nkey_sha256 = \"{hash}\"\nprofile = \"one\"\n"), "caller names use letters, digits"),
        (format!("{base}[callers]\n"), "callers: an empty [callers] table"),
        (format!("{base}[callers.a]\nkey_sha256 = \"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"\nprofile = \"one\"\n"), "callers.a.key_sha256: is the SHA-256 of an empty key"),
    ];
    for (toml, expected) in cases {
        let err = tango_auth_proxy::config::Config::from_toml(&toml)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(expected),
            "expected {expected:?} in:\n{err}\nfor:\n{toml}"
        );
        assert!(
            !err.contains("secret-key") && !err.contains("plain"),
            "{err}"
        );
    }
    // With callers, a non-loopback proxy listener needs no opt-in; without, it does.
    let one = profile("one");
    let gateway =
        format!("[listen]\nproxy = \"0.0.0.0:8080\"\n{one}[callers.a]\nkey_sha256 = \"{hash}\"\n");
    let c = tango_auth_proxy::config::Config::from_toml(&gateway).unwrap();
    assert!(c.is_gateway());
    assert_eq!(c.callers["a"].profile, "one");
    let sidecar = format!("[listen]\nproxy = \"0.0.0.0:8080\"\n{one}");
    let err = tango_auth_proxy::config::Config::from_toml(&sidecar)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listen.proxy: 0.0.0.0:8080 is not a loopback address"),
        "{err}"
    );
}
