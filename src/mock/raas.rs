//! The RaaS v2 subset the mock serves: catalogs, customers, accounts and orders.
//!
//! Orders follow Tango's idempotency rule: a new `externalRefID` gives 201, a repeat gives 200
//! with the original order. POST bodies must be JSON (a form body gets 415, as Tango answers).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{now, tango_error, tango_error_with, MockTango, SEED_ACCOUNT, SEED_CUSTOMER};

/// The mock's records.
#[derive(Debug, Default)]
pub struct Data {
    customers: BTreeMap<String, Value>,
    accounts: BTreeMap<String, Account>,
    orders: BTreeMap<String, Value>,
    by_external_ref: BTreeMap<String, String>,
    next_order: u64,
}

#[derive(Debug)]
struct Account {
    customer: String,
    display_name: String,
    balance_cents: i64,
    created_at: String,
}

impl Account {
    fn to_json(&self, id: &str) -> Value {
        json!({
            "accountIdentifier": id,
            "accountNumber": id,
            "customerIdentifier": self.customer,
            "displayName": self.display_name,
            "currencyCode": "USD",
            "currentBalance": self.balance_cents as f64 / 100.0,
            "createdAt": self.created_at,
            "status": "ACTIVE",
        })
    }
}

impl Data {
    /// One customer with one account holding $1,000.
    pub fn seeded() -> Self {
        let mut data = Data::default();
        let created = now();
        data.customers.insert(
            SEED_CUSTOMER.into(),
            json!({
                "customerIdentifier": SEED_CUSTOMER,
                "displayName": "Demo Customer",
                "status": "ACTIVE",
                "createdAt": created,
            }),
        );
        data.accounts.insert(
            SEED_ACCOUNT.into(),
            Account {
                customer: SEED_CUSTOMER.into(),
                display_name: "Demo Account".into(),
                balance_cents: 100_000,
                created_at: created,
            },
        );
        data
    }

    fn customer_json(&self, id: &str, customer: &Value) -> Value {
        let accounts: Vec<Value> = self
            .accounts
            .iter()
            .filter(|(_, a)| a.customer == id)
            .map(|(aid, a)| a.to_json(aid))
            .collect();
        let mut c = customer.clone();
        c["accounts"] = Value::Array(accounts);
        c
    }
}

pub(super) fn routes() -> Router<MockTango> {
    Router::new()
        .route("/raas/v2/catalogs", get(catalogs))
        .route(
            "/raas/v2/customers",
            get(list_customers).post(create_customer),
        )
        .route("/raas/v2/accounts/{id}", get(get_account))
        .route("/raas/v2/orders", axum::routing::post(create_order))
        .route("/raas/v2/orders/{id}", get(get_order))
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

async fn catalogs() -> Json<Value> {
    Json(json!({
        "catalogName": "Mock Catalog",
        "brands": [
            {
                "brandKey": "B916708",
                "brandName": "Amazon.com",
                "status": "active",
                "items": [{
                    "utid": "U561593",
                    "rewardName": "Amazon.com Gift Card",
                    "currencyCode": "USD",
                    "valueType": "VARIABLE_VALUE",
                    "rewardType": "gift card",
                    "minValue": 0.01,
                    "maxValue": 2000.0,
                    "countries": ["US"]
                }]
            },
            {
                "brandKey": "B000002",
                "brandName": "Tango Card",
                "status": "active",
                "items": [{
                    "utid": "U157189",
                    "rewardName": "Tango Card",
                    "currencyCode": "USD",
                    "valueType": "FIXED_VALUE",
                    "rewardType": "gift card",
                    "faceValue": 25.0,
                    "countries": ["US"]
                }]
            }
        ]
    }))
}

async fn list_customers(State(mock): State<MockTango>) -> Json<Value> {
    let data = mock.data();
    let list: Vec<Value> = data
        .customers
        .iter()
        .map(|(id, c)| data.customer_json(id, c))
        .collect();
    Json(Value::Array(list))
}

/// Parses a JSON body the way Tango does: form bodies are 415, bad JSON is 400.
fn json_body(headers: &HeaderMap, uri: &Uri, body: &Bytes) -> Result<Value, Box<Response>> {
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

fn field_error(uri: &Uri, field: &str, message: &str, value: &Value) -> Response {
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
            "constraint": "required",
        })],
    )
}

fn str_field<'a>(body: &'a Value, field: &str) -> Option<&'a str> {
    body.get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

async fn create_customer(
    State(mock): State<MockTango>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = match json_body(&headers, &uri, &body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(id) = str_field(&body, "customerIdentifier") else {
        return field_error(
            &uri,
            "customerIdentifier",
            "must not be empty",
            &body["customerIdentifier"],
        );
    };
    let Some(name) = str_field(&body, "displayName") else {
        return field_error(
            &uri,
            "displayName",
            "must not be empty",
            &body["displayName"],
        );
    };
    let mut data = mock.data();
    if data.customers.contains_key(id) {
        return tango_error(
            StatusCode::CONFLICT,
            uri.path(),
            "409.001",
            "A customer with this identifier already exists",
        );
    }
    let customer = json!({
        "customerIdentifier": id,
        "displayName": name,
        "status": "ACTIVE",
        "createdAt": now(),
    });
    data.customers.insert(id.to_string(), customer.clone());
    let shown = data.customer_json(id, &customer);
    (StatusCode::CREATED, Json(shown)).into_response()
}

async fn get_account(State(mock): State<MockTango>, uri: Uri, Path(id): Path<String>) -> Response {
    let data = mock.data();
    match data.accounts.get(&id) {
        Some(a) => Json(a.to_json(&id)).into_response(),
        None => tango_error(
            StatusCode::NOT_FOUND,
            uri.path(),
            "404.002",
            "Account not found",
        ),
    }
}

async fn create_order(
    State(mock): State<MockTango>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = match json_body(&headers, &uri, &body) {
        Ok(b) => b,
        Err(r) => return *r,
    };
    let Some(account_id) = str_field(&body, "accountIdentifier") else {
        return field_error(
            &uri,
            "accountIdentifier",
            "must not be empty",
            &body["accountIdentifier"],
        );
    };
    let Some(utid) = str_field(&body, "utid") else {
        return field_error(&uri, "utid", "must not be empty", &body["utid"]);
    };
    let amount = body.get("amount").and_then(Value::as_f64).unwrap_or(0.0);
    if !(amount > 0.0 && amount.is_finite()) {
        return field_error(&uri, "amount", "must be greater than 0", &body["amount"]);
    }
    let external = str_field(&body, "externalRefID").map(str::to_string);
    if let Some(ext) = &external {
        if ext.len() > 100 || !ext.chars().all(|c| c.is_ascii_alphanumeric()) {
            return field_error(
                &uri,
                "externalRefID",
                "at most 100 alphanumeric characters",
                &body["externalRefID"],
            );
        }
    }

    let mut guard = mock.data();
    let data = &mut *guard;
    if let Some(ext) = &external {
        if let Some(order) = data
            .by_external_ref
            .get(ext)
            .and_then(|id| data.orders.get(id))
        {
            return (StatusCode::OK, Json(order.clone())).into_response();
        }
    }
    let Some(account) = data.accounts.get_mut(account_id) else {
        return tango_error(
            StatusCode::NOT_FOUND,
            uri.path(),
            "404.002",
            "Account not found",
        );
    };
    let cents = (amount * 100.0).round() as i64;
    if cents > account.balance_cents {
        return tango_error(
            StatusCode::PAYMENT_REQUIRED,
            uri.path(),
            "402.001",
            "Insufficient funds in account",
        );
    }
    account.balance_cents -= cents;
    let customer = account.customer.clone();
    data.next_order += 1;
    let id = format!(
        "RA{:06}-{:05}-{:02}",
        260101,
        data.next_order,
        data.next_order % 100
    );
    let order = json!({
        "referenceOrderID": id,
        "externalRefID": external,
        "customerIdentifier": customer,
        "accountIdentifier": account_id,
        "amountCharged": { "value": amount, "currencyCode": "USD", "total": amount },
        "denomination": { "value": amount, "currencyCode": "USD" },
        "utid": utid,
        "rewardName": "Gift Card",
        "status": "COMPLETE",
        "createdAt": now(),
        "reward": { "credentials": { "Claim Code": format!("MOCK-{:08}", data.next_order) } },
    });
    data.orders.insert(id.clone(), order.clone());
    if let Some(ext) = external {
        data.by_external_ref.insert(ext, id);
    }
    drop(guard);
    mock.count(|s| s.orders += 1);
    (StatusCode::CREATED, Json(order)).into_response()
}

async fn get_order(State(mock): State<MockTango>, uri: Uri, Path(id): Path<String>) -> Response {
    let data = mock.data();
    match data.orders.get(&id) {
        Some(o) => Json(o.clone()).into_response(),
        None => tango_error(
            StatusCode::NOT_FOUND,
            uri.path(),
            "404.003",
            "Order not found",
        ),
    }
}
