//! The RaaS v2 subset the mock serves: catalogs, customers, accounts and funding (credit-card
//! deposits, fund transfers); orders and line items live in [`super::orders`].
//!
//! Every handler answers for the principal that sent the request (see [`super::Principal`]):
//! records of another principal answer 404 as if they did not exist. POST bodies must be JSON (a
//! form body gets 415, as Tango answers).

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::data::{amount_cents, catalog_json, cents_value, Account, Customer, MAX_AMOUNT};
use super::{now, orders, tango_error, tango_error_with, MockTango, Principal};

pub(super) fn routes() -> Router<MockTango> {
    Router::new()
        .route("/raas/v2/catalogs", get(catalogs))
        .route(
            "/raas/v2/customers",
            get(list_customers).post(create_customer),
        )
        .route("/raas/v2/customers/{id}", get(get_customer))
        .route(
            "/raas/v2/customers/{id}/accounts",
            get(customer_accounts).post(create_account),
        )
        .route("/raas/v2/accounts", get(list_accounts))
        .route("/raas/v2/accounts/{id}", get(get_account))
        .route("/raas/v2/creditCardDeposits", post(deposit))
        .route("/raas/v2/transferFunds", post(transfer))
        .merge(orders::routes())
        .fallback(not_found)
}

async fn not_found(uri: Uri) -> Response {
    tango_error(
        StatusCode::NOT_FOUND,
        uri.path(),
        "404.001",
        "No handler found for this resource",
    )
}

/// Tango's answer for an account that does not exist or belongs to another principal.
pub(super) fn account_not_found(uri: &Uri) -> Response {
    tango_error(
        StatusCode::NOT_FOUND,
        uri.path(),
        "404.002",
        "Account not found",
    )
}

/// The answer for a customer that does not exist or belongs to another principal.
pub(super) fn customer_not_found(uri: &Uri) -> Response {
    tango_error(
        StatusCode::NOT_FOUND,
        uri.path(),
        "404.004",
        "Customer not found",
    )
}

async fn catalogs() -> Json<Value> {
    Json(catalog_json())
}

/// Parses a JSON body the way Tango does: form bodies are 415, bad JSON is 400.
pub(super) fn json_body(
    headers: &HeaderMap,
    uri: &Uri,
    body: &Bytes,
) -> Result<Value, Box<Response>> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
    if !is_json {
        return Err(Box::new(tango_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            uri.path(),
            "415.001",
            "Content type must be application/json",
        )));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(Box::new(tango_error(
            StatusCode::BAD_REQUEST,
            uri.path(),
            "400.001",
            "Malformed JSON request body",
        ))),
    }
}

/// A 400 naming one invalid field, in Tango's validation shape.
pub(super) fn field_error(
    uri: &Uri,
    field: &str,
    message: &str,
    value: &Value,
    constraint: &str,
) -> Response {
    tango_error_with(
        StatusCode::BAD_REQUEST,
        uri.path(),
        "400.002",
        "Validation failed",
        vec![json!({
            "path": field,
            "i18nKey": "400.002",
            "message": message,
            "invalidValue": value,
            "constraint": constraint,
        })],
    )
}

/// A required, non-empty string field, or the 400 naming it.
pub(super) fn required_str<'a>(
    uri: &Uri,
    body: &'a Value,
    field: &str,
) -> Result<&'a str, Box<Response>> {
    body.get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Box::new(field_error(
                uri,
                field,
                "must not be empty",
                &body[field],
                "required",
            ))
        })
}

/// An optional string field: absent or null is None, any other non-string is a 400.
pub(super) fn optional_str<'a>(
    uri: &Uri,
    body: &'a Value,
    field: &str,
) -> Result<Option<&'a str>, Box<Response>> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(Box::new(field_error(
            uri,
            field,
            "must be a string",
            other,
            "type",
        ))),
    }
}

/// The `amount` field in cents, or the 400 naming it.
pub(super) fn required_amount(uri: &Uri, body: &Value) -> Result<i64, Box<Response>> {
    amount_cents(&body["amount"]).ok_or_else(|| {
        Box::new(field_error(
            uri,
            "amount",
            &format!(
                "must be a number greater than 0 and at most {MAX_AMOUNT}, with at most two decimals"
            ),
            &body["amount"],
            "range",
        ))
    })
}

/// Unwraps a parsed value or returns the prepared error answer.
macro_rules! or_answer {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(resp) => return *resp,
        }
    };
}
pub(super) use or_answer;

async fn list_customers(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
) -> Json<Value> {
    Json(Value::Array(mock.data().customers_json(&who)))
}

async fn get_customer(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    Path(id): Path<String>,
) -> Response {
    match mock.data().customer_json(&id, &who) {
        Some(c) => Json(c).into_response(),
        None => customer_not_found(&uri),
    }
}

async fn customer_accounts(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    Path(id): Path<String>,
) -> Response {
    let data = mock.data();
    if !data.customer_visible(&id, &who) {
        return customer_not_found(&uri);
    }
    Json(Value::Array(data.customer_accounts(&id, &who))).into_response()
}

async fn create_customer(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = or_answer!(json_body(&headers, &uri, &body));
    let id = or_answer!(required_str(&uri, &body, "customerIdentifier"));
    let name = or_answer!(required_str(&uri, &body, "displayName"));
    let mut data = mock.data();
    if data.customers.contains_key(id) {
        return tango_error(
            StatusCode::CONFLICT,
            uri.path(),
            "409.001",
            "A customer with this identifier already exists",
        );
    }
    data.customers.insert(
        id.to_string(),
        Customer {
            display_name: name.to_string(),
            owner: Some(who.clone()),
            created_at: now(),
        },
    );
    match data.customer_json(id, &who) {
        Some(shown) => (StatusCode::CREATED, Json(shown)).into_response(),
        None => customer_not_found(&uri),
    }
}

async fn create_account(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    Path(customer): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = or_answer!(json_body(&headers, &uri, &body));
    let id = or_answer!(required_str(&uri, &body, "accountIdentifier"));
    let name = or_answer!(required_str(&uri, &body, "displayName"));
    let currency = or_answer!(optional_str(&uri, &body, "currencyCode")).unwrap_or("USD");
    if super::data::exchange_rate(currency, "USD").is_none() {
        return field_error(
            &uri,
            "currencyCode",
            "must be USD, EUR, GBP or CAD",
            &body["currencyCode"],
            "currency",
        );
    }
    let mut data = mock.data();
    if !data.customer_visible(&customer, &who) {
        return customer_not_found(&uri);
    }
    if data.accounts.contains_key(id) {
        return tango_error(
            StatusCode::CONFLICT,
            uri.path(),
            "409.001",
            "An account with this identifier already exists",
        );
    }
    let account = Account {
        customer,
        display_name: name.to_string(),
        owner: Some(who),
        currency: currency.to_string(),
        balance_cents: 0,
        created_at: now(),
    };
    let shown = account.to_json(id);
    data.accounts.insert(id.to_string(), account);
    (StatusCode::CREATED, Json(shown)).into_response()
}

async fn list_accounts(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
) -> Json<Value> {
    Json(Value::Array(mock.data().accounts_json(&who)))
}

async fn get_account(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    Path(id): Path<String>,
) -> Response {
    match mock.data().account(&id, &who) {
        Some(a) => Json(a.to_json(&id)).into_response(),
        None => account_not_found(&uri),
    }
}

/// Tango's answer when an account cannot pay.
pub(super) fn insufficient_funds(uri: &Uri) -> Response {
    tango_error(
        StatusCode::PAYMENT_REQUIRED,
        uri.path(),
        "402.001",
        "Insufficient funds in account",
    )
}

/// `POST /creditCardDeposits`: credits a visible account of the named customer.
async fn deposit(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = or_answer!(json_body(&headers, &uri, &body));
    let customer = or_answer!(required_str(&uri, &body, "customerIdentifier"));
    let account_id = or_answer!(required_str(&uri, &body, "accountIdentifier"));
    or_answer!(required_str(&uri, &body, "creditCardToken"));
    let cents = or_answer!(required_amount(&uri, &body));
    let mut guard = mock.data();
    let data = &mut *guard;
    let Some(account) = data
        .account_mut(account_id, &who)
        .filter(|a| a.customer == customer)
    else {
        return account_not_found(&uri);
    };
    let Some(balance) = account.balance_cents.checked_add(cents) else {
        return field_error(
            &uri,
            "amount",
            "would overflow the account balance",
            &body["amount"],
            "range",
        );
    };
    account.balance_cents = balance;
    data.next_funding += 1;
    let id = format!(
        "RF260101-{:05}-{:02}",
        data.next_funding,
        data.next_funding % 100
    );
    let amount = cents_value(cents);
    Json(json!({
        "referenceDepositID": id,
        "customerIdentifier": customer,
        "accountIdentifier": account_id,
        "accountNumber": account_id,
        "amount": amount,
        "amountCharged": amount,
        "feePercent": 0.0,
        "createdDate": now(),
        "status": "SUCCESS",
    }))
    .into_response()
}

/// `POST /transferFunds`: moves money between two visible accounts in the same currency; the
/// source must belong to the named customer.
async fn transfer(
    State(mock): State<MockTango>,
    Extension(Principal(who)): Extension<Principal>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = or_answer!(json_body(&headers, &uri, &body));
    let customer = or_answer!(required_str(&uri, &body, "customerIdentifier"));
    let source = or_answer!(required_str(&uri, &body, "sourceAccountIdentifier"));
    let destination = or_answer!(required_str(&uri, &body, "destinationAccountIdentifier"));
    let cents = or_answer!(required_amount(&uri, &body));
    if source == destination {
        return field_error(
            &uri,
            "destinationAccountIdentifier",
            "must differ from sourceAccountIdentifier",
            &body["destinationAccountIdentifier"],
            "different",
        );
    }
    let mut guard = mock.data();
    let data = &mut *guard;
    let (Some(src), Some(dst)) = (
        data.account(source, &who)
            .filter(|a| a.customer == customer),
        data.account(destination, &who),
    ) else {
        return account_not_found(&uri);
    };
    if src.currency != dst.currency {
        return field_error(
            &uri,
            "destinationAccountIdentifier",
            "must hold the same currency as the source account",
            &body["destinationAccountIdentifier"],
            "currency",
        );
    }
    if src.balance_cents < cents {
        return insufficient_funds(&uri);
    }
    let Some(new_dst) = dst.balance_cents.checked_add(cents) else {
        return field_error(
            &uri,
            "amount",
            "would overflow the destination balance",
            &body["amount"],
            "range",
        );
    };
    if let Some(a) = data.accounts.get_mut(source) {
        a.balance_cents -= cents;
    }
    if let Some(a) = data.accounts.get_mut(destination) {
        a.balance_cents = new_dst;
    }
    data.next_funding += 1;
    let id = format!(
        "RT260101-{:05}-{:02}",
        data.next_funding,
        data.next_funding % 100
    );
    Json(json!({
        "referenceTransferID": id,
        "customerIdentifier": customer,
        "sourceAccountIdentifier": source,
        "destinationAccountIdentifier": destination,
        "amount": cents_value(cents),
        "notes": body.get("notes").cloned().unwrap_or(Value::Null),
        "createdDate": now(),
        "status": "SUCCESS",
    }))
    .into_response()
}
