//! Orders and line items: `POST /orders`, `POST /asyncOrders`, `GET /orders[/{id}]` and
//! `GET /lineItems[/{id}]`, and the failures tests can inject into order placement.
//!
//! Orders follow Tango's idempotency rule per account: a new `externalRefID` gives 201 (202 for
//! `asyncOrders`), a repeat on the same account gives 200 with the original order. An order is
//! charged to its account in the account's currency (`amountCharged`, at the fixed rates of
//! [`super::data`]); its `denomination` is in the reward's currency, from the catalog item of its
//! `utid`. Every order has one line item carrying the same reward credentials. Lists answer every
//! order of every account the principal can see, filtered only by the query, as Tango does.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body::Frame;
use serde_json::{json, Value};

use super::data::{catalog_item, cents_value, exchange_rate, CatalogItem, Data, Order};
use super::raas::{
    account_not_found, customer_not_found, field_error, insufficient_funds, json_body,
    optional_str, or_answer, required_amount, required_str,
};
use super::{lock, now, random_hex, tango_error, MockTango, Principal};

/// How the next order placements fail (`MockTango::fail_orders`, `POST /mock/orders/fail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderFailure {
    /// 500 in Tango's error shape; no order is created.
    ServerError,
    /// The order is created, then the answer is held this long before it is sent as usual: the
    /// caller times out not knowing whether the order exists.
    Timeout(Duration),
    /// The order is created, then the connection is closed without an answer (no status line).
    Reset,
    /// 402 insufficient funds; no order is created.
    InsufficientFunds,
    /// 409 `409.002`, an order with this `externalRefID` still being processed; none is created.
    StillProcessing,
}

impl OrderFailure {
    /// How long [`OrderFailure::Timeout`] holds an answer unless told otherwise: past a 30 s
    /// client timeout.
    pub const TIMEOUT_HOLD: Duration = Duration::from_secs(35);
}

/// The queue of failures for the next order placements.
#[derive(Debug, Default)]
pub(super) struct FailurePlan(std::sync::Mutex<VecDeque<OrderFailure>>);

impl FailurePlan {
    pub(super) fn push(&self, failure: OrderFailure, count: usize) {
        lock(&self.0).extend(std::iter::repeat_n(failure, count));
    }

    fn pop(&self) -> Option<OrderFailure> {
        lock(&self.0).pop_front()
    }
}

pub(super) fn routes() -> Router<MockTango> {
    Router::new()
        .route("/raas/v2/orders", get(list_orders).post(create_order))
        .route("/raas/v2/orders/{id}", get(get_order))
        .route("/raas/v2/asyncOrders", post(create_async_order))
        .route("/raas/v2/lineItems", get(list_line_items))
        .route("/raas/v2/lineItems/{id}", get(get_line_item))
}

fn order_not_found(uri: &Uri) -> Response {
    tango_error(
        StatusCode::NOT_FOUND,
        uri.path(),
        "404.003",
        "Order not found",
    )
}

/// Which endpoint placed an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// `POST /orders`: 201 with the finished order.
    Sync,
    /// `POST /asyncOrders`: 202 with the order pending (the mock finishes it at once).
    Async,
}

/// A validated order request.
#[derive(Debug)]
struct OrderRequest<'a> {
    account: &'a str,
    customer: Option<&'a str>,
    item: &'static CatalogItem,
    cents: i64,
    external: Option<&'a str>,
    body: &'a Value,
}

fn parse_order<'a>(uri: &Uri, body: &'a Value) -> Result<OrderRequest<'a>, Box<Response>> {
    let account = required_str(uri, body, "accountIdentifier")?;
    let customer = optional_str(uri, body, "customerIdentifier")?;
    let utid = required_str(uri, body, "utid")?;
    let item = catalog_item(utid).ok_or_else(|| {
        Box::new(field_error(
            uri,
            "utid",
            "is not in the catalog",
            &body["utid"],
            "exists",
        ))
    })?;
    let cents = required_amount(uri, body)?;
    let external = optional_str(uri, body, "externalRefID")?.filter(|e| !e.is_empty());
    if let Some(ext) = external {
        if ext.len() > 100 || !ext.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(Box::new(field_error(
                uri,
                "externalRefID",
                "at most 100 alphanumeric characters",
                &body["externalRefID"],
                "pattern",
            )));
        }
    }
    Ok(OrderRequest {
        account,
        customer,
        item,
        cents,
        external,
        body,
    })
}

/// True when `who` may order from the request's account (and the customer, if named, holds it).
fn may_order(data: &Data, who: &str, req: &OrderRequest<'_>) -> bool {
    data.account(req.account, who)
        .is_some_and(|a| req.customer.is_none_or(|c| c == a.customer))
}

/// Finds the original order for a repeated `externalRefID`, or creates a new one.
fn place(
    data: &mut Data,
    who: &str,
    uri: &Uri,
    req: &OrderRequest<'_>,
    how: Placement,
) -> Result<(StatusCode, Value), Box<Response>> {
    if !may_order(data, who, req) {
        return Err(Box::new(account_not_found(uri)));
    }
    if let Some(original) = req
        .external
        .and_then(|ext| data.order_by_external_ref(req.account, ext))
    {
        return Ok((StatusCode::OK, original.json.clone()));
    }
    let Some(account) = data.account_mut(req.account, who) else {
        return Err(Box::new(account_not_found(uri)));
    };
    let Some(rate) = exchange_rate(req.item.currency, &account.currency) else {
        return Err(Box::new(field_error(
            uri,
            "utid",
            &format!(
                "a {} reward cannot be charged to a {} account",
                req.item.currency, account.currency
            ),
            &req.body["utid"],
            "currency",
        )));
    };
    let charged = (req.cents as f64 * rate).round() as i64;
    if charged > account.balance_cents {
        return Err(Box::new(insufficient_funds(uri)));
    }
    account.balance_cents -= charged;
    let account_currency = account.currency.clone();
    let customer = account.customer.clone();
    data.next_order += 1;
    let n = data.next_order;
    let id = format!("RA260101-{n:05}-{:02}", n % 100);
    let line_item_id = format!("LI260101-{n:05}-{:02}-01", n % 100);
    let claim_code = format!("MOCK-{n:08}-{}", random_hex(4).to_ascii_uppercase());
    // Long and marked, so the log scan of the tests can never mistake a timestamp for one.
    let pin = format!("PIN-{}", random_hex(6).to_ascii_uppercase());
    let echo = |field: &str| req.body.get(field).cloned().unwrap_or(Value::Null);
    let order = json!({
        "referenceOrderID": id,
        "externalRefID": req.external,
        "customerIdentifier": customer,
        "accountIdentifier": req.account,
        "accountNumber": req.account,
        "amountCharged": {
            "value": cents_value(charged),
            "currencyCode": account_currency,
            "exchangeRate": rate,
            "fee": 0.0,
            "total": cents_value(charged),
        },
        "denomination": { "value": cents_value(req.cents), "currencyCode": req.item.currency },
        "utid": req.item.utid,
        "rewardName": req.item.reward_name,
        "sender": echo("sender"),
        "recipient": echo("recipient"),
        "sendEmail": echo("sendEmail"),
        "emailSubject": echo("emailSubject"),
        "message": echo("message"),
        "notes": echo("notes"),
        "status": "COMPLETE",
        "createdAt": now(),
        "reward": {
            "credentials": { "Claim Code": claim_code, "PIN": pin },
            "credentialList": [
                { "label": "Claim Code", "value": claim_code, "type": "text" },
                { "label": "PIN", "value": pin, "type": "text" },
            ],
            "redemptionInstructions": "Redeem at the mock's imaginary shop.",
        },
    });
    data.push_order(Order {
        id,
        line_item_id,
        account: req.account.to_string(),
        customer,
        external_ref: req.external.map(str::to_string),
        json: order.clone(),
    });
    Ok(match how {
        Placement::Sync => (StatusCode::CREATED, order),
        Placement::Async => {
            let mut pending = order;
            pending["status"] = json!("PENDING");
            if let Some(o) = pending.as_object_mut() {
                o.remove("reward");
            }
            (StatusCode::ACCEPTED, pending)
        }
    })
}

/// Validates, applies an injected failure, and places the order.
async fn order_endpoint(
    mock: MockTango,
    who: String,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    how: Placement,
) -> Response {
    let body = or_answer!(json_body(&headers, &uri, &body));
    let req = or_answer!(parse_order(&uri, &body));
    // Only an order the mock would otherwise take consumes an injected failure, so a test's
    // count matches the orders it sends.
    if !may_order(&mock.data(), &who, &req) {
        return account_not_found(&uri);
    }
    let failure = mock.0.order_failures.pop();
    match failure {
        Some(OrderFailure::ServerError) => {
            return tango_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                uri.path(),
                "500.001",
                "Internal server error",
            )
        }
        Some(OrderFailure::InsufficientFunds) => return insufficient_funds(&uri),
        Some(OrderFailure::StillProcessing) => {
            return tango_error(
                StatusCode::CONFLICT,
                uri.path(),
                "409.002",
                "An order with this externalRefID is still being processed; retry in at least 2 seconds",
            )
        }
        Some(OrderFailure::Timeout(_) | OrderFailure::Reset) | None => {}
    }
    let placed = place(&mut mock.data(), &who, &uri, &req, how);
    let (status, order) = or_answer!(placed);
    if status != StatusCode::OK {
        mock.count(|s| s.orders += 1);
    }
    match failure {
        Some(OrderFailure::Timeout(hold)) => tokio::time::sleep(hold).await,
        Some(OrderFailure::Reset) => return reset_connection(),
        _ => {}
    }
    (status, Json(order)).into_response()
}

async fn create_order(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    order_endpoint(mock, who, uri, headers, body, Placement::Sync).await
}

async fn create_async_order(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    order_endpoint(mock, who, uri, headers, body, Placement::Async).await
}

/// A body that fails at once: hyper then closes the connection without writing the response
/// head, so the client sees the connection end with no answer, as after a reset.
#[derive(Debug)]
struct FailingBody;

impl http_body::Body for FailingBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Poll::Ready(Some(Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "mock Tango: connection reset on purpose",
        ))))
    }
}

fn reset_connection() -> Response {
    let mut resp = Response::new(Body::new(FailingBody));
    *resp.status_mut() = StatusCode::CREATED;
    resp
}

async fn get_order(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    Path(id): Path<String>,
) -> Response {
    match mock.data().order(&id, &who) {
        Some(o) => Json(o.json.clone()).into_response(),
        None => order_not_found(&uri),
    }
}

async fn get_line_item(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    Path(id): Path<String>,
) -> Response {
    match mock.data().order_of_line_item(&id, &who) {
        Some(o) => Json(o.line_item_json()).into_response(),
        None => tango_error(
            StatusCode::NOT_FOUND,
            uri.path(),
            "404.005",
            "Line item not found",
        ),
    }
}

/// The most list entries one page may hold.
const MAX_PER_PAGE: usize = 100;
/// Entries per page when the query does not say.
const DEFAULT_PER_PAGE: usize = 10;
/// The highest page number accepted (keeps `page × elementsPerPage` small).
const MAX_PAGE: usize = 1_000_000;

/// A list query: filters and the page asked for.
#[derive(Debug, Default)]
struct ListQuery {
    account: Option<String>,
    customer: Option<String>,
    external: Option<String>,
    per_page: usize,
    page: usize,
}

fn parse_list(
    uri: &Uri,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<ListQuery, Box<Response>> {
    let bad = |field: &str, message: &str, value: &str| {
        Box::new(field_error(uri, field, message, &json!(value), "query"))
    };
    let Ok(Query(pairs)) = query else {
        return Err(Box::new(tango_error(
            StatusCode::BAD_REQUEST,
            uri.path(),
            "400.001",
            "Malformed query string",
        )));
    };
    let mut q = ListQuery {
        per_page: DEFAULT_PER_PAGE,
        ..ListQuery::default()
    };
    let mut seen: Vec<&str> = Vec::new();
    for (key, value) in &pairs {
        let known = [
            "accountIdentifier",
            "customerIdentifier",
            "externalRefID",
            "elementsPerPage",
            "page",
        ];
        let Some(key) = known.iter().find(|k| **k == key.as_str()) else {
            // Tango takes more filters (startDate, endDate...); the mock ignores them.
            continue;
        };
        // Two values for one filter would let a check of the first miss the second.
        if seen.contains(key) {
            return Err(bad(key, "must appear at most once", value));
        }
        seen.push(key);
        match *key {
            "accountIdentifier" => q.account = Some(value.clone()),
            "customerIdentifier" => q.customer = Some(value.clone()),
            "externalRefID" => q.external = Some(value.clone()),
            "elementsPerPage" => {
                q.per_page = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PER_PAGE).contains(n))
                    .ok_or_else(|| {
                        bad(
                            key,
                            &format!("must be a whole number from 1 to {MAX_PER_PAGE}"),
                            value,
                        )
                    })?;
            }
            _ => {
                q.page = value
                    .parse()
                    .ok()
                    .filter(|n| *n <= MAX_PAGE)
                    .ok_or_else(|| {
                        bad(
                            key,
                            &format!("must be a whole number from 0 to {MAX_PAGE}"),
                            value,
                        )
                    })?;
            }
        }
    }
    Ok(q)
}

/// The page of `principal`'s orders matching `q`, or the 404 for a filter naming an account or
/// customer it cannot see.
fn page_of<T>(
    data: &Data,
    who: &str,
    uri: &Uri,
    q: &ListQuery,
    key: &str,
    shape: impl Fn(&Order) -> T,
) -> Result<Value, Box<Response>>
where
    T: Into<Value>,
{
    if let Some(a) = &q.account {
        if data.account(a, who).is_none() {
            return Err(Box::new(account_not_found(uri)));
        }
    }
    if let Some(c) = &q.customer {
        if !data.customer_visible(c, who) {
            return Err(Box::new(customer_not_found(uri)));
        }
    }
    let matching: Vec<&Order> = data
        .visible_orders(who)
        .filter(|o| q.account.as_ref().is_none_or(|a| *a == o.account))
        .filter(|o| q.customer.as_ref().is_none_or(|c| *c == o.customer))
        .filter(|o| q.external.is_none() || q.external == o.external_ref)
        .collect();
    let entries: Vec<Value> = matching
        .iter()
        .skip(q.page * q.per_page)
        .take(q.per_page)
        .map(|o| shape(o).into())
        .collect();
    let mut answer = json!({
        "page": {
            "number": q.page,
            "elementsPerPage": q.per_page,
            "resultCount": entries.len(),
            "totalCount": matching.len(),
        },
    });
    answer[key] = Value::Array(entries);
    Ok(answer)
}

async fn list_orders(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let q = or_answer!(parse_list(&uri, query));
    let page = page_of(&mock.data(), &who, &uri, &q, "orders", |o| o.json.clone());
    Json(or_answer!(page)).into_response()
}

async fn list_line_items(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let q = or_answer!(parse_list(&uri, query));
    let page = page_of(
        &mock.data(),
        &who,
        &uri,
        &q,
        "lineItems",
        Order::line_item_json,
    );
    Json(or_answer!(page)).into_response()
}
