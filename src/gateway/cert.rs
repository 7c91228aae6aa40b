//! Callers known by their client certificate: the certificate's SHA-256 fingerprint
//! (`cert_sha256`) or a DNS / URI subject alternative name it carries (`cert_san`). Names are
//! matched by kind: a caller configured with a DNS name is named only by a certificate's DNS
//! name, one with a URI only by a URI ([`San`]).
//!
//! The certificate reaching here was verified during the TLS handshake against
//! `listen.tls_client_ca_file` (chain, validity period, client-auth usage); this module only says
//! which caller it names. Subject alternative names (and, for `/status`, the listener's own
//! certificate's expiry, [`not_after`]) are read from the DER with a small, bounded reader of
//! the few structures involved: every length is checked against what is left, so a malformed
//! certificate yields nothing, never a panic.

use std::collections::HashMap;

use crate::config::{CallerConfig, San};

/// Which caller a client certificate names.
#[derive(Debug, Default)]
pub struct CertIndex {
    by_fingerprint: HashMap<[u8; 32], usize>,
    by_san: HashMap<San, usize>,
    /// Per caller index: what its certificate must carry.
    wants: Vec<(Option<[u8; 32]>, Option<San>)>,
}

impl CertIndex {
    /// Records caller `index`'s certificate identities.
    pub fn add(&mut self, index: usize, caller: &CallerConfig) {
        if self.wants.len() <= index {
            self.wants.resize(index + 1, (None, None));
        }
        if let Some(fp) = caller.cert_sha256 {
            self.by_fingerprint.insert(fp, index);
        }
        if let Some(san) = &caller.cert_san {
            self.by_san.insert(san.clone(), index);
        }
        self.wants[index] = (caller.cert_sha256, caller.cert_san.clone());
    }

    /// True when no caller is known by a certificate.
    pub fn is_empty(&self) -> bool {
        self.by_fingerprint.is_empty() && self.by_san.is_empty()
    }

    /// The caller `der` names, or why none: a caller with both identities needs both to match,
    /// and a certificate whose names point at two callers names none.
    pub fn identify(&self, der: &[u8]) -> Result<usize, &'static str> {
        let fingerprint = super::sha256(der);
        let sans = subject_alt_names(der);
        let by_fp = self.by_fingerprint.get(&fingerprint).copied();
        let mut by_san = None;
        for san in &sans {
            if let Some(&i) = self.by_san.get(san) {
                if by_san.is_some_and(|j| j != i) {
                    return Err("the client certificate's names match more than one caller");
                }
                by_san = Some(i);
            }
        }
        let index = match (by_fp, by_san) {
            (Some(a), Some(b)) if a != b => {
                return Err(
                    "the client certificate's fingerprint and names match different callers",
                )
            }
            (Some(i), _) | (None, Some(i)) => i,
            (None, None) => return Err("the client certificate matches no caller"),
        };
        let (want_fp, want_san) = self.wants.get(index).cloned().unwrap_or_default();
        let fp_ok = want_fp.is_none_or(|f| f == fingerprint);
        let san_ok = want_san.is_none_or(|s| sans.contains(&s));
        if fp_ok && san_ok {
            Ok(index)
        } else {
            Err("the client certificate matches only part of a caller's identity")
        }
    }
}

/// The DNS names (lower case) and URIs in a certificate's subject alternative name extension;
/// empty when it has none or the DER cannot be read.
pub fn subject_alt_names(der: &[u8]) -> Vec<San> {
    san_values(der).unwrap_or_default()
}

/// DER tags used below.
const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
/// `[3] EXPLICIT Extensions` in a TBSCertificate.
const EXTENSIONS: u8 = 0xa3;
/// `dNSName [2] IA5String` and `uniformResourceIdentifier [6] IA5String` in GeneralName.
const DNS_NAME: u8 = 0x82;
const URI: u8 = 0x86;
/// 2.5.29.17, id-ce-subjectAltName.
const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];
/// Names kept from one certificate at most.
const MAX_NAMES: usize = 64;

fn san_values(der: &[u8]) -> Option<Vec<San>> {
    let (tag, cert, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, mut tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut extensions = None;
    while !tbs.is_empty() {
        let (tag, value, rest) = tlv(tbs)?;
        if tag == EXTENSIONS {
            extensions = Some(value);
        }
        tbs = rest;
    }
    let (tag, mut list, _) = tlv(extensions?)?;
    if tag != SEQUENCE {
        return None;
    }
    while !list.is_empty() {
        let (tag, ext, rest) = tlv(list)?;
        list = rest;
        if tag != SEQUENCE {
            return None;
        }
        let (tag, oid, mut ext) = tlv(ext)?;
        if tag != OID || oid != SAN_OID {
            continue;
        }
        let (mut tag, mut value, rest) = tlv(ext)?;
        if tag == BOOLEAN {
            ext = rest;
            (tag, value, _) = tlv(ext)?;
        }
        if tag != OCTET_STRING {
            return None;
        }
        let (tag, mut names, _) = tlv(value)?;
        if tag != SEQUENCE {
            return None;
        }
        let mut out = Vec::new();
        while !names.is_empty() && out.len() < MAX_NAMES {
            let (tag, name, rest) = tlv(names)?;
            names = rest;
            let Some(text) = std::str::from_utf8(name).ok().filter(|t| t.is_ascii()) else {
                continue;
            };
            match tag {
                DNS_NAME => out.push(San::Dns(text.to_ascii_lowercase())),
                URI => out.push(San::Uri(text.to_string())),
                _ => {}
            }
        }
        return Some(out);
    }
    Some(Vec::new())
}

/// When a certificate stops being valid (its `notAfter`), as RFC 3339 in UTC
/// (`2031-05-17T00:00:00Z`); `None` when the DER cannot be read.
pub fn not_after(der: &[u8]) -> Option<String> {
    const INTEGER: u8 = 0x02;
    /// `[0] EXPLICIT Version` in a TBSCertificate.
    const VERSION: u8 = 0xa0;
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    let (tag, cert, _) = tlv(der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    // version (optional), serialNumber, signature, issuer, validity.
    let (mut tag, _, mut rest) = tlv(tbs)?;
    if tag == VERSION {
        (tag, _, rest) = tlv(rest)?;
    }
    if tag != INTEGER {
        return None;
    }
    for _ in 0..2 {
        let (tag, _, after) = tlv(rest)?;
        if tag != SEQUENCE {
            return None;
        }
        rest = after;
    }
    let (tag, validity, _) = tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, validity) = tlv(validity)?;
    let (tag, time, _) = tlv(validity)?;
    // RFC 5280: YYMMDDHHMMSSZ (years 1950 to 2049) or YYYYMMDDHHMMSSZ.
    let digits = time.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let text = std::str::from_utf8(digits).ok()?;
    let (century, rest) = match (tag, text.len()) {
        (UTC_TIME, 12) => (if text < "50" { "20" } else { "19" }, text),
        (GENERALIZED_TIME, 14) => text.split_at(2),
        _ => return None,
    };
    let part = |i: usize| rest.get(i..i + 2);
    Some(format!(
        "{century}{}-{}-{}T{}:{}:{}Z",
        part(0)?,
        part(2)?,
        part(4)?,
        part(6)?,
        part(8)?,
        part(10)?
    ))
}

/// One DER element: its tag, its contents and what follows it. Only single-byte tags and
/// lengths up to four bytes, as certificates use.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("certificate parameters");
        for n in names {
            let san = if n.contains(':') {
                rcgen::SanType::URI(rcgen::Ia5String::try_from(*n).expect("uri"))
            } else {
                rcgen::SanType::DnsName(rcgen::Ia5String::try_from(*n).expect("dns"))
            };
            params.subject_alt_names.push(san);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        params
            .self_signed(&key)
            .expect("certificate")
            .der()
            .to_vec()
    }

    #[test]
    fn reads_dns_and_uri_names() {
        let der = cert(&["Store-17.Example", "spiffe://franchise/store-17"]);
        assert_eq!(
            subject_alt_names(&der),
            vec![
                San::Dns("store-17.example".into()),
                San::Uri("spiffe://franchise/store-17".into())
            ]
        );
        assert!(subject_alt_names(&cert(&[])).is_empty());
    }

    #[test]
    fn reads_the_expiry_in_either_time_form() {
        for (year, shown) in [
            (2031, "2031-05-17T00:00:00Z"),
            (1999, "1999-05-17T00:00:00Z"),
            // From 2050 on a certificate carries a GeneralizedTime.
            (2051, "2051-05-17T00:00:00Z"),
        ] {
            let mut params = rcgen::CertificateParams::new(vec!["gateway.example".to_string()])
                .expect("certificate parameters");
            params.not_after = rcgen::date_time_ymd(year, 5, 17);
            let key = rcgen::KeyPair::generate().expect("key");
            let der = params
                .self_signed(&key)
                .expect("certificate")
                .der()
                .to_vec();
            assert_eq!(not_after(&der).as_deref(), Some(shown));
        }
    }

    #[test]
    fn malformed_der_yields_no_names() {
        let der = cert(&["store-17.example"]);
        for cut in [0, 1, 2, 10, der.len() / 2, der.len() - 1] {
            let _ = subject_alt_names(&der[..cut]);
            let _ = not_after(&der[..cut]);
        }
        let mut flipped = der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xff;
            let _ = subject_alt_names(&flipped);
            let _ = not_after(&flipped);
            flipped[i] ^= 0xff;
        }
        assert!(subject_alt_names(b"\x30\x84\xff\xff\xff\xff").is_empty());
    }
}
