//! Tokens at rest: AES-256-GCM records with a key id, so the key can be rotated.
//!
//! A record is `tap1.<key id>.<base64url(nonce || ciphertext || tag)>`; the record's own name is
//! the associated data, so a record copied under another name does not open. Without a key,
//! records are `tap0.<base64url(json)>` (the store warns once at start). A record that does not
//! open — tampered, truncated, or sealed with a key no longer configured — is treated as absent.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use super::Token;
use crate::secret::Secret;

/// A cache encryption key that cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

struct SealKey {
    id: String,
    key: LessSafeKey,
}

/// Seals and opens token records.
pub struct Sealer {
    current: Option<SealKey>,
    previous: Vec<SealKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.current.as_ref().map(|k| k.id.as_str()))
            .field(
                "previous_key_ids",
                &self
                    .previous
                    .iter()
                    .map(|k| k.id.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What a stored token record holds: the token and its wall-clock expiry.
#[derive(Debug, Clone)]
pub struct Record {
    /// The token.
    pub access_token: Secret,
    /// When it expires (wall clock, millisecond precision).
    pub expires_at: SystemTime,
    /// How long it was valid for when obtained.
    pub lifetime: Duration,
    /// True for a DPoP-bound token.
    pub dpop: bool,
}

/// The serialized form of a [`Record`].
#[derive(Deserialize)]
struct RawRecord {
    access_token: Secret,
    expires_at_ms: u64,
    lifetime_ms: u64,
    dpop: bool,
}

fn load_key(path: &Path) -> Result<SealKey, KeyError> {
    // Never blocks on a FIFO or reads a device: the same checks and cap as every secret file.
    let bytes = zeroize::Zeroizing::new(
        crate::config::read_small_file(path, crate::config::MAX_SECRET_FILE, "key file")
            .map_err(KeyError)?,
    );
    let text = String::from_utf8_lossy(&bytes);
    let raw = if bytes.len() == 32 {
        bytes.to_vec()
    } else {
        STANDARD
            .decode(text.trim())
            .or_else(|_| B64.decode(text.trim()))
            .map_err(|_| {
                KeyError(format!(
                    "{} must hold 32 random bytes, raw or base64 (e.g. `head -c 32 /dev/urandom | base64`)",
                    path.display()
                ))
            })?
    };
    let raw = zeroize::Zeroizing::new(raw);
    if raw.len() != 32 {
        return Err(KeyError(format!(
            "{} holds {} bytes; AES-256 needs exactly 32",
            path.display(),
            raw.len()
        )));
    }
    let id_digest = ring::digest::digest(
        &ring::digest::SHA256,
        &[
            b"tango-auth-proxy cache key id\0".as_slice(),
            raw.as_slice(),
        ]
        .concat(),
    );
    let id = id_digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let key = UnboundKey::new(&AES_256_GCM, &raw)
        .map_err(|_| KeyError(format!("{} is not a valid AES-256 key", path.display())))?;
    Ok(SealKey {
        id,
        key: LessSafeKey::new(key),
    })
}

impl Sealer {
    /// Records stored in the clear (no key configured).
    pub fn plaintext() -> Self {
        Self {
            current: None,
            previous: Vec::new(),
            rng: SystemRandom::new(),
        }
    }

    /// Seals with `current`; also opens records sealed with any of `previous`.
    pub fn from_files(current: &Path, previous: &[impl AsRef<Path>]) -> Result<Self, KeyError> {
        Ok(Self {
            current: Some(load_key(current)?),
            previous: previous
                .iter()
                .map(|p| load_key(p.as_ref()))
                .collect::<Result<_, _>>()?,
            rng: SystemRandom::new(),
        })
    }

    /// True when records are encrypted.
    pub fn encrypts(&self) -> bool {
        self.current.is_some()
    }

    /// The current key's id (safe to show: a truncated hash of the key).
    pub fn key_id(&self) -> Option<&str> {
        self.current.as_ref().map(|k| k.id.as_str())
    }

    /// Seals `token` for the record named `name`.
    pub fn seal(&self, name: &str, token: &Token) -> Option<String> {
        let ms = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        };
        let record = RawRecord {
            access_token: token.access_token.clone(),
            expires_at_ms: ms(token.expires_at),
            lifetime_ms: u64::try_from(token.lifetime.as_millis()).unwrap_or(u64::MAX),
            dpop: token.dpop,
        };
        let json = zeroize::Zeroizing::new(serde_json::to_vec(&SecretRecord(&record)).ok()?);
        let Some(key) = &self.current else {
            return Some(format!("tap0.{}", B64.encode(json.as_slice())));
        };
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut buf = json.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Some(format!("tap1.{}.{}", key.id, B64.encode(out)))
    }

    /// Opens a record; `None` when it does not open (the caller counts and ignores it).
    pub fn open(&self, name: &str, sealed: &str) -> Option<Record> {
        let json = if let Some(body) = sealed.strip_prefix("tap0.") {
            if self.encrypts() {
                // A plaintext record where encryption is configured is not trusted.
                return None;
            }
            zeroize::Zeroizing::new(B64.decode(body).ok()?)
        } else {
            let rest = sealed.strip_prefix("tap1.")?;
            let (kid, body) = rest.split_once('.')?;
            let key = self
                .current
                .iter()
                .chain(self.previous.iter())
                .find(|k| k.id == kid)?;
            let mut data = B64.decode(body).ok()?;
            if data.len() < NONCE_LEN {
                return None;
            }
            let nonce = Nonce::try_assume_unique_for_key(&data[..NONCE_LEN]).ok()?;
            let mut ciphertext = data.split_off(NONCE_LEN);
            let plain = key
                .key
                .open_in_place(nonce, Aad::from(name.as_bytes()), &mut ciphertext)
                .ok()?
                .to_vec();
            zeroize::Zeroizing::new(plain)
        };
        let raw: RawRecord = serde_json::from_slice(&json).ok()?;
        Some(Record {
            access_token: raw.access_token,
            expires_at: UNIX_EPOCH.checked_add(Duration::from_millis(raw.expires_at_ms))?,
            lifetime: Duration::from_millis(raw.lifetime_ms),
            dpop: raw.dpop,
        })
    }
}

/// Serializes a record with the token in clear (only ever into a sealed or 0600 record).
struct SecretRecord<'a>(&'a RawRecord);

impl Serialize for SecretRecord<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let r = self.0;
        let mut st = s.serialize_struct("Record", 4)?;
        st.serialize_field("access_token", r.access_token.expose())?;
        st.serialize_field("expires_at_ms", &r.expires_at_ms)?;
        st.serialize_field("lifetime_ms", &r.lifetime_ms)?;
        st.serialize_field("dpop", &r.dpop)?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::new(
            Secret::new("tok-sealed-value"),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
            true,
            tokio::time::Instant::now(),
            SystemTime::now(),
        )
        .unwrap()
    }

    fn key_file(dir: &Path, name: &str, byte: u8) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, STANDARD.encode([byte; 32])).unwrap();
        p
    }

    #[test]
    fn seals_opens_rotates_and_refuses_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let old = key_file(dir.path(), "old", 1);
        let new = key_file(dir.path(), "new", 2);
        let none: [&Path; 0] = [];
        let old_sealer = Sealer::from_files(&old, &none).unwrap();
        let sealed = old_sealer.seal("rec", &token()).unwrap();
        assert!(!sealed.contains("tok-sealed-value"));
        assert_eq!(
            old_sealer
                .open("rec", &sealed)
                .unwrap()
                .access_token
                .expose(),
            "tok-sealed-value"
        );
        // Another record name (associated data) does not open.
        assert!(old_sealer.open("other", &sealed).is_none());
        // Rotation: the new key still opens the old record.
        let rotated = Sealer::from_files(&new, &[&old]).unwrap();
        assert!(rotated.open("rec", &sealed).unwrap().dpop);
        assert!(Sealer::from_files(&new, &none)
            .unwrap()
            .open("rec", &sealed)
            .is_none());
        // Tampering.
        let mut bytes = sealed.into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert!(old_sealer
            .open("rec", &String::from_utf8(bytes).unwrap())
            .is_none());
        // Plaintext records are not trusted once a key is configured.
        let plain = Sealer::plaintext().seal("rec", &token()).unwrap();
        assert!(Sealer::plaintext().open("rec", &plain).is_some());
        assert!(old_sealer.open("rec", &plain).is_none());
    }

    #[test]
    fn keys_must_be_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, STANDARD.encode([0u8; 16])).unwrap();
        let none: [&Path; 0] = [];
        let err = Sealer::from_files(&short, &none).unwrap_err();
        assert!(err.0.contains("16 bytes"), "{err}");
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [7u8; 32]).unwrap();
        assert!(Sealer::from_files(&raw, &none).is_ok());
    }
}
