//! Byte sizes written the way people write them: `200GiB`, `1.5TB`, `512MB`, `4096` (bytes).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes that (de)serialises as human text such as `200GiB`; a bare integer is bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

const UNITS: [(&str, u64); 13] = [
    ("B", 1),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("PB", 1_000_000_000_000_000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("PiB", 1 << 50),
    ("K", 1 << 10),
    ("G", 1 << 30),
];

impl ByteSize {
    /// Parses `200GiB`, `1.5 TB`, `512MB`, `4096`; units are case-insensitive (`gib`, `gb`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a size like 200GiB, 1.5TB or 512MB");
        let t = text.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (number, unit) = (&t[..split], t[split..].trim());
        let value: f64 = number.parse().map_err(|_| bad())?;
        let factor = if unit.is_empty() {
            1
        } else {
            UNITS.iter().find(|(u, _)| u.eq_ignore_ascii_case(unit)).map(|(_, f)| *f).ok_or_else(bad)?
        };
        let bytes = value * factor as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(bad());
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that keeps at least 1, with up to one decimal (`200GiB`, `1.5TiB`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [("PiB", 1u64 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (unit, factor) in units {
            if self.0 >= factor {
                let v = self.0 as f64 / factor as f64;
                return if (v - v.round()).abs() < 0.05 {
                    write!(f, "{}{unit}", v.round() as u64)
                } else {
                    write!(f, "{v:.1}{unit}")
                };
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read with a visitor (a whole number of bytes, or text), so a YAML reader reports a bad size at
/// its line and column.
impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Size;
        impl serde::de::Visitor<'_> for Size {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like 200GiB, 1.5TB or 512MB, or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(bytes))
            }
            fn visit_i64<E: serde::de::Error>(self, bytes: i64) -> Result<ByteSize, E> {
                u64::try_from(bytes).map(ByteSize).map_err(|_| E::custom(format!("{bytes} is not a size (negative)")))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ByteSize, E> {
                ByteSize::parse(text).map_err(E::custom)
            }
        }
        d.deserialize_any(Size)
    }
}

/// A size as text: a number (fractions allowed) and an optional unit of [`UNITS`], any case.
pub const SIZE_PATTERN: &str = "^\\s*([0-9]+(\\.[0-9]*)?|\\.[0-9]+)\\s*([bB]|[kKmMgGtTpP][iI]?[bB]|[kKgG])?\\s*$";

/// A whole number of bytes, or a string like `200GiB` (the OpenAPI and job-file schemas).
impl utoipa::PartialSchema for ByteSize {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
        let bytes = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(0))
            .description(Some("Bytes"));
        let text = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(SIZE_PATTERN))
            .description(Some("A number and a unit: B, KB, MB, GB, TB, PB (powers of 1000), KiB, MiB, GiB, TiB, PiB, K, G (powers of 1024)"));
        OneOfBuilder::new()
            .item(bytes)
            .item(text)
            .description(Some("A size: bytes, or text like `200GiB`, `1.5TB`, `512MB`"))
            .examples([serde_json::json!("200GiB"), serde_json::json!(4096)])
            .into()
    }
}

impl utoipa::ToSchema for ByteSize {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_prints_round_trip() {
        assert_eq!(ByteSize::parse("200GiB").unwrap().0, 200 << 30);
        assert_eq!(ByteSize::parse("1.5 TB").unwrap().0, 1_500_000_000_000);
        assert_eq!(ByteSize::parse("512mb").unwrap().0, 512_000_000);
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        for text in ["200GiB", "1.5TiB", "17B"] {
            let size = ByteSize::parse(text).unwrap();
            assert_eq!(size.to_string(), text);
            assert_eq!(ByteSize::parse(&size.to_string()).unwrap(), size);
        }
        for bad in ["", "GiB", "-1GB", "12 parsecs", "1e400"] {
            assert!(ByteSize::parse(bad).unwrap_err().contains("is not a size"), "{bad}");
        }
        let from_json: ByteSize = serde_json::from_str("1024").unwrap();
        assert_eq!(from_json.0, 1024);
        let from_json: ByteSize = serde_json::from_str("\"2KiB\"").unwrap();
        assert_eq!(from_json.0, 2048);
        assert!(serde_json::from_str::<ByteSize>("-1").is_err());
        assert!(serde_json::from_str::<ByteSize>("1.5").is_err());
        let from_yaml: ByteSize = serde_yaml_ng::from_str("200GiB").unwrap();
        assert_eq!(from_yaml.0, 200 << 30);
        let from_yaml: ByteSize = serde_yaml_ng::from_str("4096").unwrap();
        assert_eq!(from_yaml.0, 4096);
    }
}
