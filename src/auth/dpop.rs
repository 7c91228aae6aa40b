//! DPoP, the client side of RFC 9449: proof keys, JWK thumbprints (RFC 7638), proofs and nonces.
//!
//! A [`DpopKey`] is loaded once (PKCS#8 PEM, ES256 on P-256 or EdDSA on Ed25519). Its JOSE header
//! (`typ`, `alg`, public `jwk`) is encoded once; a proof then costs one small JSON claims object,
//! two base64url encodings and one signature. `ath` is computed once per token by the caller.
//! [`NonceCache`] keeps the latest `DPoP-Nonce` per server origin.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

/// A DPoP signing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DpopAlg {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[value(name = "ES256")]
    Es256,
    /// Ed25519.
    #[value(name = "EdDSA")]
    EdDsa,
}

impl DpopAlg {
    /// The JOSE `alg` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DpopAlg::Es256 => "ES256",
            DpopAlg::EdDsa => "EdDSA",
        }
    }
}

/// A DPoP key that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DpopError {
    /// The key file is unreadable or not PEM.
    #[error("{0}")]
    Unreadable(String),
    /// The key is of a type or curve the proxy does not sign with.
    #[error("{0}")]
    Unsupported(String),
    /// Signing failed (the system random source failed).
    #[error("cannot sign a DPoP proof: {0}")]
    Signing(&'static str),
}

enum Signer {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// A loaded DPoP private key with its pre-encoded proof header.
pub struct DpopKey {
    alg: DpopAlg,
    signer: Signer,
    thumbprint: String,
    header_b64: String,
    rng: SystemRandom,
    jtis: JtiSource,
}

/// `jti` values: 128 bits each of the operating system's CSPRNG (RFC 9449 §4.2 asks for at
/// least 96 bits of pseudorandom data), drawn 4 KiB at a time rather than with one system call
/// per proof — the signature already needs one for its nonce.
#[derive(Default)]
struct JtiSource(std::sync::Mutex<JtiBuffer>);

struct JtiBuffer {
    bytes: [u8; 4096],
    /// Bytes handed out; a full buffer is drawn again before the next `jti`.
    used: usize,
}

impl Default for JtiBuffer {
    fn default() -> Self {
        Self {
            bytes: [0; 4096],
            used: 4096,
        }
    }
}

impl JtiSource {
    /// The next `jti`'s 16 random bytes; every byte is handed out once.
    fn next(&self, rng: &SystemRandom) -> Result<[u8; 16], DpopError> {
        let mut buf = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buf.used + 16 > buf.bytes.len() {
            rng.fill(&mut buf.bytes)
                .map_err(|_| DpopError::Signing("no randomness for jti"))?;
            buf.used = 0;
        }
        let mut jti = [0u8; 16];
        jti.copy_from_slice(&buf.bytes[buf.used..buf.used + 16]);
        buf.used += 16;
        Ok(jti)
    }
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("alg", &self.alg)
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl DpopKey {
    /// Generates a new key; returns it and its PKCS#8 DER encoding (to be written as PEM).
    pub fn generate(alg: DpopAlg) -> Result<(DpopKey, Vec<u8>), DpopError> {
        let rng = SystemRandom::new();
        let der = match alg {
            DpopAlg::Es256 => {
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            }
            DpopAlg::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng),
        }
        .map_err(|_| DpopError::Signing("key generation failed"))?;
        let key = Self::from_pkcs8_der(der.as_ref())?;
        Ok((key, der.as_ref().to_vec()))
    }

    /// Reads a PKCS#8 PEM key file.
    pub fn load(path: &Path) -> Result<DpopKey, DpopError> {
        let bytes = std::fs::read(path)
            .map_err(|e| DpopError::Unreadable(format!("cannot read {}: {e}", path.display())))?;
        Self::from_pem(&bytes).map_err(|e| match e {
            DpopError::Unreadable(m) => DpopError::Unreadable(format!("{}: {m}", path.display())),
            DpopError::Unsupported(m) => DpopError::Unsupported(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses a PEM private key; only PKCS#8 P-256 and Ed25519 keys are accepted.
    pub fn from_pem(pem: &[u8]) -> Result<DpopKey, DpopError> {
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
            DpopError::Unreadable("no PEM private key found (expected BEGIN PRIVATE KEY)".into())
        })?;
        match key {
            PrivateKeyDer::Pkcs8(der) => Self::from_pkcs8_der(der.secret_pkcs8_der()),
            PrivateKeyDer::Sec1(_) => Err(DpopError::Unsupported(
                "an 'EC PRIVATE KEY' (SEC1) file; convert it to PKCS#8 with \
                 `openssl pkcs8 -topk8 -nocrypt -in key.pem -out dpop.pem`, or create one with \
                 `tango-auth-proxy keygen`"
                    .into(),
            )),
            PrivateKeyDer::Pkcs1(_) => Err(DpopError::Unsupported(
                "an RSA key; DPoP keys must be ES256 (P-256) or EdDSA (Ed25519)".into(),
            )),
            _ => Err(DpopError::Unsupported("an unknown key format".into())),
        }
    }

    fn from_pkcs8_der(der: &[u8]) -> Result<DpopKey, DpopError> {
        let rng = SystemRandom::new();
        let (alg, signer, members) = if let Ok(kp) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
        {
            // Uncompressed point: 0x04 || X (32 bytes) || Y (32 bytes).
            let public = kp.public_key().as_ref();
            if public.len() != 65 {
                return Err(DpopError::Unsupported("unexpected P-256 public key".into()));
            }
            let members = vec![
                ("crv", "P-256".to_string()),
                ("kty", "EC".to_string()),
                ("x", B64.encode(&public[1..33])),
                ("y", B64.encode(&public[33..65])),
            ];
            (DpopAlg::Es256, Signer::Ecdsa(kp), members)
        } else if let Ok(kp) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            let members = vec![
                ("crv", "Ed25519".to_string()),
                ("kty", "OKP".to_string()),
                ("x", B64.encode(kp.public_key().as_ref())),
            ];
            (DpopAlg::EdDsa, Signer::Ed25519(kp), members)
        } else {
            return Err(DpopError::Unsupported(
                "not a P-256 or Ed25519 key; DPoP keys must be ES256 (P-256) or EdDSA \
                 (Ed25519), e.g. from `tango-auth-proxy keygen`"
                    .into(),
            ));
        };
        let borrowed: Vec<(&str, &str)> = members.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let jwk = canonical_jwk(&borrowed);
        let header = format!(
            r#"{{"typ":"dpop+jwt","alg":"{}","jwk":{jwk}}}"#,
            alg.as_str()
        );
        Ok(DpopKey {
            alg,
            signer,
            thumbprint: thumbprint_of_json(&jwk),
            header_b64: B64.encode(header),
            rng,
            jtis: JtiSource::default(),
        })
    }

    /// The signing algorithm.
    pub fn alg(&self) -> DpopAlg {
        self.alg
    }

    /// The RFC 7638 JWK SHA-256 thumbprint of the public key.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// A fresh proof for one request: new `jti`, current `iat`.
    pub fn proof(
        &self,
        htm: &str,
        htu: &str,
        ath: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<String, DpopError> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        self.proof_at(htm, htu, ath, nonce, iat)
    }

    /// A proof with a given `iat` (tests and benchmarks).
    pub fn proof_at(
        &self,
        htm: &str,
        htu: &str,
        ath: Option<&str>,
        nonce: Option<&str>,
        iat: u64,
    ) -> Result<String, DpopError> {
        let jti = self.jtis.next(&self.rng)?;
        let mut claims = String::with_capacity(160 + htu.len());
        claims.push_str(r#"{"jti":""#);
        B64.encode_string(jti, &mut claims);
        claims.push_str(r#"","htm":"#);
        push_json_string(&mut claims, htm);
        claims.push_str(r#","htu":"#);
        push_json_string(&mut claims, htu);
        claims.push_str(r#","iat":"#);
        claims.push_str(&iat.to_string());
        if let Some(ath) = ath {
            claims.push_str(r#","ath":"#);
            push_json_string(&mut claims, ath);
        }
        if let Some(nonce) = nonce {
            claims.push_str(r#","nonce":"#);
            push_json_string(&mut claims, nonce);
        }
        claims.push('}');

        let mut out = String::with_capacity(self.header_b64.len() + claims.len() * 4 / 3 + 100);
        out.push_str(&self.header_b64);
        out.push('.');
        B64.encode_string(claims.as_bytes(), &mut out);
        let signature = match &self.signer {
            Signer::Ecdsa(kp) => kp
                .sign(&self.rng, out.as_bytes())
                .map_err(|_| DpopError::Signing("ECDSA signing failed"))?,
            Signer::Ed25519(kp) => kp.sign(out.as_bytes()),
        };
        out.push('.');
        B64.encode_string(signature.as_ref(), &mut out);
        Ok(out)
    }
}

/// Writes `value` as a JSON string literal.
fn push_json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The RFC 7638 canonical JSON of a JWK's required members: sorted, no whitespace.
pub fn canonical_jwk(members: &[(&str, &str)]) -> String {
    let mut sorted = members.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = String::from("{");
    for (i, (k, v)) in sorted.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, k);
        out.push(':');
        push_json_string(&mut out, v);
    }
    out.push('}');
    out
}

fn thumbprint_of_json(canonical: &str) -> String {
    B64.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// The RFC 7638 SHA-256 thumbprint of a JWK given by its required members.
pub fn jwk_thumbprint(members: &[(&str, &str)]) -> String {
    thumbprint_of_json(&canonical_jwk(members))
}

/// `ath`: base64url(SHA-256(access token)); tokens carry theirs precomputed.
pub use crate::token::ath;

/// The `htu` for a request URL: lower-case scheme and host, no default port, the path as sent,
/// no query or fragment.
pub fn htu(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
    let mut out = origin_of(uri, &scheme);
    out.push_str(uri.path());
    out
}

/// `scheme://host[:port]`, normalised, for nonce bookkeeping and `htu`.
pub fn origin(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
    origin_of(uri, &scheme)
}

fn origin_of(uri: &http::Uri, scheme: &str) -> String {
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    let default_port = match scheme {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    match uri.port_u16() {
        Some(p) if Some(p) != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    }
}

/// A profile's DPoP state: its key and the nonces servers gave it.
#[derive(Debug)]
pub struct Dpop {
    /// The proof key.
    pub key: std::sync::Arc<DpopKey>,
    /// Latest nonce per origin (token endpoint and API alike).
    pub nonces: NonceCache,
}

/// The latest `DPoP-Nonce` each server origin sent.
#[derive(Debug, Default)]
pub struct NonceCache {
    by_origin: RwLock<HashMap<String, String>>,
}

impl NonceCache {
    /// The nonce to put in a proof for `origin`, if the server has given one.
    pub fn get(&self, origin: &str) -> Option<String> {
        self.by_origin
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(origin)
            .cloned()
    }

    /// Records a `DPoP-Nonce` from a response; returns true when it changed. A nonce that is
    /// not a short run of visible ASCII (RFC 9449's NQCHAR, at most 512 here) is ignored: kept,
    /// it would ride on every later proof and could make every request fail.
    pub fn update(&self, origin: &str, nonce: &str) -> bool {
        const MAX_NONCE: usize = 512;
        if nonce.is_empty()
            || nonce.len() > MAX_NONCE
            || !nonce
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            tracing::warn!(len = nonce.len(), "ignoring an unusable DPoP-Nonce");
            return false;
        }
        if self.get(origin).as_deref() == Some(nonce) {
            return false;
        }
        self.by_origin
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(origin.to_string(), nonce.to_string());
        true
    }
}

#[cfg(test)]
mod nonce_tests {
    use super::NonceCache;

    #[test]
    fn only_short_visible_nonces_are_kept() {
        let cache = NonceCache::default();
        assert!(cache.update("https://a", "n-1"));
        assert!(!cache.update("https://a", "n-1"));
        for bad in [
            "",
            "has space",
            "quote\"",
            "x".repeat(513).as_str(),
            "caf\u{e9}",
        ] {
            assert!(!cache.update("https://a", bad), "{bad:?}");
        }
        assert_eq!(cache.get("https://a").as_deref(), Some("n-1"));
        assert!(cache.update("https://a", &"y".repeat(512)));
    }
}

/// Encodes PKCS#8 DER as a PEM `PRIVATE KEY` block.
pub fn pkcs8_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

/// True when a key file can be read (or written) by others, or by a group this process is not
/// in. A group the process belongs to is its own: Kubernetes mounts Secrets as mode 0440 with
/// the pod's `fsGroup`, which is how a non-root container reads them.
#[cfg(unix)]
pub fn is_too_open(path: &Path) -> bool {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(m) = std::fs::metadata(path) else {
        return false;
    };
    let mode = m.permissions().mode();
    if mode & 0o007 != 0 || mode & 0o020 != 0 {
        return true;
    }
    mode & 0o040 != 0 && !own_groups().contains(&m.gid())
}

/// The process's effective and supplementary groups (from /proc; empty where it is absent, so
/// a group-readable key is then warned about).
#[cfg(unix)]
fn own_groups() -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Gid:")
                .map(|v| v.split_whitespace().nth(1).unwrap_or_default())
                .map(str::to_string)
                .or_else(|| l.strip_prefix("Groups:").map(str::to_string))
        })
        .flat_map(|v| {
            v.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// True when a key file can be read by group or others.
#[cfg(not(unix))]
pub fn is_too_open(_path: &Path) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7638_rsa_example_thumbprint() {
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        assert_eq!(
            jwk_thumbprint(&[("kty", "RSA"), ("n", n), ("e", "AQAB")]),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn rfc9449_example_ec_key_thumbprint() {
        assert_eq!(
            jwk_thumbprint(&[
                ("kty", "EC"),
                ("x", "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs"),
                ("y", "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"),
                ("crv", "P-256"),
            ]),
            "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
        );
    }

    #[test]
    fn rfc9449_ath_example() {
        assert_eq!(
            ath("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
        );
    }

    #[test]
    fn rfc8037_ed25519_signing_example() {
        let seed = B64
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap();
        let x = B64
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        let kp = Ed25519KeyPair::from_seed_and_public_key(&seed, &x).unwrap();
        let sig = kp.sign(b"eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc");
        assert_eq!(
            B64.encode(sig.as_ref()),
            "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
        // RFC 8037 A.3: the thumbprint of that key.
        assert_eq!(
            jwk_thumbprint(&[
                ("crv", "Ed25519"),
                ("kty", "OKP"),
                ("x", "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            ]),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn htu_is_normalised() {
        let u: http::Uri = "HTTPS://API.Example.COM:443/raas/v2/orders/A%2FB?x=1"
            .parse()
            .unwrap();
        assert_eq!(htu(&u), "https://api.example.com/raas/v2/orders/A%2FB");
        let u: http::Uri = "http://127.0.0.1:8081/oauth/token".parse().unwrap();
        assert_eq!(htu(&u), "http://127.0.0.1:8081/oauth/token");
        let u: http::Uri = "http://h:80/p".parse().unwrap();
        assert_eq!(htu(&u), "http://h/p");
    }

    #[test]
    fn jtis_are_never_repeated_across_refills_of_their_buffer() {
        let (key, _) = DpopKey::generate(DpopAlg::Es256).unwrap();
        // 600 jtis cross two refills of the 4 KiB buffer (256 each).
        let jtis: std::collections::HashSet<[u8; 16]> =
            (0..600).map(|_| key.jtis.next(&key.rng).unwrap()).collect();
        assert_eq!(jtis.len(), 600);
        // And as proofs carry them: 300 proofs, 300 different jti claims of 128 bits.
        let claims: std::collections::HashSet<String> = (0..300)
            .map(|_| {
                let proof = key.proof("GET", "https://x/y", None, None).unwrap();
                let payload = proof.split('.').nth(1).unwrap();
                let json: serde_json::Value =
                    serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
                let jti = json["jti"].as_str().unwrap().to_string();
                assert_eq!(B64.decode(&jti).unwrap().len(), 16);
                jti
            })
            .collect();
        assert_eq!(claims.len(), 300);
    }

    #[test]
    fn generated_keys_round_trip_through_pem() {
        for alg in [DpopAlg::Es256, DpopAlg::EdDsa] {
            let (key, der) = DpopKey::generate(alg).unwrap();
            let loaded = DpopKey::from_pem(pkcs8_pem(&der).as_bytes()).unwrap();
            assert_eq!(loaded.alg(), alg);
            assert_eq!(loaded.thumbprint(), key.thumbprint());
            let p1 = key.proof("GET", "https://x/y", None, None).unwrap();
            let p2 = key.proof("GET", "https://x/y", None, None).unwrap();
            assert_ne!(p1, p2, "jti must differ");
            assert!(!format!("{key:?}").contains("BEGIN"));
        }
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        push_json_string(&mut s, "a\"b\\c\n");
        assert_eq!(s, r#""a\"b\\c\u000a""#);
    }
}
