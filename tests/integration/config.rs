//! Configuration as an operator meets it: `check-config` and `serve` on real files and variables.

use std::path::Path;

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
        "profiles.default.api_key_file: cannot read /nonexistent/api_key",
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
