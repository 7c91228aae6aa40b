//! The mock's strict DPoP checks (RFC 9449 §4.3), used by its token endpoint and RaaS routes.
//!
//! Checked: three-part JWS; `typ` `dpop+jwt`; `alg` ES256 or EdDSA with a matching public `jwk`
//! and no private members; the signature against that `jwk`; `htm`; exact `htu` (normalised);
//! `iat` within ±60 s; `jti` unseen in the last 120 s; `ath` on resource requests; and, in nonce
//! mode, the current server nonce. Returns the key's RFC 7638 thumbprint for binding (`cnf.jkt`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ED25519};
use serde_json::Value;

use super::{lock, random_hex};
use crate::auth::dpop::{ath, htu, jwk_thumbprint};

const IAT_WINDOW: u64 = 60;
const JTI_WINDOW: Duration = Duration::from_secs(120);

/// Why a proof was refused.
#[derive(Debug)]
pub(super) enum ProofError {
    /// Valid but without the current nonce: answer `use_dpop_nonce`.
    UseNonce,
    /// Invalid: answer `invalid_dpop_proof`.
    Invalid(String),
}

/// Replay cache and nonce state.
#[derive(Debug, Default)]
pub(super) struct Verifier {
    jtis: Mutex<HashMap<String, Instant>>,
    nonce: Mutex<Option<String>>,
}

fn invalid(msg: impl Into<String>) -> ProofError {
    ProofError::Invalid(msg.into())
}

impl Verifier {
    /// Turns nonce mode on with a first nonce.
    pub(super) fn require_nonces(&self) {
        *lock(&self.nonce) = Some(random_hex(12));
    }

    /// A new nonce; the old one stops being accepted.
    pub(super) fn rotate_nonce(&self) {
        let mut n = lock(&self.nonce);
        if n.is_some() {
            *n = Some(random_hex(12));
        }
    }

    /// The nonce to advertise, in nonce mode.
    pub(super) fn current_nonce(&self) -> Option<String> {
        lock(&self.nonce).clone()
    }

    /// Verifies `proof` for a request; returns the key thumbprint.
    pub(super) fn verify(
        &self,
        proof: &str,
        method: &str,
        url: &str,
        access_token: Option<&str>,
    ) -> Result<String, ProofError> {
        let mut parts = proof.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not a compact JWS"));
        };
        let decode = |p: &str| B64.decode(p).map_err(|_| invalid("bad base64url"));
        let header: Value =
            serde_json::from_slice(&decode(h)?).map_err(|_| invalid("header is not JSON"))?;
        let claims: Value =
            serde_json::from_slice(&decode(c)?).map_err(|_| invalid("claims are not JSON"))?;
        let signature = decode(s)?;
        if header["typ"] != "dpop+jwt" {
            return Err(invalid("typ must be dpop+jwt"));
        }
        let jwk = header["jwk"].as_object().ok_or_else(|| invalid("no jwk"))?;
        if ["d", "p", "q", "dp", "dq", "qi", "k"]
            .iter()
            .any(|m| jwk.contains_key(*m))
        {
            return Err(invalid("jwk contains private key material"));
        }
        let member = |k: &str| jwk.get(k).and_then(Value::as_str).unwrap_or_default();
        let signing_input = &proof[..h.len() + 1 + c.len()];
        let thumbprint = match (header["alg"].as_str(), member("kty"), member("crv")) {
            (Some("ES256"), "EC", "P-256") => {
                let (x, y) = (decode(member("x"))?, decode(member("y"))?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(invalid("bad P-256 coordinates"));
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
                    .verify(signing_input.as_bytes(), &signature)
                    .map_err(|_| invalid("bad signature"))?;
                jwk_thumbprint(&[
                    ("crv", "P-256"),
                    ("kty", "EC"),
                    ("x", member("x")),
                    ("y", member("y")),
                ])
            }
            (Some("EdDSA"), "OKP", "Ed25519") => {
                let x = decode(member("x"))?;
                UnparsedPublicKey::new(&ED25519, &x)
                    .verify(signing_input.as_bytes(), &signature)
                    .map_err(|_| invalid("bad signature"))?;
                jwk_thumbprint(&[("crv", "Ed25519"), ("kty", "OKP"), ("x", member("x"))])
            }
            _ => return Err(invalid("alg must be ES256 or EdDSA with a matching jwk")),
        };
        if claims["htm"] != method {
            return Err(invalid(format!(
                "htm {} does not match {method}",
                claims["htm"]
            )));
        }
        let expected_htu = url
            .parse::<http::Uri>()
            .map(|u| htu(&u))
            .map_err(|_| invalid("bad request URL"))?;
        if claims["htu"] != expected_htu.as_str() {
            return Err(invalid(format!(
                "htu {} does not match {expected_htu}",
                claims["htu"]
            )));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let iat = claims["iat"].as_u64().ok_or_else(|| invalid("no iat"))?;
        if iat.abs_diff(now) > IAT_WINDOW {
            return Err(invalid("iat is not within 60 s of now"));
        }
        if let Some(token) = access_token {
            if claims["ath"] != ath(token).as_str() {
                return Err(invalid("ath does not match the access token"));
            }
        }
        let jti = claims["jti"].as_str().filter(|j| j.len() >= 16);
        let jti = jti.ok_or_else(|| invalid("jti missing or too short"))?;
        {
            let mut seen = lock(&self.jtis);
            let now = Instant::now();
            seen.retain(|_, at| now.duration_since(*at) < JTI_WINDOW);
            if seen.insert(jti.to_string(), now).is_some() {
                return Err(invalid("jti was used before"));
            }
        }
        if let Some(current) = self.current_nonce() {
            if claims["nonce"] != current.as_str() {
                return Err(ProofError::UseNonce);
            }
        }
        Ok(thumbprint)
    }
}
