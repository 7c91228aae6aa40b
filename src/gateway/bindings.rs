//! Tango-aware bindings: which `accountIdentifier` and `customerIdentifier` values a caller may
//! name — in request paths, query strings and JSON bodies, and in the answers Tango sends back —
//! plus the facts about a request the spend and idempotency checks need (is it money-moving, is
//! it an order, what does its body say).
//!
//! Every check errs toward refusing: identifiers compare exactly, while the names around them
//! (path collections, query parameter names, JSON keys) compare case-insensitively and by suffix,
//! so any spelling a lenient server might bind to an identifier is checked as one. A value the
//! gateway cannot read (not a string, undecodable, empty) is refused, never skipped.

use std::collections::BTreeSet;

use http::Method;
use serde_json::{Map, Value};

use super::path::CleanPath;

/// What a caller may name: None = unbound (anything), Some(set) = only these.
#[derive(Debug, Clone, Default)]
pub struct Bindings {
    /// The `accountIdentifier` values the caller may name.
    pub accounts: Option<BTreeSet<String>>,
    /// The `customerIdentifier` values the caller may name.
    pub customers: Option<BTreeSet<String>>,
}

/// Which of a caller's lists a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// `accounts`: `accountIdentifier` values.
    Account,
    /// `customers`: `customerIdentifier` values.
    Customer,
}

impl Binding {
    const BOTH: [Binding; 2] = [Binding::Account, Binding::Customer];

    /// The config key of the list.
    fn rule(self) -> &'static str {
        match self {
            Binding::Account => "accounts",
            Binding::Customer => "customers",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Binding::Account => "account",
            Binding::Customer => "customer",
        }
    }

    /// How a parameter or key naming this binding ends, folded (see [`fold_key`]).
    fn key_suffix(self) -> &'static str {
        match self {
            Binding::Account => "accountidentifier",
            Binding::Customer => "customeridentifier",
        }
    }
}

/// Where in a request an identifier was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A path segment after `accounts` or `customers`.
    Path,
    /// A query parameter.
    Query,
    /// A key of the JSON request body.
    Body,
}

impl Place {
    fn describe(self) -> &'static str {
        match self {
            Place::Path => "the path",
            Place::Query => "the query string",
            Place::Body => "the request body",
        }
    }
}

/// A request or answer that names what the caller may not (403 `caller_forbidden`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// The request names an identifier outside the caller's list; `value` is what the caller sent
    /// (cut to 64 characters).
    NotListed {
        /// Which list.
        binding: Binding,
        /// Where in the request.
        place: Place,
        /// The caller's own value.
        value: String,
    },
    /// The request carries an identifier the gateway cannot check.
    Unreadable {
        /// Which list.
        binding: Binding,
        /// Where in the request.
        place: Place,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Tango's answer names an identifier outside the caller's list, or one that cannot be
    /// checked. The identifier is deliberately not kept: it belongs to another store.
    Answer {
        /// Which list.
        binding: Binding,
        /// What is wrong, without the value.
        problem: AnswerProblem,
    },
}

/// What is wrong with an identifier in an answer (the identifier itself is not kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerProblem {
    /// It is not in the caller's list.
    NotListed,
    /// It is not a string, so it cannot be checked.
    NotAString,
}

impl Violation {
    /// Message for the caller (403 caller_forbidden). For request-side violations it may quote the
    /// value the caller itself sent; for answer violations it does not reveal the other store's
    /// identifier.
    pub fn message(&self) -> String {
        match self {
            Violation::NotListed {
                binding,
                place,
                value,
            } => format!(
                "{} names {} {value:?}, which is not in this caller's {} list",
                place.describe(),
                binding.noun(),
                binding.rule()
            ),
            Violation::Unreadable {
                binding,
                place,
                reason,
            } => format!(
                "{} carries {} {} identifier that cannot be checked: {reason}",
                place.describe(),
                article(binding.noun()),
                binding.noun()
            ),
            Violation::Answer {
                binding,
                problem: AnswerProblem::NotListed,
            } => format!(
                "Tango's answer names {} {} outside this caller's {} list; it was withheld",
                article(binding.noun()),
                binding.noun(),
                binding.rule()
            ),
            Violation::Answer {
                binding,
                problem: AnswerProblem::NotAString,
            } => format!(
                "Tango's answer carries {} {} identifier that is not a string; it was withheld",
                article(binding.noun()),
                binding.noun()
            ),
        }
    }

    /// The binding that was violated: "accounts" | "customers" (for metrics and logs).
    pub fn rule(&self) -> &'static str {
        match self {
            Violation::NotListed { binding, .. }
            | Violation::Unreadable { binding, .. }
            | Violation::Answer { binding, .. } => binding.rule(),
        }
    }
}

fn article(noun: &str) -> &'static str {
    if noun.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// The longest value a violation keeps and quotes.
const MAX_QUOTED_VALUE: usize = 64;

fn shortened(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED_VALUE) {
        Some((cut, _)) => format!("{}...", &value[..cut]),
        None => value.to_owned(),
    }
}

/// A key or parameter name as a case-insensitive binder would see it: ASCII letters lowercased,
/// and a non-ASCII character whose case mapping is an ASCII letter (`ſ` → s, Kelvin `K` → k,
/// `ı` and `İ` → i) folded to that letter, so no look-alike spelling escapes a check.
pub(crate) fn fold_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for c in key.chars() {
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
            continue;
        }
        let ascii = |mapped: &mut dyn Iterator<Item = char>| -> Option<char> {
            // U+0307 is the dot `İ` keeps when lowercased.
            let letters: Vec<char> = mapped.filter(|m| *m != '\u{307}').collect();
            match letters.as_slice() {
                [one] if one.is_ascii_alphabetic() => Some(one.to_ascii_lowercase()),
                _ => None,
            }
        };
        match ascii(&mut c.to_lowercase()).or_else(|| ascii(&mut c.to_uppercase())) {
            Some(letter) => out.push(letter),
            None => out.extend(c.to_lowercase()),
        }
    }
    out
}

/// True if `segment` names the collection `name`: letter case ignored, and a `.suffix` too (some
/// Java routers once matched `/orders.json` as `/orders`).
fn segment_is(segment: &str, name: &str) -> bool {
    let base = segment.split_once('.').map_or(segment, |(base, _)| base);
    base.eq_ignore_ascii_case(name)
}

/// What was wrong with one identifier value.
enum Problem {
    NotListed(String),
    NotAString,
    Unreadable(&'static str),
}

impl Bindings {
    fn list(&self, binding: Binding) -> Option<&BTreeSet<String>> {
        match binding {
            Binding::Account => self.accounts.as_ref(),
            Binding::Customer => self.customers.as_ref(),
        }
    }

    /// Any list set.
    pub fn is_bound(&self) -> bool {
        self.accounts.is_some() || self.customers.is_some()
    }

    fn check_str(&self, binding: Binding, value: &str) -> Result<(), Problem> {
        match self.list(binding) {
            Some(list) if !list.contains(value) => Err(Problem::NotListed(shortened(value))),
            _ => Ok(()),
        }
    }

    /// A JSON value under an identifier key: a string, `null` (absent), or a list of those
    /// (each one checked); anything else cannot be checked and is refused.
    fn check_value(&self, binding: Binding, value: &Value) -> Result<(), Problem> {
        match value {
            Value::Null => Ok(()),
            Value::String(s) => self.check_str(binding, s),
            Value::Array(items) => items.iter().try_for_each(|item| match item {
                Value::Null => Ok(()),
                Value::String(s) => self.check_str(binding, s),
                _ => Err(Problem::NotAString),
            }),
            _ => Err(Problem::NotAString),
        }
    }

    fn request_violation(binding: Binding, place: Place, problem: Problem) -> Violation {
        match problem {
            Problem::NotListed(value) => Violation::NotListed {
                binding,
                place,
                value,
            },
            Problem::NotAString => Violation::Unreadable {
                binding,
                place,
                reason: "its value must be a string",
            },
            Problem::Unreadable(reason) => Violation::Unreadable {
                binding,
                place,
                reason,
            },
        }
    }

    /// Checks the identifiers a path names: the segment after `accounts` is an account, the one
    /// after `customers` a customer. Bare list paths pass (their answers are checked).
    pub fn check_path(&self, path: &CleanPath<'_>) -> Result<(), Violation> {
        // Every `accounts`/`customers` segment is looked at, wherever it is: checking a segment
        // Tango would not route only refuses more.
        for pair in path.segments().windows(2) {
            for binding in Binding::BOTH {
                if segment_is(pair[0], binding.rule()) {
                    self.check_str(binding, pair[1])
                        .map_err(|p| Self::request_violation(binding, Place::Path, p))?;
                }
            }
        }
        Ok(())
    }

    /// Checks every query parameter naming an account or customer (`accountIdentifier`,
    /// `sourceAccountIdentifier`, ... in any letter case, every repetition).
    pub fn check_query(&self, query: Option<&str>) -> Result<(), Violation> {
        let Some(query) = query else {
            return Ok(());
        };
        if !self.is_bound() {
            return Ok(());
        }
        for pair in query.split('&') {
            self.check_query_pair(pair)?;
            // Some servers also split on ';': check that reading as well.
            if pair.contains(';') {
                for part in pair.split(';') {
                    self.check_query_pair(part)?;
                }
            }
        }
        Ok(())
    }

    fn check_query_pair(&self, pair: &str) -> Result<(), Violation> {
        if pair.is_empty() {
            return Ok(());
        }
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let first_bound = if self.accounts.is_some() {
            Binding::Account
        } else {
            Binding::Customer
        };
        let named = match query_name_binds(raw_name) {
            Ok(named) => named,
            Err(reason) => {
                return Err(Violation::Unreadable {
                    binding: first_bound,
                    place: Place::Query,
                    reason,
                })
            }
        };
        for binding in Binding::BOTH {
            if !named.contains(&binding) || self.list(binding).is_none() {
                continue;
            }
            let problem = match percent_decode(raw_value) {
                Err(reason) => Err(Problem::Unreadable(reason)),
                Ok(value) if value.is_empty() => Err(Problem::Unreadable("its value is empty")),
                Ok(value) => self.check_str(binding, &value),
            };
            problem.map_err(|p| Self::request_violation(binding, Place::Query, p))?;
        }
        Ok(())
    }

    /// Checks every key naming an account or customer in a JSON request body, at any depth.
    pub fn check_body(&self, body: &Value) -> Result<(), Violation> {
        self.walk(body)
            .map_err(|(binding, p)| Self::request_violation(binding, Place::Body, p))
    }

    /// Checks every key naming an account or customer in Tango's JSON answer, at any depth.
    pub fn check_answer(&self, body: &Value) -> Result<(), Violation> {
        self.walk(body)
            .map_err(|(binding, problem)| Violation::Answer {
                binding,
                problem: match problem {
                    Problem::NotListed(_) => AnswerProblem::NotListed,
                    Problem::NotAString | Problem::Unreadable(_) => AnswerProblem::NotAString,
                },
            })
    }

    /// Visits every object in `body` (an explicit stack: no recursion, whatever the depth) and
    /// checks the values of keys ending in `accountIdentifier` / `customerIdentifier`.
    fn walk(&self, body: &Value) -> Result<(), (Binding, Problem)> {
        if !self.is_bound() {
            return Ok(());
        }
        let mut stack = vec![body];
        while let Some(value) = stack.pop() {
            match value {
                Value::Array(items) => stack.extend(items),
                Value::Object(map) => {
                    for (key, value) in map {
                        let folded = identifier_key(key);
                        for binding in Binding::BOTH {
                            if self.list(binding).is_some() && folded.contains(binding.key_suffix())
                            {
                                self.check_value(binding, value).map_err(|p| (binding, p))?;
                            }
                        }
                        stack.push(value);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A key as an identifier check sees it: folded like [`fold_key`], then only its letters and
/// digits, so `account_identifier`, `Account-Identifier` and `accountIdentifiers` all name an
/// account (`contains`, not `ends_with`, at the call sites).
pub(crate) fn identifier_key(key: &str) -> String {
    fold_key(key)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect()
}

/// Which bindings a query parameter name names. The name is percent- and `+`-decoded, then
/// decoded again while escapes remain (checking a double-encoded spelling only refuses more).
fn query_name_binds(raw: &str) -> Result<Vec<Binding>, &'static str> {
    let mut named = Vec::new();
    let mut name =
        percent_decode(raw).map_err(|_| "a parameter name is not valid percent-encoding")?;
    for round in 0..3 {
        let folded = identifier_key(&name);
        for binding in Binding::BOTH {
            // `contains`, not `ends_with`: binders accept `accountIdentifier[0]` and the like.
            if folded.contains(binding.key_suffix()) && !named.contains(&binding) {
                named.push(binding);
            }
        }
        if round == 2 || !name.contains('%') {
            break;
        }
        match percent_decode(&name) {
            Ok(again) => name = again,
            Err(_) => break,
        }
    }
    Ok(named)
}

/// Decodes `%XX` escapes and `+` (a space in form encoding) into UTF-8 text.
fn percent_decode(raw: &str) -> Result<String, &'static str> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .filter(|h| h.bytes().all(|d| d.is_ascii_hexdigit()))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("its value is not valid percent-encoding")?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "its value is not UTF-8 once decoded")
}

/// Facts the gateway needs from an order-like request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderFacts {
    /// `externalRefID`, when the body carries exactly one non-empty string for it.
    pub external_ref_id: Option<String>,
    /// `amount` in minor units; `Ok(None)` when absent or null, `Err` when it cannot be used.
    pub amount: Result<Option<u64>, String>,
    /// `utid`, when the body carries exactly one non-empty string for it.
    pub utid: Option<String>,
    /// `accountIdentifier`, when the body carries exactly one non-empty string for it.
    pub account: Option<String>,
}

/// The most an order may be for, in minor units (ten billion dollars in cents).
pub const MAX_AMOUNT_MINOR: u64 = 1_000_000_000_000;

/// Reads the top-level `externalRefID`, `amount`, `utid` and `accountIdentifier` of a body.
/// `decimals` is the currency's number of decimal places (2 for USD).
///
/// Keys match in any letter case (a case-insensitive binder would read them); when several
/// spellings carry different values the field counts as absent (for `amount`: an error), because
/// which one Tango reads cannot be known.
pub fn order_facts(body: &Value, decimals: u32) -> OrderFacts {
    let empty = Map::new();
    let object = body.as_object().unwrap_or(&empty);
    OrderFacts {
        // Exactly Tango's spelling: a binder matching names by case would ignore any other,
        // and the order would go without its idempotency key.
        external_ref_id: object
            .get("externalRefID")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && spellings(object, "externalrefid").len() == 1)
            .map(str::to_owned),
        amount: amount(object, decimals),
        utid: single_string(object, "utid"),
        account: single_string(object, "accountidentifier"),
    }
}

/// The non-null values of the keys of `object` that fold to `name`.
fn spellings<'v>(object: &'v Map<String, Value>, name: &str) -> Vec<&'v Value> {
    object
        .iter()
        .filter(|(key, value)| !value.is_null() && fold_key(key) == name)
        .map(|(_, value)| value)
        .collect()
}

fn single_string(object: &Map<String, Value>, name: &str) -> Option<String> {
    let values = spellings(object, name);
    let first = values.first()?.as_str()?;
    let agreed = !first.is_empty() && values.iter().all(|v| v.as_str() == Some(first));
    agreed.then(|| first.to_owned())
}

fn amount(object: &Map<String, Value>, decimals: u32) -> Result<Option<u64>, String> {
    match spellings(object, "amount").as_slice() {
        [] => Ok(None),
        [one] => amount_in_minor_units(one, decimals).map(Some),
        _ => Err("amount appears more than once, in different letter cases".to_owned()),
    }
}

/// A JSON amount in minor units: a number, above zero, with at most `decimals` decimal places, at
/// most [`MAX_AMOUNT_MINOR`].
pub fn amount_in_minor_units(value: &Value, decimals: u32) -> Result<u64, String> {
    let too_large = || format!("amount is too large (at most {MAX_AMOUNT_MINOR} minor units)");
    let scale = 10u64
        .checked_pow(decimals)
        .filter(|s| *s <= MAX_AMOUNT_MINOR)
        .ok_or_else(|| format!("a currency with {decimals} decimal places is not supported"))?;
    let number = match value {
        Value::Number(n) => n,
        Value::String(_) => {
            return Err("amount must be a JSON number, not a string".to_owned());
        }
        _ => return Err("amount must be a JSON number".to_owned()),
    };
    let minor = if let Some(units) = number.as_u64() {
        units.checked_mul(scale).ok_or_else(too_large)?
    } else if number.is_i64() {
        return Err("amount must be greater than zero".to_owned());
    } else {
        let float = number.as_f64().unwrap_or(0.0);
        if float.is_nan() || float <= 0.0 {
            return Err("amount must be greater than zero".to_owned());
        }
        // Rust prints an f64 as the shortest decimal that reads back as the same f64, never in
        // exponent form. For any amount within the cap that is the decimal the body spelled
        // (normalised), so its digits can be counted exactly, with no rounding tolerance.
        let text = float.to_string();
        let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
        if fraction.len() > decimals as usize {
            return Err(format!("amount has more than {decimals} decimal places"));
        }
        if whole.len() > 13 {
            return Err(too_large());
        }
        let whole: u64 = whole.parse().map_err(|_| too_large())?;
        let padded = format!("{fraction:0<width$}", width = decimals as usize);
        let fraction: u64 = if padded.is_empty() {
            0
        } else {
            padded.parse().map_err(|_| too_large())?
        };
        whole
            .checked_mul(scale)
            .and_then(|w| w.checked_add(fraction))
            .ok_or_else(too_large)?
    };
    if minor == 0 {
        return Err("amount must be greater than zero".to_owned());
    }
    if minor > MAX_AMOUNT_MINOR {
        return Err(too_large());
    }
    Ok(minor)
}

fn is_post(method: &Method) -> bool {
    // Case-insensitively: treating an odd spelling as a POST only applies more checks.
    method.as_str().eq_ignore_ascii_case("POST")
}

/// POSTs that move money: orders, asyncOrders, creditCardDeposits, transferFunds,
/// lineItems/{id}/reissue|cancel. Segment names compare case-insensitively (misclassifying a case
/// variant as money-moving is the safe direction).
pub fn is_money_moving(method: &Method, path: &CleanPath<'_>) -> bool {
    if !is_post(method) {
        return false;
    }
    let segments = path.segments();
    let Some(last) = segments.last() else {
        return false;
    };
    let collection = [
        "orders",
        "asyncOrders",
        "creditCardDeposits",
        "transferFunds",
    ]
    .iter()
    .any(|name| segment_is(last, name));
    let line_item_action = segments.len() >= 3
        && segment_is(segments[segments.len() - 3], "lineItems")
        && ["reissue", "cancel"]
            .iter()
            .any(|name| segment_is(last, name));
    collection || line_item_action
}

/// True for POST /raas/v2/orders and /raas/v2/asyncOrders (case-insensitive) — where
/// externalRefID and spend apply.
pub fn is_order(method: &Method, path: &CleanPath<'_>) -> bool {
    is_post(method)
        && path
            .segments()
            .last()
            .is_some_and(|last| segment_is(last, "orders") || segment_is(last, "asyncOrders"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::json::parse_strict;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    use serde_json::json;

    fn set(items: &[&str]) -> Option<BTreeSet<String>> {
        Some(items.iter().map(|s| s.to_string()).collect())
    }

    /// A store bound to account A-1 and customer C-1.
    fn store() -> Bindings {
        Bindings {
            accounts: set(&["A-1"]),
            customers: set(&["C-1"]),
        }
    }

    fn path(text: &str) -> CleanPath<'_> {
        CleanPath::parse(text).unwrap()
    }

    /// A fixed-seed runner: the same bounded corpus on every machine.
    fn runner() -> TestRunner {
        TestRunner::new_with_rng(
            Config {
                cases: 512,
                failure_persistence: None,
                ..Config::default()
            },
            TestRng::deterministic_rng(RngAlgorithm::ChaCha),
        )
    }

    #[test]
    fn unbound_callers_may_name_anything() {
        let open = Bindings::default();
        assert!(!open.is_bound());
        assert!(open.check_path(&path("/raas/v2/accounts/A-2")).is_ok());
        assert!(open
            .check_query(Some("accountIdentifier=A-2&x=%zz"))
            .is_ok());
        assert!(open.check_body(&json!({"accountIdentifier": 5})).is_ok());
        assert!(open
            .check_answer(&json!({"customerIdentifier": "C-9"}))
            .is_ok());
        assert!(store().is_bound());
        let accounts_only = Bindings {
            accounts: set(&["A-1"]),
            customers: None,
        };
        assert!(accounts_only.is_bound());
        // Only the bound list is enforced.
        assert!(accounts_only
            .check_path(&path("/raas/v2/customers/C-9/accounts"))
            .is_ok());
        assert!(accounts_only
            .check_body(&json!({"customerIdentifier": "C-9"}))
            .is_ok());
        assert!(accounts_only
            .check_path(&path("/raas/v2/accounts/A-2"))
            .is_err());
    }

    #[test]
    fn paths_may_name_only_listed_accounts_and_customers() {
        let b = store();
        for ok in [
            "/raas/v2/accounts/A-1",
            "/raas/v2/accounts",
            "/raas/v2/customers",
            "/raas/v2/customers/C-1",
            "/raas/v2/customers/C-1/accounts",
            "/raas/v2/orders/RA-1",
            "/raas/v2/catalogs",
            "/",
        ] {
            assert!(b.check_path(&path(ok)).is_ok(), "{ok}");
        }
        for (bad, rule) in [
            ("/raas/v2/accounts/A-2", "accounts"),
            ("/raas/v2/accounts/a-1", "accounts"),
            ("/raas/v2/accounts/A-1.json", "accounts"),
            ("/raas/v2/Accounts/A-2", "accounts"),
            ("/raas/v2/ACCOUNTS/A-2", "accounts"),
            ("/raas/v2/accounts.json/A-2", "accounts"),
            ("/raas/v2/customers/C-2/accounts", "customers"),
            ("/raas/v2/CUSTOMERS/C-2", "customers"),
            ("/raas/v2/customers/C-1/accounts/A-2", "accounts"),
            ("/other/accounts/A-2", "accounts"),
        ] {
            let violation = b.check_path(&path(bad)).unwrap_err();
            assert_eq!(violation.rule(), rule, "{bad}");
        }
        let violation = b.check_path(&path("/raas/v2/accounts/A-2")).unwrap_err();
        assert_eq!(
            violation.message(),
            "the path names account \"A-2\", which is not in this caller's accounts list"
        );
        let nobody = Bindings {
            accounts: set(&[]),
            customers: None,
        };
        assert!(nobody.check_path(&path("/raas/v2/accounts/A-1")).is_err());
    }

    #[test]
    fn query_parameters_naming_identifiers_are_checked() {
        let b = store();
        for ok in [
            None,
            Some(""),
            Some("accountIdentifier=A-1"),
            Some("accountIdentifier=A-1&accountIdentifier=A-1"),
            Some("customerIdentifier=C-1&accountIdentifier=A%2D1&page=2"),
            Some("ACCOUNTIDENTIFIER=A-1"),
            Some("elementsPerBlock=10&page=0&&"),
            Some("accountNumber=A-2&note=A-2"),
            Some("x=%zz"),
        ] {
            assert!(b.check_query(ok).is_ok(), "{ok:?}");
        }
        for (bad, rule) in [
            ("accountIdentifier=A-2", "accounts"),
            ("accountIdentifier=A-1&accountIdentifier=A-2", "accounts"),
            ("accountIdentifier=A-2&accountIdentifier=A-1", "accounts"),
            ("AccountIdentifier=A-2", "accounts"),
            ("account%49dentifier=A-2", "accounts"),
            ("account%2549dentifier=A-2", "accounts"),
            ("accountIdentifier%5B0%5D=A-2", "accounts"),
            ("accountIdentifier[]=A-2", "accounts"),
            ("sourceAccountIdentifier=A-2", "accounts"),
            ("accountIdentifier=A-1,A-2", "accounts"),
            ("accountIdentifier=A%2D2", "accounts"),
            ("accountIdentifier=A-1+", "accounts"),
            ("accountIdentifier=a-1", "accounts"),
            ("x=1;accountIdentifier=A-2", "accounts"),
            ("accountIdentifier=A-1;accountIdentifier=A-2", "accounts"),
            // A server that does not split on ';' reads the account "A-1;x".
            ("accountIdentifier=A-1;x=1", "accounts"),
            ("customerIdentifier=C-2", "customers"),
            ("accountIdentifier=", "accounts"),
            ("accountIdentifier", "accounts"),
            ("accountIdentifier=%", "accounts"),
            ("accountIdentifier=%G1", "accounts"),
            ("accountIdentifier=%FF", "accounts"),
            ("account%ZZIdentifier=A-1", "accounts"),
        ] {
            let violation = b.check_query(Some(bad)).unwrap_err();
            assert_eq!(violation.rule(), rule, "{bad}");
        }
        assert_eq!(
            b.check_query(Some("accountIdentifier=A%2D2"))
                .unwrap_err()
                .message(),
            "the query string names account \"A-2\", which is not in this caller's accounts list"
        );
        assert_eq!(
            b.check_query(Some("accountIdentifier=")).unwrap_err().message(),
            "the query string carries an account identifier that cannot be checked: its value is empty"
        );
        assert!(b
            .check_query(Some("accountIdentifier=%FF"))
            .unwrap_err()
            .message()
            .contains("not UTF-8"));
    }

    #[test]
    fn body_keys_ending_in_identifier_are_checked_at_any_depth() {
        let b = store();
        for ok in [
            json!({"accountIdentifier": "A-1", "customerIdentifier": "C-1", "amount": 10}),
            json!({"accountIdentifier": null, "customerIdentifier": null}),
            json!({"accountNumber": "A-2", "note": "A-2"}),
            json!({"accountIdentifiers": ["A-1", null]}),
            json!({"utid": "U1", "amount": 5}),
            json!([{"sourceAccountIdentifier": "A-1"}, {"destinationAccountIdentifier": "A-1"}]),
            json!("A-2"),
            json!(null),
        ] {
            assert!(b.check_body(&ok).is_ok(), "{ok}");
        }
        for (bad, rule) in [
            (json!({"accountIdentifier": "A-2"}), "accounts"),
            (json!({"AccountIdentifier": "A-2"}), "accounts"),
            (json!({"ACCOUNTIDENTIFIER": "A-2"}), "accounts"),
            (json!({"account_identifier": "A-2"}), "accounts"),
            (json!({"Account-Identifier": "A-2"}), "accounts"),
            (json!({"accountIdentifierNote": "A-2"}), "accounts"),
            (json!({"accountIdentifiers": ["A-1", "A-2"]}), "accounts"),
            (json!({"accountIdentifiers": [["A-1"]]}), "accounts"),
            (json!({"sourceAccountIdentifier": "A-2"}), "accounts"),
            (json!({"destinationAccountIdentifier": "A-2"}), "accounts"),
            (
                json!({"recipient": {"accountIdentifier": "A-2"}}),
                "accounts",
            ),
            (
                json!({"a": [{"b": [{"accountIdentifier": "A-2"}]}]}),
                "accounts",
            ),
            (json!([[{"accountIdentifier": "A-2"}]]), "accounts"),
            (json!({"accountIdentifier": ["A-1", "A-2"]}), "accounts"),
            (json!({"accountIdentifier": {"id": "A-1"}}), "accounts"),
            (json!({"accountIdentifier": 1}), "accounts"),
            (json!({"accountIdentifier": true}), "accounts"),
            (json!({"accountIdentifier": ""}), "accounts"),
            (json!({"accountIdentifier": " A-1"}), "accounts"),
            (json!({"account\u{131}dentifier": "A-2"}), "accounts"),
            (json!({"customerIdentifier": "C-2"}), "customers"),
            (json!({"cu\u{17f}tomerIdentifier": "C-2"}), "customers"),
        ] {
            let violation = b.check_body(&bad).unwrap_err();
            assert_eq!(violation.rule(), rule, "{bad}");
        }
        assert_eq!(
            b.check_body(&json!({"accountIdentifier": 7})).unwrap_err().message(),
            "the request body carries an account identifier that cannot be checked: its value must be a string"
        );
        let long = "x".repeat(1000);
        let message = b
            .check_body(&json!({"accountIdentifier": long}))
            .unwrap_err()
            .message();
        assert!(message.len() < 200, "{message}");
    }

    #[test]
    fn answers_naming_other_stores_are_refused_without_naming_them() {
        let b = store();
        let own = json!({"referenceOrderID": "RA-1", "accountIdentifier": "A-1",
            "customerIdentifier": "C-1", "reward": {"credentials": {"code": "X"}}});
        assert!(b.check_answer(&own).is_ok());
        let list = json!({"page": {"number": 0}, "orders": [
            {"accountIdentifier": "A-1", "customerIdentifier": "C-1"},
            {"accountIdentifier": "A-SECRET-2", "customerIdentifier": "C-1"}]});
        let violation = b.check_answer(&list).unwrap_err();
        assert_eq!(violation.rule(), "accounts");
        assert!(!violation.message().contains("A-SECRET-2"));
        assert!(!format!("{violation:?}").contains("A-SECRET-2"));
        assert_eq!(
            violation.message(),
            "Tango's answer names an account outside this caller's accounts list; it was withheld"
        );
        let customers = json!([{"customerIdentifier": "C-OTHER", "accounts": []}]);
        let violation = b.check_answer(&customers).unwrap_err();
        assert_eq!(violation.rule(), "customers");
        assert!(!violation.message().contains("C-OTHER"));
        assert!(b
            .check_answer(&json!({"accountIdentifier": 3}))
            .unwrap_err()
            .message()
            .contains("not a string"));
    }

    #[test]
    fn deep_values_are_walked_without_recursion() {
        let mut value = json!({"accountIdentifier": "A-2"});
        for _ in 0..100_000 {
            value = Value::Array(vec![value]);
        }
        let outcome = store().check_body(&value);
        // Dropping a value this deep recurses inside serde_json; take it apart level by level
        // before asserting, so a failing assertion cannot overflow the stack while unwinding.
        while let Value::Array(mut items) = value {
            value = items.pop().unwrap();
        }
        assert_eq!(outcome.unwrap_err().rule(), "accounts");
    }

    #[test]
    fn folding_catches_unicode_case_look_alikes() {
        assert_eq!(fold_key("AccountIdentifier"), "accountidentifier");
        assert_eq!(fold_key("cu\u{17f}tomer"), "customer");
        assert_eq!(fold_key("\u{212a}ey"), "key");
        assert_eq!(fold_key("account\u{131}dentifier"), "accountidentifier");
        assert_eq!(fold_key("account\u{130}dentifier"), "accountidentifier");
        assert_eq!(fold_key("caf\u{c9}"), "caf\u{e9}");
    }

    #[test]
    fn order_facts_read_the_top_level_fields() {
        let facts = order_facts(
            &json!({"externalRefID": "POS-17-0001", "amount": 25.5, "utid": "U561593",
                "accountIdentifier": "A-1", "customerIdentifier": "C-1",
                "recipient": {"externalRefID": "nested-ignored"}}),
            2,
        );
        assert_eq!(
            facts,
            OrderFacts {
                external_ref_id: Some("POS-17-0001".into()),
                amount: Ok(Some(2550)),
                utid: Some("U561593".into()),
                account: Some("A-1".into()),
            }
        );
        let empty = order_facts(&json!({"externalRefID": null, "amount": null}), 2);
        assert_eq!(
            empty,
            OrderFacts {
                external_ref_id: None,
                amount: Ok(None),
                utid: None,
                account: None
            }
        );
        assert_eq!(order_facts(&json!([1, 2]), 2).amount, Ok(None));
    }

    #[test]
    fn external_ref_id_counts_only_in_tangos_spelling() {
        let id = |body: Value| order_facts(&body, 2).external_ref_id;
        assert_eq!(id(json!({"externalRefID": "R1"})), Some("R1".into()));
        assert_eq!(id(json!({"externalrefid": "R1"})), None);
        assert_eq!(
            id(json!({"ExternalRefId": "R1", "externalRefID": null})),
            None
        );
        assert_eq!(
            id(json!({"externalRefID": "R1", "EXTERNALREFID": "R1"})),
            None
        );
        assert_eq!(
            id(json!({"externalRefID": "R1", "externalrefid": "R2"})),
            None
        );
        assert_eq!(id(json!({"externalRefID": ""})), None);
        assert_eq!(id(json!({"externalRefID": 12345})), None);
        assert_eq!(id(json!({"externalRefID": ["R1"]})), None);
        assert_eq!(id(json!({"externalReferenceID": "R1"})), None);
        assert_eq!(id(json!({})), None);
    }

    fn amount_of(text: &str, decimals: u32) -> Result<Option<u64>, String> {
        let body = parse_strict(format!(r#"{{"amount":{text}}}"#).as_bytes()).unwrap();
        order_facts(&body, decimals).amount
    }

    #[test]
    fn amounts_are_exact_numbers_in_minor_units() {
        assert_eq!(amount_of("10", 2), Ok(Some(1000)));
        assert_eq!(amount_of("10.10", 2), Ok(Some(1010)));
        assert_eq!(amount_of("10.1", 2), Ok(Some(1010)));
        assert_eq!(amount_of("0.01", 2), Ok(Some(1)));
        assert_eq!(amount_of("0.3", 2), Ok(Some(30)));
        assert_eq!(amount_of("1e1", 2), Ok(Some(1000)));
        assert_eq!(amount_of("1.5E1", 2), Ok(Some(1500)));
        assert_eq!(amount_of("25E-1", 2), Ok(Some(250)));
        assert_eq!(amount_of("10.000", 2), Ok(Some(1000)));
        assert_eq!(amount_of("500", 0), Ok(Some(500)));
        assert_eq!(amount_of("1.234", 3), Ok(Some(1234)));
        assert_eq!(amount_of("9999999999.99", 2), Ok(Some(999_999_999_999)));
        assert_eq!(amount_of("10000000000", 2), Ok(Some(MAX_AMOUNT_MINOR)));
        assert_eq!(amount_of("10000000000.00", 2), Ok(Some(MAX_AMOUNT_MINOR)));
        for (text, decimals, expected) in [
            ("10.005", 2, "more than 2 decimal places"),
            ("0.001", 2, "more than 2 decimal places"),
            ("0.30000000000000004", 2, "more than 2 decimal places"),
            ("10.5", 0, "more than 0 decimal places"),
            ("0", 2, "greater than zero"),
            ("0.0", 2, "greater than zero"),
            ("-0.0", 2, "greater than zero"),
            ("-5", 2, "greater than zero"),
            ("-5.5", 2, "greater than zero"),
            ("10000000000.01", 2, "too large"),
            ("10000000001", 2, "too large"),
            ("18446744073709551615", 2, "too large"),
            ("1e300", 2, "too large"),
            ("\"10.00\"", 2, "not a string"),
            ("true", 2, "must be a JSON number"),
            ("[10]", 2, "must be a JSON number"),
            ("{\"value\":10}", 2, "must be a JSON number"),
            ("1", 20, "not supported"),
        ] {
            let error = amount_of(text, decimals).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
        let twice = order_facts(&json!({"amount": 10, "Amount": 1000}), 2);
        assert!(twice.amount.unwrap_err().contains("more than once"));
        assert_eq!(order_facts(&json!({"AMOUNT": 7}), 2).amount, Ok(Some(700)));
    }

    #[test]
    fn every_two_decimal_amount_reads_back_exactly() {
        // Every cent up to $1,000, then a spread of larger amounts up to the cap.
        let mut minors: Vec<u64> = (1..=100_000).collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            minors.push(x % MAX_AMOUNT_MINOR + 1);
        }
        for minor in minors {
            let (whole, cents) = (minor / 100, minor % 100);
            assert_eq!(
                amount_of(&format!("{whole}.{cents:02}"), 2),
                Ok(Some(minor))
            );
            // One more digit that is not zero is always refused; a zero is not.
            let tenth = minor % 9 + 1;
            assert!(amount_of(&format!("{whole}.{cents:02}{tenth}"), 2).is_err());
            assert_eq!(
                amount_of(&format!("{whole}.{cents:02}0"), 2),
                Ok(Some(minor))
            );
        }
        for minor in (1..=30_000u64).step_by(7) {
            let (whole, frac) = (minor / 1000, minor % 1000);
            assert_eq!(amount_of(&format!("{whole}.{frac:03}"), 3), Ok(Some(minor)));
        }
    }

    #[test]
    fn money_moving_posts_are_recognised_in_any_letter_case() {
        let post = Method::POST;
        let lower_post = Method::from_bytes(b"post").unwrap();
        for p in [
            "/raas/v2/orders",
            "/raas/v2/asyncOrders",
            "/raas/v2/creditCardDeposits",
            "/raas/v2/transferFunds",
            "/raas/v2/lineItems/L-1/reissue",
            "/raas/v2/lineItems/L-1/cancel",
            "/raas/v2/ORDERS",
            "/raas/v2/asyncorders",
            "/raas/v2/orders.json",
            "/raas/v2/LINEITEMS/L-1/Reissue",
        ] {
            assert!(is_money_moving(&post, &path(p)), "{p}");
            assert!(is_money_moving(&lower_post, &path(p)), "{p}");
            assert!(!is_money_moving(&Method::GET, &path(p)), "{p}");
        }
        for p in [
            "/raas/v2/orders/RA-1",
            "/raas/v2/orders/RA-1/resends",
            "/raas/v2/lineItems/L-1/resends",
            "/raas/v2/lineItems/L-1/freeze",
            "/raas/v2/lineItems/L-1/unfreeze",
            "/raas/v2/creditCards",
            "/raas/v2/creditCardUnregisters",
            "/raas/v2/customers/C-1/accounts",
            "/raas/v2/catalogs",
            "/",
        ] {
            assert!(!is_money_moving(&post, &path(p)), "{p}");
        }
        assert!(is_order(&post, &path("/raas/v2/orders")));
        assert!(is_order(&post, &path("/raas/v2/asyncOrders")));
        assert!(is_order(&post, &path("/raas/v2/Orders")));
        assert!(is_order(&lower_post, &path("/raas/v2/ASYNCORDERS")));
        assert!(!is_order(&Method::GET, &path("/raas/v2/orders")));
        assert!(!is_order(&post, &path("/raas/v2/transferFunds")));
        assert!(!is_order(&post, &path("/raas/v2/lineItems/L-1/reissue")));
        assert!(!is_order(&post, &path("/raas/v2/orders/RA-1/resends")));
    }

    /// Paths naming account A-2 in every spelling a lenient server might route to it.
    fn paths_naming_a2() -> impl Strategy<Value = String> {
        let collection = prop::sample::select(vec![
            "accounts",
            "Accounts",
            "ACCOUNTS",
            "accounts.json",
            "account%73",
            "%61ccounts",
        ]);
        let id = prop::sample::select(vec![
            "A-2",
            "A%2D2",
            "A%2d2",
            "A-%32",
            "%41-2",
            "A%252D2",
            "A-1/../A-2",
            "A-1/%2e%2e/A-2",
            "A-1%2f..%2fA-2",
            "A-2;A-1",
            "A-1;/../A-2",
            "A-2/",
            "A-2//",
            "./A-2",
            "A-2%00",
            "A\\..\\A-2",
            "A-1\\..\\A-2",
        ]);
        let sep = prop::sample::select(vec!["/", "/", "//", "%2f", "\\", "/./", "/x/../"]);
        let prefix =
            prop::sample::select(vec!["/raas/v2", "/RAAS/V2", "/raas/v2/customers/C-1", ""]);
        (prefix, sep, collection, id)
            .prop_map(|(prefix, sep, collection, id)| format!("{prefix}{sep}{collection}/{id}"))
    }

    #[test]
    fn no_generated_path_to_another_account_passes() {
        let b = store();
        runner()
            .run(&paths_naming_a2(), |text| {
                let passes = CleanPath::parse(&text).is_ok_and(|p| b.check_path(&p).is_ok());
                prop_assert!(!passes, "{text} passed");
                Ok(())
            })
            .unwrap();
        assert!(b.check_path(&path("/raas/v2/accounts/A-1")).is_ok());
    }

    /// Query strings naming A-2 (and maybe A-1 too) in every spelling a binder might decode.
    fn queries_naming_a2() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec![
            "accountIdentifier",
            "AccountIdentifier",
            "ACCOUNTIDENTIFIER",
            "account%49dentifier",
            "account%2549dentifier",
            "accountIdentifier%5B%5D",
            "accountIdentifier[0]",
            "sourceAccountIdentifier",
            "account%C4%B1dentifier",
            "%61ccountIdentifier",
        ]);
        let value = prop::sample::select(vec![
            "A-2", "A%2D2", "A%2d2", "%41-2", "A-%32", "A-2+", "+A-2", "A-1,A-2",
        ]);
        let joiner = prop::sample::select(vec!["&", ";", "&&"]);
        let extra = prop::sample::select(vec![
            "",
            "page=1",
            "accountIdentifier=A-1",
            "customerIdentifier=C-1",
        ]);
        (
            extra.clone(),
            joiner.clone(),
            key,
            value,
            joiner,
            extra,
            any::<bool>(),
        )
            .prop_map(|(before, j1, key, value, j2, after, flip)| {
                let pair = format!("{key}={value}");
                if flip {
                    format!("{after}{j2}{pair}{j1}{before}")
                } else {
                    format!("{before}{j1}{pair}{j2}{after}")
                }
            })
    }

    #[test]
    fn no_generated_query_naming_another_account_passes() {
        let b = store();
        runner()
            .run(&queries_naming_a2(), |query| {
                prop_assert!(b.check_query(Some(&query)).is_err(), "{query} passed");
                Ok(())
            })
            .unwrap();
        assert!(b
            .check_query(Some("page=1&accountIdentifier=A-1&customerIdentifier=C-1"))
            .is_ok());
    }

    /// Where an identifier sits in a body: JSON text with `@` where the key-value pair goes.
    fn wrappers() -> Vec<&'static str> {
        vec![
            "{@}",
            r#"{"amount":10,@}"#,
            r#"{"recipient":{@}}"#,
            r#"[{@}]"#,
            r#"{"a":[1,{"b":[{@}]}]}"#,
            r#"{"accountIdentifier":"A-1",@}"#,
            r#"{@,"accountIdentifier":"A-1"}"#,
            r#"{"accountIdentifier":null,@}"#,
            r#"{"lineItems":[{"accountIdentifier":"A-1"},{@}]}"#,
        ]
    }

    fn body(wrapper: &str, pair: &str) -> String {
        wrapper.replace('@', pair)
    }

    /// JSON bodies that name A-2 as an account in some spelling of key, value and position.
    fn bodies_naming_a2() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec![
            "accountIdentifier",
            "AccountIdentifier",
            "ACCOUNTIDENTIFIER",
            "account\\u0049dentifier",
            "\\u0061ccountIdentifier",
            "sourceAccountIdentifier",
            "destinationAccountIdentifier",
            "account\\u0131dentifier",
            "fromAccountIdentifier",
        ]);
        let value = prop::sample::select(vec![
            "\"A-2\"",
            "\"A\\u002d2\"",
            "[\"A-2\"]",
            "[\"A-1\",\"A-2\"]",
            "{\"id\":\"A-2\"}",
            "2",
            "\"A-2 \"",
            "\"a-2\"",
            "\"A-1\\u0000\"",
            "true",
        ]);
        (prop::sample::select(wrappers()), key, value)
            .prop_map(|(wrapper, key, value)| body(wrapper, &format!("\"{key}\":{value}")))
    }

    #[test]
    fn no_generated_body_naming_another_account_passes() {
        let b = store();
        runner()
            .run(&bodies_naming_a2(), |text| {
                let passes = parse_strict(text.as_bytes()).is_ok_and(|v| b.check_body(&v).is_ok());
                prop_assert!(!passes, "{text} passed");
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn the_same_bodies_naming_the_callers_own_account_pass() {
        // Control for the corpus above: its wrappers are valid JSON and pass with A-1 or a decoy.
        let b = store();
        for wrapper in wrappers() {
            for pair in [
                r#""sourceAccountIdentifier":"A-1""#,
                r#""accountNumber":"A-2""#,
                r#""note":"accountIdentifier A-2""#,
                r#""customerIdentifier":"C-1""#,
            ] {
                let text = body(wrapper, pair);
                let value = parse_strict(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
                assert!(b.check_body(&value).is_ok(), "{text}");
            }
        }
    }
}
