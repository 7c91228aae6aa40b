//! The forwarding proxy: inbound checks, credentials, the upstream call, error answers.
//!
//! [`Proxy::handle`] is the whole request path. It never reads a body whole: request and response
//! bodies stream frame by frame, so memory per request stays small whatever the transfer size.
//! Request bodies go through [`OutboundBody`], which enforces `listen.max_body` and
//! `listen.body_idle_timeout` on every profile and keeps the capped copy a second send needs.
//!
//! A request is sent to Tango again only when Tango provably did not act on it: a 401 (replayed
//! with a new credential, OAuth profiles: once, and once more only with a new token — see
//! `MAX_REPLAYS`), or a stream its HTTP/2 edge refused — above a
//! GOAWAY's last-stream-id, `REFUSED_STREAM`, or a request that never left the proxy
//! ([`client::Refusal`]). Each send that is refused so is sent once more, whatever the method,
//! with a credential authorized anew (a DPoP proof is never reused) and the kept body; a body
//! too large to keep, or any other failure (a timeout, a reset once Tango started answering),
//! keeps its 502 or 504. A stream refused for `REFUSED_STREAM` may go again on the same
//! connection, as RFC 9113 §8.7 allows; after a GOAWAY the pool never reuses that connection.
//! The upstream origin comes only from configuration; absolute-form requests naming any other
//! authority are refused rather than forwarded somewhere unexpected.

mod body;
pub mod client;
pub mod error;
mod guard;
pub mod headers;
mod response;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::auth::{AfterRejection, AuthError, Authorizer, Credential, ProfileSet, Target};
use crate::config::{Config, UpstreamUrl};
use crate::describe;
use crate::metrics::Metrics;
use body::{BodyCopy, BodyFailure, BodyLimits, BodyWatch, Kept};
pub use body::{OutboundBody, OutboundBodyError};
use client::{Refusal, UpstreamClient};
pub use error::{ProxyError, PROXY_ERROR_HEADER};
use headers::RequestIds;
pub use response::{UpstreamBody, UpstreamBodyError};

/// The body of a response to an app: Tango's, streamed, or the proxy's own error JSON.
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// A cheaply cloneable handle to the proxy's shared state.
#[derive(Debug, Clone)]
pub struct Proxy(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    upstream: UpstreamUrl,
    client: UpstreamClient,
    /// Every profile, in name order; a sidecar has one. A reload may replace one's authorizer
    /// (credential rotation); a request keeps the one it started with.
    profiles: Arc<ProfileSet>,
    /// What a 401 tells the app when Tango gave no challenge it can act on: for a Basic
    /// profile, and for an OAuth one.
    challenges: [HeaderValue; 2],
    /// Gateway mode: the callers and their policies, swapped whole by a reload.
    gateway: crate::reload::GatewayCell,
    /// Reward currencies by `utid`, per profile (gateway spend limits).
    catalogs: guard::Catalogs,
    max_body: u64,
    body_idle_timeout: Duration,
    max_header_size: u64,
    timeout: Duration,
    replay_max_body: u64,
    /// `upstream.body_idle_timeout`.
    response_idle_timeout: Duration,
    /// `tango_proxy_upstream_errors_total{kind="body_stalled"}`.
    body_stalled: prometheus_client::metrics::counter::Counter,
    /// Authorities an absolute-form request may name: the proxy itself and the upstream.
    local_authorities: Vec<String>,
    metrics: Arc<Metrics>,
    ids: RequestIds,
}

/// Replays after a 401, at most. One covers a refused token (replaced by a mint or a peer's
/// token) or a DPoP nonce or proof challenge; a second, only with a new token, covers the
/// replacement being refused too — a peer's token adopted from the cache that the same
/// revocation killed. A token this process just minted and Tango refuses again is not replaced a
/// second time (the owner declines within 10 s), so a request never costs more than one mint.
const MAX_REPLAYS: usize = 2;

/// What the upstream call produced.
type Forwarded = (Response<Incoming>, Option<HeaderValue>);

/// The app's request body as the forwarder takes it: still streaming, or read whole already
/// (the gateway reads the bodies it checks).
#[derive(Debug)]
enum AppBody {
    Streaming(Incoming),
    Read(Bytes),
}

/// How one send to Tango failed.
#[derive(Debug)]
enum SendFailure {
    /// Tango provably did not process the request: it may be sent once more.
    Refused(Refusal, ProxyError),
    /// Anything else: the answer to the app.
    Failed(ProxyError),
}

impl Proxy {
    /// Builds the proxy for its profiles (in name order, as `config.profiles` holds them) and,
    /// in gateway mode, its callers; `bound` is the address the proxy listener really has.
    pub fn new(
        config: &Config,
        profiles: Arc<ProfileSet>,
        gateway: crate::reload::GatewayCell,
        metrics: Arc<Metrics>,
        bound: SocketAddr,
    ) -> Result<Self, crate::tls::TlsError> {
        let client = client::build(&config.upstream)?;
        let challenges = [headers::app_challenge(true), headers::app_challenge(false)];
        let catalogs = guard::Catalogs::default();
        let mut local_authorities = vec![
            bound.to_string(),
            format!("localhost:{}", bound.port()),
            config.upstream.url.authority.as_str().to_ascii_lowercase(),
        ];
        if bound.port() == 80 {
            local_authorities.push(bound.ip().to_string());
            local_authorities.push("localhost".into());
        }
        Ok(Self(Arc::new(Inner {
            upstream: config.upstream.url.clone(),
            client,
            profiles,
            challenges,
            gateway,
            catalogs,
            max_body: config.listen.max_body,
            body_idle_timeout: config.listen.body_idle_timeout,
            max_header_size: config.listen.max_header_size,
            timeout: config.upstream.timeout,
            replay_max_body: config.upstream.replay_max_body,
            response_idle_timeout: config.upstream.body_idle_timeout,
            body_stalled: metrics.upstream_error_counter("body_stalled"),
            local_authorities,
            metrics,
            ids: RequestIds::new(),
        })))
    }

    /// Handles one app request end to end; always produces a response.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
    ) -> Response<ResponseBody> {
        let inner = &*self.0;
        let start = Instant::now();
        let _in_flight = inner.metrics.in_flight();
        let request_id = inner.ids.for_request(req.headers());
        let method = req.method().clone();
        // A clone shares the URI's bytes; the path is needed for the log after `req` moves.
        let uri = req.uri().clone();
        let path = uri.path();

        let mut caller = None;
        // The gateway as of this request: a reload swaps it for later requests only.
        let gateway = inner.gateway.borrow().clone();
        let outcome = match &gateway {
            None => self.sidecar_request(req, remote, &request_id).await,
            Some(gateway) => {
                self.gateway_request(gateway, req, remote, &request_id, &mut caller)
                    .await
            }
        };
        let (response, upstream_id, cause) = match outcome {
            Ok((resp, upstream_id)) => (resp, upstream_id, None),
            Err(err) => {
                inner.metrics.proxy_error(err.cause());
                if err.status().is_server_error() {
                    tracing::warn!(request_id = ?request_id, cause = err.cause(), "{err}");
                } else {
                    tracing::debug!(request_id = ?request_id, cause = err.cause(), "{err}");
                }
                let resp = err.to_response(&request_id, path).map(Either::Right);
                (resp, None, Some(err.cause()))
            }
        };
        let elapsed = start.elapsed();
        let status = response.status().as_u16();
        inner.metrics.record_response(status, elapsed);
        tracing::info!(
            target: "tango_auth_proxy::access",
            method = %method,
            path = %path,
            status,
            duration_ms = elapsed.as_micros() as f64 / 1000.0,
            request_id = %request_id.to_str().unwrap_or_default(),
            upstream_request_id = upstream_id.as_ref().and_then(|v| v.to_str().ok()),
            caller = caller.as_ref().map(|c| c.name.as_str()),
            error = cause,
            "request"
        );
        response
    }

    /// A sidecar's request: checked, forwarded with the one profile, the answer streamed back.
    async fn sidecar_request(
        &self,
        req: Request<Incoming>,
        remote: SocketAddr,
        request_id: &HeaderValue,
    ) -> Result<(Response<ResponseBody>, Option<HeaderValue>), ProxyError> {
        let (parts, body) = req.into_parts();
        let uri = self.check_inbound(&parts, &body)?;
        let (resp, upstream_id) = self
            .forward(parts, uri, AppBody::Streaming(body), 0, remote, request_id)
            .await?;
        Ok((self.stream_back(resp), upstream_id))
    }

    /// Tango's response with its body streamed to the app under `upstream.body_idle_timeout`.
    fn stream_back(&self, resp: Response<Incoming>) -> Response<ResponseBody> {
        let inner = &*self.0;
        let (idle, stalled) = (inner.response_idle_timeout, inner.body_stalled.clone());
        resp.map(|body| Either::Left(UpstreamBody::new(body, idle, stalled)))
    }

    /// What every request must pass before anything else: the method, Host, header size,
    /// request target and declared body size. Returns the upstream URI.
    fn check_inbound(
        &self,
        parts: &http::request::Parts,
        body: &Incoming,
    ) -> Result<Uri, ProxyError> {
        let inner = &*self.0;

        // CONNECT would tunnel past the proxy; TRACE, reflected by an upstream, would show the
        // app the credential the proxy added.
        if parts.method == Method::CONNECT || parts.method == Method::TRACE {
            return Err(ProxyError::MethodNotAllowed(parts.method.clone()));
        }
        // RFC 9112 §3.2: an HTTP/1.1 request carries exactly one Host (HTTP/1.0 may omit it).
        let hosts = parts.headers.get_all(header::HOST).iter().count();
        if hosts > 1 || (hosts == 0 && parts.version == Version::HTTP_11) {
            return Err(ProxyError::BadRequest(format!(
                "an HTTP/1.1 request needs exactly one Host header, not {hosts}"
            )));
        }
        let size = headers::header_section_size(&parts.headers, &parts.uri, &parts.method);
        if size > inner.max_header_size {
            return Err(ProxyError::HeadersTooLarge {
                size,
                limit: inner.max_header_size,
            });
        }
        // An HTTP/2 request always carries :scheme and :authority (its Host, naming this
        // listener through whatever name the client used): not an absolute-form target. The
        // origin comes only from configuration either way (`upstream_uri` takes the path).
        if parts.version != Version::HTTP_2 {
            // Apps speak plain HTTP to the proxy: an absolute-form target is http:// or refused.
            if let Some(scheme) = parts
                .uri
                .scheme()
                .filter(|s| *s != &http::uri::Scheme::HTTP)
            {
                return Err(ProxyError::BadRequest(format!(
                    "absolute-form request with scheme {scheme} refused: only http:// targets are accepted"
                )));
            }
            if let Some(authority) = parts.uri.authority() {
                if !self.is_local(authority) {
                    // Host and port only: user information in the target may be a credential.
                    let shown = match authority.port() {
                        Some(port) => format!("{}:{port}", authority.host()),
                        None => authority.host().to_string(),
                    };
                    return Err(ProxyError::BadRequest(format!(
                        "absolute-form request for {shown} refused: this proxy forwards only to {}",
                        inner.upstream
                    )));
                }
            }
        }
        // The body's own size hint (exact for a Content-Length) refuses a body known to be too
        // large before a token is spent on it; chunked bodies are cut off mid-stream instead.
        if body.size_hint().lower() > inner.max_body {
            return Err(ProxyError::BodyTooLarge {
                limit: inner.max_body,
            });
        }
        self.upstream_uri(parts.uri.path_and_query())
    }

    /// Sends the request to Tango with `profile`'s credential (the index in `profiles`),
    /// resending and replaying as the module's rules allow.
    async fn forward(
        &self,
        mut parts: http::request::Parts,
        uri: Uri,
        body: AppBody,
        profile: usize,
        remote: SocketAddr,
        request_id: &HeaderValue,
    ) -> Result<Forwarded, ProxyError> {
        let inner = &*self.0;
        // The profile's authorizer as of now, for every send of this request.
        let (authorizer, basic) = inner.profiles.for_request(profile);
        let authorizer = &*authorizer;
        // Nothing is read before the first send, so the credential is fetched right before it.
        let credential = authorizer
            .authorize(Target {
                method: &parts.method,
                uri: &uri,
            })
            .resolve()
            .await
            .map_err(token_unavailable)?;

        headers::sanitize_request(&mut parts.headers, remote.ip(), request_id);
        parts.uri = uri;
        // The pooled client picks HTTP/2 itself when ALPN negotiates it.
        parts.version = Version::HTTP_11;

        // Most calls (GETs) have no body: they skip the wrapper, its timer and its report.
        let (body, mut kept) = match body {
            AppBody::Read(bytes) if bytes.is_empty() => (OutboundBody::empty(), Kept::Empty),
            AppBody::Read(bytes) => {
                let copy = BodyCopy::whole(bytes);
                (OutboundBody::replay(copy.clone()), Kept::Copy(copy))
            }
            AppBody::Streaming(body) => self.outbound(body),
        };
        // Any request may need a second send (refused unprocessed, or a 401): its parts are
        // kept when its body can be.
        let template = kept.may_resend().then(|| parts.clone());
        let sent_to = parts.uri.clone();
        let first = with_credential(parts, &credential);
        let (response, credential) = self
            .send_resending(
                authorizer,
                first,
                body,
                credential,
                template.as_ref(),
                &mut kept,
                request_id,
            )
            .await?;
        authorizer.observe(&sent_to, response.headers());
        let (mut response, mut credential) = (response, credential);
        for round in 0..MAX_REPLAYS {
            if response.status() != StatusCode::UNAUTHORIZED {
                break;
            }
            // Even a request that cannot be replayed tells the authorizer the token was refused,
            // so the next request does not reuse it (that happens before `rejected` returns; the
            // future only waits for a fresh credential and may be dropped).
            let fresh_coming = authorizer.rejected(&credential, response.headers());
            let Some(template) = template.as_ref().filter(|_| authorizer.replays()) else {
                break;
            };
            match fresh_coming.await {
                AfterRejection::Replay => {}
                AfterRejection::PassOn => break,
                AfterRejection::Unavailable(e) => return Err(token_unavailable(e)),
            }
            // Replay only a body kept whole, within `upstream.replay_max_body`.
            let Ok(body) = kept.body(inner.body_idle_timeout).await else {
                tracing::debug!(request_id = ?request_id, "401 passed on: the request body was not kept whole for a replay");
                break;
            };
            let fresh = authorizer
                .authorize(Target {
                    method: &template.method,
                    uri: &template.uri,
                })
                .resolve()
                .await;
            // Only a different credential is worth a replay: a new token, or a new DPoP proof —
            // but only a new token the second time (a proof refused twice is a skewed clock).
            let Some(fresh) = fresh.ok().filter(|f| {
                f.authorization != credential.authorization
                    || (round == 0 && f.dpop != credential.dpop)
            }) else {
                break;
            };
            tracing::info!(request_id = ?request_id, "replaying after a 401 with a new credential");
            let replay = with_credential(template.clone(), &fresh);
            // Boxed, as every rare path here: held inline, its state would make the future of
            // every request larger, and that future is moved (copied) as it is handed on.
            let (replay, used) = Box::pin(self.send_resending(
                authorizer,
                replay,
                body,
                fresh,
                Some(template),
                &mut kept,
                request_id,
            ))
            .await?;
            authorizer.observe(&sent_to, replay.headers());
            (response, credential) = (replay, used);
        }
        let challenge = &inner.challenges[usize::from(!basic)];
        Ok(self.finish(response, request_id, challenge))
    }

    /// The app's streaming body within the limits, and what is kept of it for more sends.
    fn outbound(&self, body: Incoming) -> (OutboundBody, Kept) {
        let inner = &*self.0;
        if body.is_end_stream() {
            return (OutboundBody::empty(), Kept::Empty);
        }
        let limits = BodyLimits {
            max_body: inner.max_body,
            idle_timeout: inner.body_idle_timeout,
            replay_cap: inner.replay_max_body,
        };
        let (body, watch) = OutboundBody::streaming(body, limits);
        (body, Kept::Watch(watch))
    }

    /// Sends `parts` (carrying `credential`); when Tango refuses it unprocessed, sends it once
    /// more from `template` with a credential authorized anew and the kept body, if both were
    /// kept. Returns Tango's response and the credential it answers.
    #[allow(clippy::too_many_arguments)]
    async fn send_resending(
        &self,
        authorizer: &dyn Authorizer,
        parts: http::request::Parts,
        body: OutboundBody,
        credential: Credential,
        template: Option<&http::request::Parts>,
        kept: &mut Kept,
        request_id: &HeaderValue,
    ) -> Result<(Response<Incoming>, Credential), ProxyError> {
        let (refusal, err) = match self.send(parts, body, kept.watch()).await {
            Ok(response) => return Ok((response, credential)),
            Err(SendFailure::Failed(err)) => return Err(err),
            Err(SendFailure::Refused(refusal, err)) => (refusal, err),
        };
        Box::pin(self.resend(authorizer, refusal, err, template, kept, request_id)).await
    }

    /// The second send of a request Tango refused unprocessed (see [`Proxy::send_resending`]).
    async fn resend(
        &self,
        authorizer: &dyn Authorizer,
        refusal: Refusal,
        err: ProxyError,
        template: Option<&http::request::Parts>,
        kept: &mut Kept,
        request_id: &HeaderValue,
    ) -> Result<(Response<Incoming>, Credential), ProxyError> {
        let inner = &*self.0;
        // Sent again only with its parts and its whole body.
        let body = match template {
            Some(_) => kept.body(inner.body_idle_timeout).await,
            None => Err(None),
        };
        let (template, body) = match (template, body) {
            (Some(template), Ok(body)) => (template, body),
            (_, Err(Some(failure))) => return Err(self.body_failed(failure, None)),
            _ => {
                tracing::debug!(request_id = ?request_id, reason = refusal.label(), "not sent again: the request body was not kept whole");
                inner.metrics.upstream_error("io");
                return Err(err);
            }
        };
        let fresh = authorizer
            .authorize(Target {
                method: &template.method,
                uri: &template.uri,
            })
            .resolve()
            .await
            .map_err(token_unavailable)?;
        inner.metrics.upstream_retry(refusal.label());
        tracing::debug!(request_id = ?request_id, reason = refusal.label(), "Tango did not process the request ({err}); sending it once more");
        match self
            .send(with_credential(template.clone(), &fresh), body, None)
            .await
        {
            Ok(response) => Ok((response, fresh)),
            Err(SendFailure::Failed(err)) => Err(err),
            Err(SendFailure::Refused(_, err)) => {
                inner.metrics.upstream_error("io");
                Err(err)
            }
        }
    }

    /// Sends one request upstream within `upstream.timeout`. When the call fails because the
    /// app's body did (`watch` says how), the answer names the app's side, not Tango's; so does
    /// a timeout that runs out while the proxy is still waiting for the app's body.
    async fn send(
        &self,
        parts: http::request::Parts,
        body: OutboundBody,
        watch: Option<&BodyWatch>,
    ) -> Result<Response<Incoming>, SendFailure> {
        let inner = &*self.0;
        let outbound = Request::from_parts(parts, body);
        match tokio::time::timeout(inner.timeout, inner.client.request(outbound)).await {
            // The timeout covers sending the body too; the idle clock starts later, so with equal
            // settings a stalled app would otherwise be reported as a slow Tango.
            Err(_) if watch.is_some_and(BodyWatch::waiting_on_app) => {
                Err(SendFailure::Failed(ProxyError::RequestTimeout {
                    limit: inner.timeout,
                    key: "upstream.timeout",
                }))
            }
            Err(_) => {
                inner.metrics.upstream_error("timeout");
                Err(SendFailure::Failed(ProxyError::UpstreamTimeout(
                    inner.timeout,
                )))
            }
            Ok(Err(e)) => {
                // A body that failed reported why before the client saw the failure.
                if let Some(failure) = watch.and_then(BodyWatch::failure) {
                    return Err(SendFailure::Failed(self.body_failed(failure, Some(&e))));
                }
                let err = ProxyError::UpstreamUnreachable(describe(&e));
                if let Some(refusal) = Refusal::of(&e) {
                    return Err(SendFailure::Refused(refusal, err));
                }
                inner
                    .metrics
                    .upstream_error(if e.is_connect() { "connect" } else { "io" });
                Err(SendFailure::Failed(err))
            }
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// The answer when the app's body failed; `e` is the upstream call it broke, if any.
    fn body_failed(&self, failure: BodyFailure, e: Option<&client::UpstreamError>) -> ProxyError {
        let inner = &*self.0;
        match failure {
            BodyFailure::TooLarge => ProxyError::BodyTooLarge {
                limit: inner.max_body,
            },
            BodyFailure::Stalled => ProxyError::RequestTimeout {
                limit: inner.body_idle_timeout,
                key: "listen.body_idle_timeout",
            },
            BodyFailure::Broken => ProxyError::BadRequest(
                e.map(|e| describe(e))
                    .unwrap_or_else(|| "cannot read the request body".into()),
            ),
        }
    }

    fn finish(
        &self,
        mut response: Response<Incoming>,
        request_id: &HeaderValue,
        challenge: &HeaderValue,
    ) -> Forwarded {
        let status = response.status();
        let upstream_id =
            headers::sanitize_response(response.headers_mut(), request_id, status, challenge);
        (response, upstream_id)
    }

    fn is_local(&self, authority: &Authority) -> bool {
        let a = authority.as_str();
        self.0
            .local_authorities
            .iter()
            .any(|l| l.eq_ignore_ascii_case(a))
    }

    /// `upstream.url` + the app's path and query.
    fn upstream_uri(&self, pq: Option<&PathAndQuery>) -> Result<Uri, ProxyError> {
        let upstream = &self.0.upstream;
        let pq = match pq {
            None => PathAndQuery::from_static("/"),
            Some(pq) if !pq.as_str().starts_with('/') => {
                return Err(ProxyError::BadRequest(format!(
                    "request target {:?} is not a path",
                    pq.as_str()
                )))
            }
            Some(pq) if upstream.base_path.is_empty() => pq.clone(),
            Some(pq) => format!("{}{}", upstream.base_path, pq)
                .parse()
                .map_err(|_| ProxyError::BadRequest("invalid request target".into()))?,
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(upstream.scheme.clone());
        parts.authority = Some(upstream.authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target".into()))
    }
}

fn token_unavailable(e: AuthError) -> ProxyError {
    match e {
        AuthError::Unavailable {
            retry_after,
            reason,
            ..
        } => ProxyError::TokenUnavailable {
            reason: format!("no usable Tango credential: {reason}"),
            retry_after,
        },
    }
}

/// The request's parts with the credential headers set.
fn with_credential(
    mut parts: http::request::Parts,
    credential: &Credential,
) -> http::request::Parts {
    parts
        .headers
        .insert(header::AUTHORIZATION, credential.authorization.clone());
    if let Some(dpop) = &credential.dpop {
        parts.headers.insert("dpop", dpop.clone());
    }
    parts
}
