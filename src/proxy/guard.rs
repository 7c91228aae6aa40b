//! The gateway's request path: a caller's request is authenticated, checked against its
//! policy, forwarded with its profile's credential, and Tango's answer checked before the caller
//! sees any of it.
//!
//! Decisions beyond DESIGN.md:
//! * a bound caller's (one with `accounts` or `customers`) request bodies are all read whole
//!   (within `listen.max_body`) and must be JSON (`Content-Type` `application/json` or `+json`,
//!   no `Content-Encoding`): a body the gateway cannot read is a body it cannot check;
//! * a money-moving call of a bound caller must name an account (and a customer, when customers
//!   are bound) in its body: Tango has no default the gateway could check;
//! * answers to bound callers are read whole (up to 16 MiB) and checked, except the catalog,
//!   choice-product and exchange-rate lists, which name no account; a non-empty answer that is
//!   not JSON, is compressed, too large or broken off is withheld (502 `answer_unchecked`).
//!   `Accept-Encoding` is removed from their requests so Tango answers uncompressed;
//! * the currency of an order is the currency of its reward (`utid`), which the gateway looks up
//!   in the profile's catalog (fetched with the profile's credential on the first order for an
//!   unknown `utid`, at most once a minute); an order whose reward is in another currency than
//!   the caller's limit is refused;
//! * money-moving requests (and only those) are written to the audit log
//!   (`tango_auth_proxy::audit`), after Tango's answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use serde_json::Value;

use super::body::{read_whole, BodyFailure};
use super::{AppBody, Proxy, ProxyError, ResponseBody};
use crate::auth::Target;
use crate::config::Money;
use crate::gateway::bindings::{self, identifier_key, OrderFacts};
use crate::gateway::spend::{utc_day, Reserved};
use crate::gateway::{json, Caller, Gateway, Refusal};

/// The largest request body the gateway reads to check it. Tango's request bodies are small
/// (an order is under 2 KiB); parsing and holding a body costs time and memory in proportion to
/// it, on the threads every store shares, so a store cannot make the gateway parse megabytes.
const MAX_CHECKED_BODY: u64 = 64 << 10;
/// The largest answer read to check it.
const MAX_CHECKED_ANSWER: u64 = 16 << 20;
/// The largest catalog read for reward currencies.
const MAX_CATALOG: u64 = 32 << 20;
/// A catalog is fetched again for an unknown `utid` no sooner than this.
const CATALOG_REFETCH: Duration = Duration::from_secs(60);

/// Reward currencies by `utid`, one table per profile place (made on first use, so profiles a
/// reload adds have theirs).
#[derive(Debug, Default)]
pub(super) struct Catalogs(std::sync::RwLock<Vec<Arc<Catalog>>>);

#[derive(Debug, Default)]
struct Catalog {
    /// Read without waiting by every order.
    state: std::sync::Mutex<CatalogState>,
    /// Held by the one order fetching the catalog.
    fetch: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct CatalogState {
    currencies: HashMap<String, String>,
    fetched: Option<Instant>,
    /// Why the last fetch failed, while it is fresh.
    failure: Option<String>,
}

impl Catalogs {
    /// Profile `profile`'s table.
    fn get(&self, profile: usize) -> Arc<Catalog> {
        if let Some(c) = self
            .0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(profile)
        {
            return c.clone();
        }
        let mut all = self.0.write().unwrap_or_else(|p| p.into_inner());
        while all.len() <= profile {
            all.push(Arc::default());
        }
        all[profile].clone()
    }
}

/// A reservation against a caller's daily spend limit, to settle once Tango answered.
#[derive(Debug)]
struct Hold {
    day: String,
    amount: u64,
}

impl From<Refusal> for ProxyError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Unauthorized(why) => {
                ProxyError::CallerUnauthorized(format!("caller authentication failed: {why}"))
            }
            Refusal::Forbidden(message) => ProxyError::CallerForbidden(message),
            Refusal::RateLimited(retry_after) => ProxyError::RateLimited {
                reason: "too many failed authentications from this address".into(),
                retry_after,
            },
            Refusal::SpendUnavailable(message) => ProxyError::SpendLimitUnavailable(message),
        }
    }
}

impl Proxy {
    /// A gateway request end to end. `caller_name` is set once the caller is known (for the
    /// access log).
    pub(super) async fn gateway_request(
        &self,
        gateway: &Arc<Gateway>,
        req: Request<Incoming>,
        remote: SocketAddr,
        request_id: &HeaderValue,
        caller_name: &mut Option<Arc<Caller>>,
    ) -> Result<(Response<ResponseBody>, Option<HeaderValue>), ProxyError> {
        let (mut parts, body) = req.into_parts();
        let uri = self.check_inbound(&parts, &body)?;
        let cert = parts.extensions.get::<crate::tls::ClientCert>();
        let caller = gateway
            .authenticate(&parts.headers, cert, remote.ip())
            .await?
            .clone();
        *caller_name = Some(caller.clone());
        caller.admit().map_err(|r| match r {
            Refusal::RateLimited(retry_after) => ProxyError::RateLimited {
                reason: format!("rate limit of caller {} reached", caller.name),
                retry_after,
            },
            other => other.into(),
        })?;
        refuse_method_overrides(&caller, &parts)?;
        let method = parts.method.clone();
        // A clone shares the URI's bytes: the path outlives `parts`, which moves on.
        let target = parts.uri.clone();
        let clean = caller.check_target(&method, target.path(), target.query())?;
        let segments = clean.segments();
        let item = addressed_item(segments);
        let money_moving = bindings::is_money_moving(&method, &clean);
        let order = bindings::is_order(&method, &clean);
        let bound = caller.inspects_answers();
        let reads = method == Method::GET || method == Method::HEAD;
        if bound {
            if let Some(why) = unattributable(&method, segments) {
                return Err(caller.forbid(why.to_string()).into());
            }
            // A HEAD answer has no body to check, yet its headers tell what the GET would carry.
            if method == Method::HEAD && !names_no_accounts(segments) {
                return Err(caller
                    .forbid("HEAD is refused for callers bound to accounts: its answer cannot be checked; use GET".into())
                    .into());
            }
        }
        strip_rerouting_headers(&mut parts.headers);
        // Bound callers' answers are read and checked, except lists that name no account.
        let inspect_answer = bound && !(reads && names_no_accounts(segments));
        // Money-moving bodies are read by every caller, for the audit log.
        let read_body = caller.inspects_body(&method, &clean) || money_moving;
        drop(clean);

        // The body, read and checked when it matters.
        let mut value = None;
        let app_body = if read_body {
            let bytes = if body.is_end_stream() {
                Bytes::new()
            } else {
                let (bytes, v) = self.read_json_body(&caller, &parts.headers, body).await?;
                value = Some(v);
                bytes
            };
            if money_moving {
                require_named(&caller, value.as_ref())?;
            }
            AppBody::Read(bytes)
        } else {
            AppBody::Streaming(body)
        };
        let facts = value
            .as_ref()
            .filter(|_| order)
            .map(|v| bindings::order_facts(v, spend_decimals(&caller)));
        if order
            && caller.require_external_ref_id
            && facts
                .as_ref()
                .and_then(|f| f.external_ref_id.as_ref())
                .is_none()
        {
            return Err(caller
                .forbid(format!(
                    "caller {} must send an externalRefID with every order \
                     (require_external_ref_id), so a retried order is never placed twice",
                    caller.name
                ))
                .into());
        }
        let profile = caller.profile_index;
        // An action on one order or line item (a resend, a cancel, a reissue) names no account:
        // a bound caller's is checked against the item's own account first.
        if bound && !reads {
            if let Some(item) = &item {
                self.check_item_owner(&caller, profile, item).await?;
            }
        }

        // The daily spend limit, reserved before Tango sees the order.
        let hold = match (&caller.spend_limit, order) {
            (Some(limit), true) => {
                self.reserve(gateway, &caller, limit, profile, facts.as_ref())
                    .await?
            }
            (Some(_), false) if money_moving => {
                self.ledger_reachable(gateway, &caller).await?;
                None
            }
            _ => None,
        };

        if inspect_answer || money_moving {
            // Answers that are read must come uncompressed.
            parts.headers.remove(header::ACCEPT_ENCODING);
        }
        caller.allowed();
        let sent = Sent {
            proxy: self.clone(),
            gateway: gateway.clone(),
            caller,
            by_id: item.is_some() && reads,
            method,
            target,
            body: value,
            hold,
            money_moving,
            inspect_answer,
        };
        let finish = sent.finish(parts, uri, app_body, profile, remote, request_id.clone());
        if money_moving {
            // Once an order is on its way it settles and is audited even if the store hangs up
            // or the gateway is shutting down: the task outlives this request's future.
            tokio::spawn(finish).await.unwrap_or_else(|e| {
                Err(ProxyError::UpstreamUnreachable(format!(
                    "the request's task failed: {e}"
                )))
            })
        } else {
            finish.await
        }
    }

    /// Reads a request body whole and parses it as strict JSON; checks the caller's bindings.
    async fn read_json_body(
        &self,
        caller: &Caller,
        headers: &http::HeaderMap,
        body: Incoming,
    ) -> Result<(Bytes, Value), ProxyError> {
        let inner = &*self.0;
        if headers.get_all(header::CONTENT_TYPE).iter().count() > 1 {
            return Err(caller
                .forbid("more than one Content-Type: which one Tango reads cannot be known".into())
                .into());
        }
        let json_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let media = v.split(';').next().unwrap_or_default().trim();
                media.eq_ignore_ascii_case("application/json")
                    || media.to_ascii_lowercase().ends_with("+json")
            })
            .unwrap_or(false);
        if !json_type {
            return Err(caller
                .forbid("the gateway checks this caller's request bodies and accepts only JSON (Content-Type: application/json)".into())
                .into());
        }
        let encoded = headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if encoded {
            return Err(caller
                .forbid("the gateway checks this caller's request bodies and cannot read a compressed one (Content-Encoding)".into())
                .into());
        }
        let limit = inner.max_body.min(MAX_CHECKED_BODY);
        let bytes = read_whole(body, limit, inner.body_idle_timeout)
            .await
            .map_err(|f| match f {
                BodyFailure::TooLarge => ProxyError::BodyTooLarge { limit },
                f => self.body_failed(f, None),
            })?;
        let value = json::parse_strict(&bytes).map_err(|e| caller.forbid(e.to_string()))?;
        caller
            .bindings
            .check_body(&value)
            .map_err(|v| caller.forbid(v.message()))?;
        Ok((bytes, value))
    }

    /// Reads an answer whole for checking and auditing: the bytes, and the JSON when it is JSON.
    async fn read_answer(
        &self,
        head: &http::response::Parts,
        body: Incoming,
    ) -> Result<(Bytes, Option<Value>), ProxyError> {
        let inner = &*self.0;
        if head.headers.contains_key(header::CONTENT_ENCODING) {
            return Err(ProxyError::AnswerUnchecked(
                "Tango's answer is compressed and cannot be checked for this caller".into(),
            ));
        }
        let bytes = read_whole(body, MAX_CHECKED_ANSWER, inner.response_idle_timeout)
            .await
            .map_err(|f| {
                ProxyError::AnswerUnchecked(match f {
                    BodyFailure::TooLarge => format!(
                        "Tango's answer is larger than {} MiB and cannot be checked for this caller",
                        MAX_CHECKED_ANSWER >> 20
                    ),
                    _ => "Tango's answer broke off before it could be checked".into(),
                })
            })?;
        if bytes.is_empty() {
            return Ok((bytes, None));
        }
        match json::parse_strict(&bytes) {
            Ok(v) => Ok((bytes, Some(v))),
            Err(_) => Err(ProxyError::AnswerUnchecked(
                "Tango's answer is not JSON and cannot be checked for this caller".into(),
            )),
        }
    }

    /// Reserves an order's amount against the caller's daily limit.
    async fn reserve(
        &self,
        gateway: &Gateway,
        caller: &Caller,
        limit: &Money,
        profile: usize,
        facts: Option<&OrderFacts>,
    ) -> Result<Option<Hold>, ProxyError> {
        let forbid = |m: String| -> ProxyError {
            caller.spend_refused();
            caller.forbid(m).into()
        };
        let Some(facts) = facts else {
            return Err(forbid(format!(
                "caller {} has a daily spend limit: an order needs a JSON body with an amount",
                caller.name
            )));
        };
        let amount = match &facts.amount {
            Ok(Some(a)) => *a,
            Ok(None) => {
                return Err(forbid(format!(
                    "caller {} has a daily spend limit: an order needs an amount",
                    caller.name
                )))
            }
            Err(e) => return Err(forbid(e.clone())),
        };
        let Some(utid) = facts.utid.as_deref() else {
            return Err(forbid(
                "an order needs a utid (the reward) to be checked against the daily spend limit"
                    .into(),
            ));
        };
        let currency = match self.reward_currency(profile, utid).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                return Err(forbid(format!(
                    "reward {utid:?} is not in the catalog, so its currency cannot be checked against the daily spend limit"
                )))
            }
            Err(e) if caller.spend_limit_fail_open => {
                tracing::warn!(caller = %caller.name, "daily spend limit not checked (spend_limit_fail_open): {e}");
                return Ok(None);
            }
            Err(e) => {
                caller.spend_refused();
                return Err(ProxyError::SpendLimitUnavailable(format!(
                    "the daily spend limit of caller {} cannot be checked: {e}",
                    caller.name
                )));
            }
        };
        if currency != limit.currency {
            return Err(forbid(format!(
                "reward {utid:?} is in {currency}, but the daily spend limit of caller {} is in {}: \
                 orders in another currency are refused",
                caller.name, limit.currency
            )));
        }
        let day = utc_day(SystemTime::now());
        match gateway
            .ledger()
            .reserve(&caller.name, &day, amount, limit.minor)
            .await
        {
            Ok(Reserved::Granted(total)) => {
                caller.record_spend(total);
                Ok(Some(Hold { day, amount }))
            }
            Ok(Reserved::Refused(total)) => {
                caller.record_spend(total);
                Err(forbid(format!(
                    "daily spend limit of caller {} reached: {} spent today (UTC) of {}, this \
                     order is {}",
                    caller.name,
                    Money::display_minor(total, limit.decimals, &limit.currency),
                    limit,
                    Money::display_minor(amount, limit.decimals, &limit.currency),
                )))
            }
            Err(e) if caller.spend_limit_fail_open => {
                tracing::warn!(caller = %caller.name, "daily spend limit not checked (spend_limit_fail_open): {e}");
                Ok(None)
            }
            Err(e) => {
                caller.spend_refused();
                tracing::warn!(caller = %caller.name, "order refused: {e}");
                Err(ProxyError::SpendLimitUnavailable(format!(
                    "the daily spend limit of caller {} cannot be checked right now (spend ledger unreachable); \
                     the order was not sent",
                    caller.name
                )))
            }
        }
    }

    /// Settles a reservation in the background (the answer does not wait for the ledger).
    fn settle(&self, gateway: &Gateway, caller: &Arc<Caller>, hold: Hold, settle: Settle) {
        if settle == Settle::Keep {
            return;
        }
        let ledger = gateway.ledger().clone();
        let caller = caller.clone();
        tokio::spawn(async move {
            let delta = -i64::try_from(hold.amount).unwrap_or(i64::MAX);
            if let Err(e) = ledger.adjust(&caller.name, &hold.day, delta).await {
                tracing::warn!(caller = %caller.name, "a refused order's reservation could not be released (the day's total stays higher): {e}");
            }
        });
    }

    /// The currency of reward `utid` in `profile`'s catalog: `Ok(None)` when it is not there.
    /// Known rewards are answered from memory without waiting; an unknown one fetches the
    /// catalog (one fetch per profile at a time, at most once a minute, a failure remembered
    /// just as long), so one store sending odd rewards cannot hold up the others.
    async fn reward_currency(&self, profile: usize, utid: &str) -> Result<Option<String>, String> {
        let inner = &*self.0;
        let catalog = inner.catalogs.get(profile);
        let fresh = |c: &CatalogState| c.fetched.is_some_and(|t| t.elapsed() < CATALOG_REFETCH);
        {
            let state = catalog.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = state.currencies.get(utid) {
                return Ok(Some(c.clone()));
            }
            if fresh(&state) {
                return state.failure.clone().map_or(Ok(None), Err);
            }
        }
        let _fetching = catalog.fetch.lock().await;
        {
            // Another order may have fetched it while this one waited.
            let state = catalog.state.lock().unwrap_or_else(|p| p.into_inner());
            if fresh(&state) {
                return match state.currencies.get(utid) {
                    Some(c) => Ok(Some(c.clone())),
                    None => state.failure.clone().map_or(Ok(None), Err),
                };
            }
        }
        let fetched = self
            .fetch_json(profile, "/raas/v2/catalogs", MAX_CATALOG)
            .await
            .and_then(|(status, value)| {
                if status == StatusCode::OK {
                    let mut out = HashMap::new();
                    collect_currencies(&value, &mut out);
                    Ok(out)
                } else {
                    Err(format!("the catalog request got {status}"))
                }
            });
        let mut state = catalog.state.lock().unwrap_or_else(|p| p.into_inner());
        state.fetched = Some(Instant::now());
        match fetched {
            Ok(currencies) => {
                state.currencies = currencies;
                state.failure = None;
                Ok(state.currencies.get(utid).cloned())
            }
            Err(e) => {
                tracing::warn!(profile = %inner.profiles.name(profile), "reward currencies unknown: {e}");
                state.failure = Some(e.clone());
                Err(e)
            }
        }
    }

    /// `GET path` with `profile`'s credential, within `upstream.timeout` for the whole call:
    /// the status and the JSON answer (at most `cap` bytes).
    async fn fetch_json(
        &self,
        profile: usize,
        path: &str,
        cap: u64,
    ) -> Result<(StatusCode, Value), String> {
        let inner = &*self.0;
        let pq: http::uri::PathAndQuery = path.parse().map_err(|_| "bad path".to_string())?;
        let uri = self.upstream_uri(Some(&pq)).map_err(|e| e.to_string())?;
        let fetch = async {
            let credential = inner
                .profiles
                .authorizer(profile)
                .authorize(Target {
                    method: &Method::GET,
                    uri: &uri,
                })
                .resolve()
                .await
                .map_err(|e| format!("no credential: {e}"))?;
            let mut req = Request::builder()
                .method(Method::GET)
                .uri(uri.clone())
                .header(header::ACCEPT, "application/json")
                .header(header::AUTHORIZATION, credential.authorization)
                .body(super::OutboundBody::empty())
                .map_err(|e| e.to_string())?;
            if let Some(dpop) = credential.dpop {
                req.headers_mut().insert("dpop", dpop);
            }
            let response = inner
                .client
                .request(req)
                .await
                .map_err(|e| format!("the request failed: {}", crate::describe(&e)))?;
            let status = response.status();
            let bytes = read_whole(response.into_body(), cap, inner.response_idle_timeout)
                .await
                .map_err(|_| "the answer could not be read".to_string())?;
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Ok((status, value))
        };
        tokio::time::timeout(inner.timeout, fetch)
            .await
            .map_err(|_| format!("GET {path} timed out"))?
    }

    /// An action on an order or line item of a bound caller: allowed only when Tango says the
    /// item belongs to one of the caller's accounts (and customers).
    async fn check_item_owner(
        &self,
        caller: &Caller,
        profile: usize,
        item: &str,
    ) -> Result<(), ProxyError> {
        let refused = || -> ProxyError {
            caller
                .forbid(format!(
                    "{item} is not an order or line item of caller {}'s accounts",
                    caller.name
                ))
                .into()
        };
        match self.fetch_json(profile, item, MAX_CHECKED_ANSWER).await {
            Ok((StatusCode::OK, value)) => {
                if caller.bindings.check_answer(&value).is_ok() && names_own(caller, &value) {
                    Ok(())
                } else {
                    Err(refused())
                }
            }
            Ok(_) => Err(refused()),
            Err(e) => Err(ProxyError::AnswerUnchecked(format!(
                "whose account {item} belongs to could not be checked: {e}"
            ))),
        }
    }

    /// For a limited caller's money-moving call that is not an order: refused while the ledger
    /// is unreachable (fail closed), unless the caller fails open.
    async fn ledger_reachable(&self, gateway: &Gateway, caller: &Caller) -> Result<(), ProxyError> {
        let day = utc_day(SystemTime::now());
        match gateway.ledger().spent(&caller.name, &day).await {
            Ok(_) => Ok(()),
            Err(_) if caller.spend_limit_fail_open => Ok(()),
            Err(e) => {
                caller.spend_refused();
                Err(ProxyError::SpendLimitUnavailable(format!(
                    "caller {} has a daily spend limit and the spend ledger is unreachable ({e}); \
                     money-moving calls wait until it is back",
                    caller.name
                )))
            }
        }
    }
}

/// What a gateway request needs once it is checked: everything owned, so a money-moving
/// request can finish in its own task.
struct Sent {
    proxy: Proxy,
    gateway: Arc<Gateway>,
    caller: Arc<Caller>,
    method: Method,
    target: http::Uri,
    /// A look-up of one order or line item.
    by_id: bool,
    body: Option<Value>,
    hold: Option<Hold>,
    money_moving: bool,
    inspect_answer: bool,
}

impl Sent {
    /// Forwards, settles the reservation, reads and checks the answer, writes the audit line.
    async fn finish(
        self,
        parts: http::request::Parts,
        uri: http::Uri,
        app_body: AppBody,
        profile: usize,
        remote: SocketAddr,
        request_id: HeaderValue,
    ) -> Result<(Response<ResponseBody>, Option<HeaderValue>), ProxyError> {
        let proxy = &self.proxy;
        let caller = &self.caller;
        let forwarded = proxy
            .forward(parts, uri, app_body, profile, remote, &request_id)
            .await;
        let (response, upstream_id) = match forwarded {
            Ok(f) => f,
            Err(e) => {
                if let Some(hold) = &self.hold {
                    let hold = Hold {
                        day: hold.day.clone(),
                        amount: hold.amount,
                    };
                    proxy.settle(&self.gateway, caller, hold, Settle::from_error(&e));
                }
                self.audit(Some(e.status()), None, None);
                return Err(e);
            }
        };
        let status = response.status();
        if let Some(hold) = &self.hold {
            let hold = Hold {
                day: hold.day.clone(),
                amount: hold.amount,
            };
            proxy.settle(&self.gateway, caller, hold, Settle::from_status(status));
        }
        if !self.inspect_answer && !self.money_moving {
            return Ok((proxy.stream_back(response), upstream_id));
        }
        let (head, body) = response.into_parts();
        let (bytes, answer) = match proxy.read_answer(&head, body).await {
            Ok(a) => a,
            Err(e) => {
                self.audit(Some(status), upstream_id.as_ref(), None);
                return Err(e);
            }
        };
        self.audit(Some(status), upstream_id.as_ref(), answer.as_ref());
        if self.inspect_answer {
            if let Some(v) = &answer {
                caller
                    .bindings
                    .check_answer(v)
                    .map_err(|violation| caller.forbid(violation.message()))?;
                // One order or line item must say whose it is: an answer that names no account
                // could be anyone's.
                if self.by_id && status.is_success() && !names_own(caller, v) {
                    return Err(caller
                        .forbid(
                            "Tango's answer does not name one of this caller's accounts; it was withheld"
                                .into(),
                        )
                        .into());
                }
            }
        }
        let response = Response::from_parts(head, Either::Right(Full::new(bytes)));
        Ok((response, upstream_id))
    }

    fn audit(
        &self,
        status: Option<StatusCode>,
        tango_request_id: Option<&HeaderValue>,
        answer: Option<&Value>,
    ) {
        if self.money_moving {
            audit(
                &self.caller,
                &self.method,
                self.target.path(),
                self.body.as_ref(),
                status,
                tango_request_id,
                answer,
            );
        }
    }
}

/// Headers some servers and proxies read to change a request's path, method or origin: a store
/// may not set them (the proxy adds its own `X-Forwarded-For`).
fn strip_rerouting_headers(headers: &mut http::HeaderMap) {
    const REROUTING: [&str; 9] = [
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-prefix",
        "x-forwarded-path",
        "x-forwarded-method",
        "x-original-method",
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
    ];
    let present: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| REROUTING.contains(&k.as_str()))
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
}

/// Method-override headers and `_method` parameters are refused: a server honouring one would
/// act on a method the gateway did not check.
fn refuse_method_overrides(
    caller: &Caller,
    parts: &http::request::Parts,
) -> Result<(), ProxyError> {
    const OVERRIDES: [&str; 3] = [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ];
    // One pass over the few names present, rather than hashing each override name per request.
    let header = parts
        .headers
        .keys()
        .any(|k| OVERRIDES.contains(&k.as_str()));
    let param = parts.uri.query().is_some_and(|q| {
        q.split(['&', ';']).any(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            let name = name.to_ascii_lowercase();
            name.contains("_method") || name.contains("%5fmethod")
        })
    });
    if header || param {
        return Err(caller
            .forbid(
                "method overrides (X-HTTP-Method-Override, _method) are refused by the gateway"
                    .into(),
            )
            .into());
    }
    Ok(())
}

/// Resources a caller bound to accounts cannot use: platform-wide ones (webhooks, email
/// templates) and ones whose answers name no account (a deposit looked up by id).
fn unattributable(method: &Method, segments: &[&str]) -> Option<&'static str> {
    let what = match segments {
        [raas, v2, what, rest @ ..]
            if raas.eq_ignore_ascii_case("raas") && v2.eq_ignore_ascii_case("v2") =>
        {
            (*what, rest)
        }
        _ => return None,
    };
    match what {
        (w, _) if w.eq_ignore_ascii_case("webhooks") => {
            Some("webhooks are platform-wide: a caller bound to accounts cannot use them")
        }
        (w, _) if w.eq_ignore_ascii_case("digitalTemplates") => {
            Some("email templates are platform-wide: a caller bound to accounts cannot use them")
        }
        (w, [_, ..]) if w.eq_ignore_ascii_case("creditCardDeposits") && method == Method::GET => {
            Some("a deposit's answer names no account: a caller bound to accounts cannot look one up")
        }
        _ => None,
    }
}

/// `/raas/v2/orders/{id}` or `/raas/v2/lineItems/{id}` (and anything under them): the path of
/// the item itself.
fn addressed_item(segments: &[&str]) -> Option<String> {
    match segments {
        [raas, v2, what, id, ..]
            if raas.eq_ignore_ascii_case("raas")
                && v2.eq_ignore_ascii_case("v2")
                && (what.eq_ignore_ascii_case("orders")
                    || what.eq_ignore_ascii_case("lineItems")) =>
        {
            let what = if what.eq_ignore_ascii_case("orders") {
                "orders"
            } else {
                "lineItems"
            };
            Some(format!("/raas/v2/{what}/{id}"))
        }
        _ => None,
    }
}

/// Whether `v` names one of the caller's own accounts (and customers, when bound) as a string.
fn names_own(caller: &Caller, v: &Value) -> bool {
    let has = |suffix: &str, list: &Option<std::collections::BTreeSet<String>>| match list {
        None => true,
        Some(list) => own_value(v, suffix, list),
    };
    has("accountidentifier", &caller.bindings.accounts)
        && has("customeridentifier", &caller.bindings.customers)
}

fn own_value(v: &Value, suffix: &str, list: &std::collections::BTreeSet<String>) -> bool {
    match v {
        Value::Object(map) => map.iter().any(|(k, v)| {
            (identifier_key(k).contains(suffix) && v.as_str().is_some_and(|s| list.contains(s)))
                || own_value(v, suffix, list)
        }),
        Value::Array(items) => items.iter().any(|v| own_value(v, suffix, list)),
        _ => false,
    }
}

/// What becomes of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// The order exists or may exist: the amount stays counted.
    Keep,
    /// Tango refused it, repeated an earlier order, or never saw it: the amount is released.
    Release,
}

impl Settle {
    fn from_status(status: StatusCode) -> Self {
        match status.as_u16() {
            // A new order (201), an accepted asynchronous one (202).
            201 | 202 => Settle::Keep,
            // 200 repeats an order already counted; a 4xx is a refusal.
            200 | 400..=499 => Settle::Release,
            // A 5xx or anything else: the order may exist.
            _ => Settle::Keep,
        }
    }

    fn from_error(e: &ProxyError) -> Self {
        match e {
            // Answered before (or instead of) sending: Tango never saw the order.
            ProxyError::BadRequest(_)
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::RequestTimeout { .. }
            | ProxyError::HeadersTooLarge { .. }
            | ProxyError::TokenUnavailable { .. } => Settle::Release,
            // Sent, and no answer: the order may exist.
            _ => Settle::Keep,
        }
    }
}

/// Paths whose answers name no account or customer: the catalogs, choice products and exchange
/// rates (large lists, passed on unread).
fn names_no_accounts(segments: &[&str]) -> bool {
    matches!(segments, [raas, v2, what, ..]
        if raas.eq_ignore_ascii_case("raas") && v2.eq_ignore_ascii_case("v2")
            && ["catalogs", "choiceProducts", "exchangerates"].iter().any(|w| what.eq_ignore_ascii_case(w)))
}

/// One audit line for a money-moving request: who, with which identity, on which account, how
/// much, and what Tango answered. Never the body itself: an answer carries reward credentials.
fn audit(
    caller: &Caller,
    method: &Method,
    path: &str,
    body: Option<&Value>,
    status: Option<StatusCode>,
    tango_request_id: Option<&HeaderValue>,
    answer: Option<&Value>,
) {
    let field = |v: Option<&Value>, key: &str| -> Option<String> {
        match v?.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let account = field(body, "accountIdentifier")
        .or_else(|| field(body, "sourceAccountIdentifier"))
        .or_else(|| field(answer, "accountIdentifier"));
    let currency = answer
        .and_then(|a| a.get("amountCharged").or_else(|| a.get("denomination")))
        .and_then(|c| c.get("currencyCode"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| field(answer, "currencyCode"))
        .or_else(|| caller.spend_limit.as_ref().map(|l| l.currency.clone()));
    tracing::info!(
        target: "tango_auth_proxy::audit",
        caller = %caller.name,
        profile = %caller.profile,
        method = %method,
        path,
        account_identifier = account.as_deref(),
        customer_identifier = field(body, "customerIdentifier").as_deref(),
        amount = field(body, "amount").as_deref(),
        currency = currency.as_deref(),
        external_ref_id = field(body, "externalRefID").as_deref(),
        utid = field(body, "utid").as_deref(),
        status = status.map(|s| s.as_u16()),
        tango_request_id = tango_request_id.and_then(|v| v.to_str().ok()),
        reference_order_id = field(answer, "referenceOrderID").as_deref(),
        "money-moving request"
    );
}

/// A money-moving body of a bound caller must name what it is bound to.
fn require_named(caller: &Caller, body: Option<&Value>) -> Result<(), ProxyError> {
    let names = |suffix: &str| body.is_some_and(|v| names_key(v, suffix));
    if caller.bindings.accounts.is_some() && !names("accountidentifier") {
        return Err(caller
            .forbid(format!(
                "caller {} may only move money in its own accounts: the body must name an accountIdentifier",
                caller.name
            ))
            .into());
    }
    if caller.bindings.customers.is_some() && !names("customeridentifier") {
        return Err(caller
            .forbid(format!(
                "caller {} may only move money for its own customers: the body must name a customerIdentifier",
                caller.name
            ))
            .into());
    }
    Ok(())
}

/// Whether `v` holds, at any depth, an identifier key for `suffix` with a string value.
fn names_key(v: &Value, suffix: &str) -> bool {
    match v {
        Value::Object(map) => map.iter().any(|(k, v)| {
            (identifier_key(k).contains(suffix) && v.is_string()) || names_key(v, suffix)
        }),
        Value::Array(items) => items.iter().any(|v| names_key(v, suffix)),
        _ => false,
    }
}

/// The minor-unit digits of a caller's limit (2 when it has none).
fn spend_decimals(caller: &Caller) -> u32 {
    caller.spend_limit.as_ref().map_or(2, |l| l.decimals)
}

/// Every object's `utid` with its `currencyCode`, at any depth.
fn collect_currencies(v: &Value, out: &mut HashMap<String, String>) {
    match v {
        Value::Object(map) => {
            if let (Some(Value::String(utid)), Some(Value::String(currency))) =
                (map.get("utid"), map.get("currencyCode"))
            {
                out.insert(utid.clone(), currency.clone());
            }
            map.values().for_each(|v| collect_currencies(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_currencies(v, out)),
        _ => {}
    }
}
