//! A job's secret values (`secret_env`): they never show. `Debug` and `Serialize` write
//! [`REDACTED`], so a spec logged, traced, stored as JSON or served by the API carries the names
//! only; the clear value is read with [`SecretValue::expose`], by the broker when it seals the
//! values at submit and when it builds the agent's assignment.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// What a secret value shows as everywhere but the job's own environment.
pub const REDACTED: &str = "<redacted>";

/// A job's secret environment: names in the clear, values redacted.
pub type SecretEnv = BTreeMap<String, SecretValue>;

/// One secret value. Comparing two is fine; printing or serialising one shows [`REDACTED`].
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The placeholder a spec holds once its values are sealed (and after a reload from the store).
    pub fn redacted() -> Self {
        Self(REDACTED.to_string())
    }

    /// The clear value: only for sealing it and for the agent's assignment.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(REDACTED, f)
    }
}

impl Serialize for SecretValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// A string, like `env` values. Any error is replaced by one that cannot quote the value (serde's
/// own "invalid type: integer `1234`" would put it in the error answer and the logs).
impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)
            .map(SecretValue)
            .map_err(|_| de::Error::custom("secret values must be strings (the value is not shown)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_json_show_only_the_placeholder() {
        let env: SecretEnv = [("TOKEN".to_string(), SecretValue::new("hunter2"))].into();
        assert_eq!(format!("{env:?}"), r#"{"TOKEN": "<redacted>"}"#);
        assert_eq!(serde_json::to_string(&env).unwrap(), r#"{"TOKEN":"<redacted>"}"#);
        assert_eq!(env["TOKEN"].expose(), "hunter2");
    }

    #[test]
    fn values_are_read_as_strings_and_other_types_are_refused_without_quoting_them() {
        let env: SecretEnv = serde_json::from_str(r#"{"A": "x y"}"#).unwrap();
        assert_eq!(env["A"].expose(), "x y");
        // YAML reads a bare scalar as the string it spells, as it does for `env`.
        let env: SecretEnv = serde_yaml_ng::from_str("A: 918273\nB: true\n").unwrap();
        assert_eq!((env["A"].expose(), env["B"].expose()), ("918273", "true"));
        for doc in [r#"{"A": 918273}"#, r#"{"A": 9182.73}"#, r#"{"A": true}"#, r#"{"A": -918273}"#] {
            let err = serde_json::from_str::<SecretEnv>(doc).unwrap_err().to_string();
            assert!(err.contains("secret values must be strings"), "{err}");
            assert!(!err.contains("918273") && !err.contains("9182.73") && !err.contains("true"), "{err}");
        }
    }
}
