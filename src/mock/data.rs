//! The mock's records (customers, accounts, orders), who owns them, and its fixed catalog.
//!
//! Every record that can hold money names an owner principal (see the module table in
//! [`super`]); a principal sees its own records and the ownerless ones (the seed customer and
//! account, so the single-identity tests keep working). An order or line item is visible when
//! its account is. Money is kept in cents; amounts cross currencies at fixed rates.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use super::{now, MockAccount, SEED_ACCOUNT, SEED_CUSTOMER};

/// A customer (a group of accounts).
#[derive(Debug)]
pub(super) struct Customer {
    pub(super) display_name: String,
    /// None: every principal sees it.
    pub(super) owner: Option<String>,
    pub(super) created_at: String,
}

/// An account holding money in one currency.
#[derive(Debug)]
pub(super) struct Account {
    pub(super) customer: String,
    pub(super) display_name: String,
    /// None: every principal sees it.
    pub(super) owner: Option<String>,
    pub(super) currency: String,
    pub(super) balance_cents: i64,
    pub(super) created_at: String,
}

impl Account {
    pub(super) fn to_json(&self, id: &str) -> Value {
        json!({
            "accountIdentifier": id,
            "accountNumber": id,
            "customerIdentifier": self.customer,
            "displayName": self.display_name,
            "currencyCode": self.currency,
            "currentBalance": cents_value(self.balance_cents),
            "createdAt": self.created_at,
            "status": "ACTIVE",
        })
    }
}

/// An order as the mock stores it: the JSON Tango answers, and what lookups need.
#[derive(Debug)]
pub(super) struct Order {
    pub(super) id: String,
    pub(super) line_item_id: String,
    pub(super) account: String,
    pub(super) customer: String,
    pub(super) external_ref: Option<String>,
    pub(super) json: Value,
}

impl Order {
    /// The order's one line item, in the shape of `GET /lineItems/{id}`.
    pub(super) fn line_item_json(&self) -> Value {
        let o = &self.json;
        json!({
            "referenceLineItemID": self.line_item_id,
            "referenceOrderID": self.id,
            "externalRefID": o["externalRefID"],
            "accountIdentifier": self.account,
            "accountNumber": self.account,
            "customerIdentifier": self.customer,
            "amountCharged": o["amountCharged"],
            "denomination": o["denomination"],
            "utid": o["utid"],
            "rewardName": o["rewardName"],
            "recipient": o["recipient"],
            "status": o["status"],
            "createdAt": o["createdAt"],
            "reward": o["reward"],
        })
    }
}

/// The mock's records.
#[derive(Debug, Default)]
pub struct Data {
    pub(super) customers: BTreeMap<String, Customer>,
    pub(super) accounts: BTreeMap<String, Account>,
    /// In creation order, which is the order lists answer in.
    pub(super) orders: Vec<Order>,
    pub(super) order_index: HashMap<String, usize>,
    pub(super) line_item_index: HashMap<String, usize>,
    /// (account, externalRefID) to order: idempotency is per account.
    pub(super) by_external_ref: HashMap<(String, String), usize>,
    pub(super) next_order: u64,
    pub(super) next_funding: u64,
}

/// True when a record owned by `owner` is visible to `principal`.
fn visible(owner: Option<&str>, principal: &str) -> bool {
    owner.is_none_or(|o| o == principal)
}

impl Data {
    /// The seed customer with one account holding $1,000 (visible to every principal), then
    /// `accounts` (each creating its customer if needed, owned by the account's owner).
    pub fn seeded(accounts: &[MockAccount]) -> Self {
        let mut data = Data::default();
        let created = now();
        data.customers.insert(
            SEED_CUSTOMER.into(),
            Customer {
                display_name: "Demo Customer".into(),
                owner: None,
                created_at: created.clone(),
            },
        );
        data.accounts.insert(
            SEED_ACCOUNT.into(),
            Account {
                customer: SEED_CUSTOMER.into(),
                display_name: "Demo Account".into(),
                owner: None,
                currency: "USD".into(),
                balance_cents: 100_000,
                created_at: created.clone(),
            },
        );
        for a in accounts {
            if data.accounts.contains_key(&a.account) {
                // The first seed of an identifier wins; a later one would silently change
                // who owns the money, so it is left out and said so.
                tracing::warn!(account = %a.account, "mock Tango: duplicate seed account ignored");
                continue;
            }
            data.customers
                .entry(a.customer.clone())
                .or_insert_with(|| Customer {
                    display_name: a.customer.clone(),
                    owner: Some(a.owner.clone()),
                    created_at: created.clone(),
                });
            data.accounts.insert(
                a.account.clone(),
                Account {
                    customer: a.customer.clone(),
                    display_name: a.account.clone(),
                    owner: Some(a.owner.clone()),
                    currency: a.currency.clone(),
                    balance_cents: a.balance_cents,
                    created_at: created.clone(),
                },
            );
        }
        data
    }

    /// The account `id` if `principal` may see it.
    pub(super) fn account(&self, id: &str, principal: &str) -> Option<&Account> {
        self.accounts
            .get(id)
            .filter(|a| visible(a.owner.as_deref(), principal))
    }

    /// The account `id`, for changing, if `principal` may see it.
    pub(super) fn account_mut(&mut self, id: &str, principal: &str) -> Option<&mut Account> {
        self.accounts
            .get_mut(id)
            .filter(|a| visible(a.owner.as_deref(), principal))
    }

    /// A principal sees a customer it owns, an ownerless one, or one holding an account it owns.
    pub(super) fn customer_visible(&self, id: &str, principal: &str) -> bool {
        let Some(c) = self.customers.get(id) else {
            return false;
        };
        visible(c.owner.as_deref(), principal)
            || self
                .accounts
                .values()
                .any(|a| a.customer == id && a.owner.as_deref() == Some(principal))
    }

    /// The accounts of customer `id` that `principal` may see.
    pub(super) fn customer_accounts(&self, id: &str, principal: &str) -> Vec<Value> {
        self.accounts
            .iter()
            .filter(|(_, a)| a.customer == id && visible(a.owner.as_deref(), principal))
            .map(|(aid, a)| a.to_json(aid))
            .collect()
    }

    /// Customer `id` with the accounts `principal` may see, if it may see the customer.
    pub(super) fn customer_json(&self, id: &str, principal: &str) -> Option<Value> {
        if !self.customer_visible(id, principal) {
            return None;
        }
        let c = self.customers.get(id)?;
        Some(json!({
            "customerIdentifier": id,
            "displayName": c.display_name,
            "status": "ACTIVE",
            "createdAt": c.created_at,
            "accounts": self.customer_accounts(id, principal),
        }))
    }

    /// Every customer `principal` may see.
    pub(super) fn customers_json(&self, principal: &str) -> Vec<Value> {
        self.customers
            .keys()
            .filter_map(|id| self.customer_json(id, principal))
            .collect()
    }

    /// Every account `principal` may see.
    pub(super) fn accounts_json(&self, principal: &str) -> Vec<Value> {
        self.accounts
            .iter()
            .filter(|(_, a)| visible(a.owner.as_deref(), principal))
            .map(|(id, a)| a.to_json(id))
            .collect()
    }

    /// Order `id` if `principal` may see its account.
    pub(super) fn order(&self, id: &str, principal: &str) -> Option<&Order> {
        let o = self.orders.get(*self.order_index.get(id)?)?;
        self.account(&o.account, principal).map(|_| o)
    }

    /// The order holding line item `id` if `principal` may see its account.
    pub(super) fn order_of_line_item(&self, id: &str, principal: &str) -> Option<&Order> {
        let o = self.orders.get(*self.line_item_index.get(id)?)?;
        self.account(&o.account, principal).map(|_| o)
    }

    /// Every order `principal` may see, oldest first.
    pub(super) fn visible_orders<'a>(
        &'a self,
        principal: &'a str,
    ) -> impl Iterator<Item = &'a Order> + 'a {
        self.orders
            .iter()
            .filter(move |o| self.account(&o.account, principal).is_some())
    }

    /// The order placed on `account` with `external_ref`, if any.
    pub(super) fn order_by_external_ref(
        &self,
        account: &str,
        external_ref: &str,
    ) -> Option<&Order> {
        let idx = self
            .by_external_ref
            .get(&(account.to_string(), external_ref.to_string()))?;
        self.orders.get(*idx)
    }

    /// Stores a new order.
    pub(super) fn push_order(&mut self, order: Order) {
        let idx = self.orders.len();
        self.order_index.insert(order.id.clone(), idx);
        self.line_item_index.insert(order.line_item_id.clone(), idx);
        if let Some(ext) = &order.external_ref {
            self.by_external_ref
                .insert((order.account.clone(), ext.clone()), idx);
        }
        self.orders.push(order);
    }
}

/// One reward in the mock's catalog.
#[derive(Debug)]
pub(super) struct CatalogItem {
    pub(super) brand_key: &'static str,
    pub(super) brand_name: &'static str,
    pub(super) utid: &'static str,
    pub(super) reward_name: &'static str,
    pub(super) currency: &'static str,
    /// Some: a fixed face value; None: any value from 0.01 to 2,000.
    pub(super) face_value: Option<f64>,
    pub(super) country: &'static str,
}

/// The catalog: an order's reward currency comes from its `utid` here.
pub(super) const CATALOG: &[CatalogItem] = &[
    CatalogItem {
        brand_key: "B000001",
        brand_name: "Mock Gift Card",
        utid: "U000001",
        reward_name: "Mock Gift Card (USD)",
        currency: "USD",
        face_value: None,
        country: "US",
    },
    CatalogItem {
        brand_key: "B000001",
        brand_name: "Mock Gift Card",
        utid: "U000002",
        reward_name: "Mock Gift Card (EUR)",
        currency: "EUR",
        face_value: None,
        country: "DE",
    },
    CatalogItem {
        brand_key: "B916708",
        brand_name: "Amazon.com",
        utid: "U561593",
        reward_name: "Amazon.com Gift Card",
        currency: "USD",
        face_value: None,
        country: "US",
    },
    CatalogItem {
        brand_key: "B000002",
        brand_name: "Tango Card",
        utid: "U157189",
        reward_name: "Tango Card",
        currency: "USD",
        face_value: Some(25.0),
        country: "US",
    },
];

/// The catalog item with `utid`.
pub(super) fn catalog_item(utid: &str) -> Option<&'static CatalogItem> {
    CATALOG.iter().find(|i| i.utid == utid)
}

/// The catalog in the shape of `GET /catalogs`: brands with their items.
pub(super) fn catalog_json() -> Value {
    let mut brands: Vec<Value> = Vec::new();
    for item in CATALOG {
        let mut entry = json!({
            "utid": item.utid,
            "rewardName": item.reward_name,
            "currencyCode": item.currency,
            "rewardType": "gift card",
            "status": "active",
            "countries": [item.country],
        });
        match item.face_value {
            Some(v) => {
                entry["valueType"] = json!("FIXED_VALUE");
                entry["faceValue"] = json!(v);
            }
            None => {
                entry["valueType"] = json!("VARIABLE_VALUE");
                entry["minValue"] = json!(0.01);
                entry["maxValue"] = json!(2000.0);
            }
        }
        match brands.iter_mut().find(|b| b["brandKey"] == item.brand_key) {
            Some(brand) => {
                if let Some(items) = brand["items"].as_array_mut() {
                    items.push(entry);
                }
            }
            None => brands.push(json!({
                "brandKey": item.brand_key,
                "brandName": item.brand_name,
                "status": "active",
                "items": [entry],
            })),
        }
    }
    json!({ "catalogName": "Mock Catalog", "brands": brands })
}

/// US dollars per unit of `currency`, fixed so tests can predict conversions.
fn usd_per_unit(currency: &str) -> Option<f64> {
    match currency {
        "USD" => Some(1.0),
        "EUR" => Some(1.1),
        "GBP" => Some(1.25),
        "CAD" => Some(0.75),
        _ => None,
    }
}

/// The rate from `from` to `to` (units of `to` per unit of `from`), if both are known.
pub(super) fn exchange_rate(from: &str, to: &str) -> Option<f64> {
    if from == to {
        return Some(1.0);
    }
    Some(usd_per_unit(from)? / usd_per_unit(to)?)
}

/// Cents as Tango's decimal amount.
pub(super) fn cents_value(cents: i64) -> f64 {
    cents as f64 / 100.0
}

/// The largest amount one request may move (a sanity cap on untrusted numbers).
pub(super) const MAX_AMOUNT: f64 = 1_000_000_000.0;

/// A positive amount no larger than [`MAX_AMOUNT`] with at most two decimals, in cents.
pub(super) fn amount_cents(value: &Value) -> Option<i64> {
    let amount = value.as_f64()?;
    if !(amount > 0.0 && amount <= MAX_AMOUNT) {
        return None;
    }
    let cents = (amount * 100.0).round();
    // 10.005 is not an amount of money.
    if (cents - amount * 100.0).abs() > 1e-6 {
        return None;
    }
    Some(cents as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(owner: &str, customer: &str, account: &str) -> MockAccount {
        MockAccount {
            owner: owner.into(),
            customer: customer.into(),
            account: account.into(),
            balance_cents: 100,
            currency: "USD".into(),
        }
    }

    #[test]
    fn a_principal_sees_its_own_and_ownerless_records_only() {
        let data = Data::seeded(&[seed("a", "CA", "AA"), seed("b", "CB", "AB")]);
        assert!(data.account("AA", "a").is_some());
        assert!(data.account("AB", "a").is_none());
        assert!(data.account(SEED_ACCOUNT, "a").is_some());
        assert!(data.account(SEED_ACCOUNT, "anyone").is_some());
        assert!(data.customer_visible("CA", "a"));
        assert!(!data.customer_visible("CB", "a"));
        assert!(data.customer_visible(SEED_CUSTOMER, "b"));
        assert!(!data.customer_visible("nope", "a"));
    }

    #[test]
    fn an_account_under_another_principals_customer_shows_that_customer_with_only_it() {
        let data = Data::seeded(&[seed("a", "CA", "AA"), seed("b", "CA", "AB")]);
        assert!(data.customer_visible("CA", "b"));
        let shown = data.customer_json("CA", "b").unwrap();
        assert_eq!(shown["accounts"].as_array().unwrap().len(), 1);
        assert_eq!(shown["accounts"][0]["accountIdentifier"], "AB");
        assert!(data.customer_json("CA", "c").is_none());
    }

    #[test]
    fn a_repeated_seed_account_keeps_its_first_owner() {
        let data = Data::seeded(&[seed("a", "CA", "AA"), seed("b", "CB", "AA")]);
        assert!(data.account("AA", "a").is_some());
        assert!(data.account("AA", "b").is_none());
        // A seed cannot take over the ownerless seed account either.
        let data = Data::seeded(&[seed("a", "CA", SEED_ACCOUNT)]);
        assert!(data.account(SEED_ACCOUNT, "b").is_some());
    }

    #[test]
    fn amounts_are_positive_capped_and_whole_cents() {
        assert_eq!(amount_cents(&json!(10)), Some(1000));
        assert_eq!(amount_cents(&json!(0.1)), Some(10));
        assert_eq!(amount_cents(&json!(19.99)), Some(1999));
        assert_eq!(amount_cents(&json!(MAX_AMOUNT)), Some(100_000_000_000));
        for bad in [
            json!(0),
            json!(-1),
            json!(10.005),
            json!(MAX_AMOUNT * 2.0),
            json!(1e300),
            json!("10"),
            Value::Null,
        ] {
            assert_eq!(amount_cents(&bad), None, "{bad}");
        }
    }

    #[test]
    fn every_catalog_currency_converts_to_every_account_currency() {
        for item in CATALOG {
            for account in ["USD", "EUR", "GBP", "CAD"] {
                assert!(exchange_rate(item.currency, account).is_some());
            }
        }
        assert_eq!(exchange_rate("EUR", "USD"), Some(1.1));
        assert_eq!(exchange_rate("USD", "USD"), Some(1.0));
        assert_eq!(exchange_rate("USD", "XXX"), None);
        assert_eq!(catalog_item("U000002").map(|i| i.currency), Some("EUR"));
        assert!(catalog_item("U000003").is_none());
    }
}
