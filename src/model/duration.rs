//! Durations written the way people write them: `90s`, `30m`, `2h`, `1h 30m`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A [`Duration`] that (de)serialises as human text such as `2h` or `500ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        humantime::parse_duration(text.trim())
            .map(HumanDuration)
            .map_err(|e| format!("{text:?} is not a duration like 90s, 30m or 2h ({e})"))
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read with a visitor, so a YAML reader reports a bad duration at its line and column.
impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 90s, 30m or 2h")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<HumanDuration, E> {
                HumanDuration::parse(text).map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

/// What [`humantime`] reads: `0`, or numbers (fractions allowed) each with a unit, spaces optional.
pub const DURATION_PATTERN: &str = "^\\s*(0|([0-9]+(\\.[0-9]+)?\\s*(nanos|nsec|ns|usec|us|µs|millis|msec|ms|seconds|second|secs|sec|s|\
                                    minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d|weeks|week|wks|wk|w|\
                                    months|month|M|years|year|yrs|yr|y)\\s*)+)$";

/// A string like `90s`, `30m`, `2h` or `1h 30m` (the OpenAPI and job-file schemas).
impl utoipa::PartialSchema for HumanDuration {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(DURATION_PATTERN))
            .description(Some("A duration: numbers with units, e.g. `90s`, `30m`, `2h`, `1h 30m`, `1.5d`"))
            .examples(["2h", "1h 30m"])
            .into()
    }
}

impl utoipa::ToSchema for HumanDuration {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let d = HumanDuration::parse("1h 30m").unwrap();
        assert_eq!(d.0, Duration::from_secs(5400));
        assert_eq!(HumanDuration::parse(&d.to_string()).unwrap(), d);
        assert!(HumanDuration::parse("soon").unwrap_err().contains("soon"));
    }
}
