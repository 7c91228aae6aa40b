//! Strict JSON parsing for the bodies the gateway inspects.
//!
//! Parsers disagree about ambiguous JSON: given `{"accountIdentifier":"A-1","accountIdentifier":"A-2"}`
//! one keeps the first value and another the last, so the gateway could check one account while
//! Tango spends from the other. The gateway therefore refuses what is ambiguous instead of picking
//! a reading: duplicate keys at any depth (compared after unescaping, and also when they differ
//! only in letter case, which a case-insensitive binder such as Jackson's would merge), nesting
//! deeper than [`MAX_DEPTH`], and anything after the value.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::bindings::fold_key;

/// How deeply arrays and objects may nest; Tango's bodies need a handful of levels.
pub const MAX_DEPTH: usize = 64;

/// The longest key a refusal quotes; a longer one is cut short.
const MAX_QUOTED_KEY: usize = 64;

/// Why a body was refused; the message is meant for the caller and never repeats the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonRefused(pub String);

impl fmt::Display for JsonRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JsonRefused {}

/// Parses a JSON body strictly: duplicate keys at any depth are refused (a parser that keeps the
/// first and one that keeps the last would see different accounts), nesting deeper than 64
/// refused, trailing data refused.
pub fn parse_strict(bytes: &[u8]) -> Result<Value, JsonRefused> {
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Err(JsonRefused(
            "body starts with a byte-order mark; send JSON as plain UTF-8".to_owned(),
        ));
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(JsonRefused(
            "body is empty; expected a JSON value".to_owned(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict { depth: 0 }
        .deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value))
        .map_err(|e| JsonRefused(format!("body is not acceptable JSON: {e}")))?;
    Ok(value)
}

/// A key quoted for a message: escaped, and cut short so a huge key cannot fill a log line.
fn quoted_key(key: &str) -> String {
    match key.char_indices().nth(MAX_QUOTED_KEY) {
        Some((cut, _)) => format!("{:?}...", &key[..cut]),
        None => format!("{key:?}"),
    }
}

/// Builds a [`Value`] one level below `depth`, refusing what [`parse_strict`] refuses.
struct Strict {
    depth: usize,
}

impl Strict {
    fn nested<E: de::Error>(&self) -> Result<Strict, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!(
                "arrays and objects nest deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(Strict {
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // JSON text cannot spell NaN or infinity, so this refuses nothing serde_json accepts.
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number is not finite"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.nested()?)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        let mut folded = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key {}",
                    quoted_key(&key)
                )));
            }
            if !folded.insert(fold_key(&key)) {
                return Err(de::Error::custom(format_args!(
                    "key {} repeats another key of its object in different letter case",
                    quoted_key(&key)
                )));
            }
            let value = map.next_value_seed(self.nested()?)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refusal(text: &str) -> String {
        parse_strict(text.as_bytes()).unwrap_err().0
    }

    #[test]
    fn well_formed_bodies_parse_to_the_same_value_as_serde_json() {
        for text in [
            r#"{"accountIdentifier":"A-1","amount":10.5,"utid":"U1","sendEmail":false,"x":null}"#,
            r#"[1,-2,3.25,1e3,"s",true,null,{},[]]"#,
            r#"{"a":{"b":[{"c":"d"},{"c":"e"}]},"n":18446744073709551615}"#,
            "  \"plain\"\n",
            "0",
            r#"{"esc\u0041ped":"\ud83d\ude00"}"#,
        ] {
            let strict = parse_strict(text.as_bytes()).unwrap();
            let loose: Value = serde_json::from_str(text).unwrap();
            assert_eq!(strict, loose, "{text}");
        }
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert!(
            refusal(r#"{"accountIdentifier":"A-1","accountIdentifier":"A-2"}"#)
                .contains("duplicate key \"accountIdentifier\"")
        );
        assert!(refusal(r#"{"a":{"b":1,"b":1}}"#).contains("duplicate key \"b\""));
        assert!(refusal(r#"[{"ok":1},[{"x":1,"y":2,"x":3}]]"#).contains("duplicate key \"x\""));
        // The same key in sibling objects is not a duplicate.
        assert!(parse_strict(br#"[{"x":1},{"x":2}]"#).is_ok());
        assert!(parse_strict(br#"{"x":{"x":{"x":1}}}"#).is_ok());
    }

    #[test]
    fn keys_are_compared_after_unescaping() {
        let message = refusal(r#"{"accountIdentifier":"A-1","account\u0049dentifier":"A-2"}"#);
        assert!(
            message.contains("duplicate key \"accountIdentifier\""),
            "{message}"
        );
        assert!(refusal(r#"{"a\/b":1,"a/b":2}"#).contains("duplicate key \"a/b\""));
    }

    #[test]
    fn keys_differing_only_in_case_are_refused() {
        let message = refusal(r#"{"accountIdentifier":"A-1","AccountIdentifier":"A-2"}"#);
        assert!(message.contains("different letter case"), "{message}");
        assert!(refusal(r#"{"externalRefID":"x","externalrefid":"y"}"#)
            .contains("different letter case"));
        // The long s and the Kelvin sign fold to ASCII letters under Unicode case rules.
        assert!(
            refusal(r#"{"customerIdentifier":"C","cu\u017ftomerIdentifier":"D"}"#)
                .contains("different letter case")
        );
    }

    #[test]
    fn nesting_is_capped_at_64_levels() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse_strict(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(refusal(&deep).contains("deeper than 64"));
        let objects = format!(
            "{}1{}",
            r#"{"a":"#.repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert!(refusal(&objects).contains("deeper than 64"));
        // Far deeper input is refused quickly, without exhausting the stack.
        let huge = "[".repeat(1_000_000);
        assert!(refusal(&huge).contains("deeper than 64"));
    }

    #[test]
    fn trailing_data_bom_and_empty_bodies_are_refused() {
        assert!(refusal(r#"{"a":1} {"a":2}"#).contains("trailing characters"));
        assert!(refusal(r#"{"a":1}x"#).contains("trailing characters"));
        assert!(parse_strict(b"{\"a\":1}\r\n\t ").is_ok());
        assert!(refusal("\u{feff}{\"a\":1}").contains("byte-order mark"));
        // serde_json would refuse the mark too, with a less helpful message.
        assert!(serde_json::from_slice::<Value>(b"\xEF\xBB\xBF{}").is_err());
        assert!(refusal("").contains("body is empty"));
        assert!(refusal(" \n").contains("body is empty"));
    }

    #[test]
    fn malformed_json_is_refused_without_echoing_the_body() {
        let secret = "claim-code-SHOULD-NOT-APPEAR";
        for text in [
            format!(r#"{{"a":"{secret}""#),
            format!(r#"{{"a":"{secret}",}}"#),
            format!(r#"{{'a':"{secret}"}}"#),
            format!(r#"{{"a":"{secret}" "b":1}}"#),
            format!(r#"["{secret}", NaN]"#),
            format!("[\"{secret}\", \"\\ud800\"]"),
        ] {
            let message = refusal(&text);
            assert!(
                message.starts_with("body is not acceptable JSON: "),
                "{message}"
            );
            assert!(!message.contains(secret), "{message}");
        }
        let mut invalid_utf8 = format!("[\"{secret}").into_bytes();
        invalid_utf8.extend_from_slice(b"\xff\"]");
        let message = parse_strict(&invalid_utf8).unwrap_err().0;
        assert!(
            message.starts_with("body is not acceptable JSON: "),
            "{message}"
        );
        assert!(!message.contains(secret), "{message}");
    }

    #[test]
    fn long_duplicate_keys_are_quoted_short() {
        let key = "k".repeat(10_000);
        let message = refusal(&format!(r#"{{"{key}":1,"{key}":2}}"#));
        assert!(message.contains("duplicate key"));
        assert!(message.len() < 200, "{} bytes", message.len());
    }

    #[test]
    fn numbers_keep_their_value() {
        let value = parse_strict(br#"{"amount":10.10,"n":-3,"big":1e300}"#).unwrap();
        assert_eq!(value, json!({"amount": 10.1, "n": -3, "big": 1e300}));
        assert!(refusal("1e999").starts_with("body is not acceptable JSON"));
    }
}
