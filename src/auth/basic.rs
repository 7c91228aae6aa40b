//! Basic auth: `Authorization: Basic base64(platform_name:api_key)`, encoded once at start.

use base64::Engine;
use http::HeaderValue;

use super::{AuthBuildError, Authorization, Authorizer, Credential, ProfileStatus, Target};
use crate::secret::Secret;

/// A pre-encoded Basic credential.
pub struct BasicAuth {
    platform_name: String,
    header: HeaderValue,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("platform_name", &self.platform_name)
            .field("header", &crate::secret::REDACTED)
            .finish()
    }
}

impl BasicAuth {
    /// Encodes the header once; every request clones it (a reference-count bump).
    pub fn new(platform_name: &str, api_key: &Secret) -> Result<Self, AuthBuildError> {
        let mut pair = zeroize::Zeroizing::new(String::with_capacity(
            platform_name.len() + 1 + api_key.expose().len(),
        ));
        pair.push_str(platform_name);
        pair.push(':');
        pair.push_str(api_key.expose());
        let encoded = zeroize::Zeroizing::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
        ));
        let mut header =
            HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(encoded.as_bytes()))
                .map_err(|_| AuthBuildError::InvalidHeader("basic"))?;
        header.set_sensitive(true);
        Ok(Self {
            platform_name: platform_name.to_string(),
            header,
        })
    }
}

impl Authorizer for BasicAuth {
    fn authorize<'a>(&'a self, _target: Target<'a>) -> Authorization<'a> {
        Authorization::Ready(Ok(Credential {
            authorization: self.header.clone(),
            dpop: None,
        }))
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn status(&self) -> ProfileStatus {
        ProfileStatus {
            auth: "basic",
            ready: true,
            identity: self.platform_name.clone(),
            cache_healthy: true,
            token: None,
            secret_rotation: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_rfc7617_basic() {
        let auth = BasicAuth::new("Aladdin", &Secret::new("open sesame")).unwrap();
        let method = http::Method::GET;
        let uri = http::Uri::from_static("https://x/raas/v2/catalogs");
        let Authorization::Ready(Ok(c)) = auth.authorize(Target {
            method: &method,
            uri: &uri,
        }) else {
            unreachable!("basic is always ready")
        };
        assert_eq!(c.authorization, "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(c.authorization.is_sensitive());
        assert!(!format!("{auth:?}").contains("QWxh"));
    }
}
