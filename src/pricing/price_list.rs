//! The AWS Price List Query API's `GetProducts` answers: `{"FormatVersion", "NextToken",
//! "PriceList": [...]}` where each `PriceList` element is a JSON document inside a string (parsed
//! twice), and prices are strings (`"pricePerUnit": {"USD": "55.0400000000"}`).

use std::collections::HashMap;

use serde::Deserialize;

use super::valid_price;

/// The on-demand term's offer code.
const ON_DEMAND_TERM: &str = "JRTCKXETXF";

/// One answer of `GetProducts`.
#[derive(Deserialize)]
pub(crate) struct ProductsPage {
    #[serde(rename = "PriceList", default)]
    price_list: Vec<serde_json::Value>,
    #[serde(rename = "NextToken")]
    pub next_token: Option<String>,
}

impl ProductsPage {
    pub fn parse(body: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(body)
    }

    /// Each element parsed (its string, as JSON), or why it could not be.
    pub fn items(&self) -> Vec<Result<PriceItem, String>> {
        let parse = |element: &serde_json::Value| match element {
            serde_json::Value::String(document) => serde_json::from_str(document).map_err(|e| e.to_string()),
            _ => Err("not a json document in a string".to_string()),
        };
        self.price_list.iter().map(parse).collect()
    }
}

/// One `PriceList` element, once its string is parsed.
#[derive(Debug, Deserialize)]
pub(crate) struct PriceItem {
    pub product: Product,
    terms: Terms,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Product {
    pub sku: String,
    #[serde(rename = "productFamily", default)]
    pub product_family: String,
    #[serde(default)]
    attributes: HashMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Terms {
    #[serde(rename = "OnDemand", default)]
    on_demand: HashMap<String, Term>,
}

#[derive(Debug, Deserialize)]
struct Term {
    #[serde(rename = "offerTermCode", default)]
    offer_term_code: String,
    #[serde(rename = "priceDimensions")]
    price_dimensions: HashMap<String, Dimension>,
}

#[derive(Debug, Deserialize)]
struct Dimension {
    #[serde(rename = "beginRange", default)]
    begin_range: String,
    #[serde(rename = "pricePerUnit")]
    price_per_unit: HashMap<String, String>,
}

impl PriceItem {
    pub fn attribute(&self, name: &str) -> &str {
        self.product.attributes.get(name).map(String::as_str).unwrap_or_default()
    }

    /// Whether every one of `filters` (attribute, value) holds.
    pub fn matches(&self, filters: &[(&str, &str)]) -> bool {
        filters.iter().all(|(name, value)| self.attribute(name) == *value)
    }

    /// The on-demand term's tiers as (begin of range, USD per unit), lowest range first.
    pub fn on_demand_tiers(&self) -> Result<Vec<(f64, f64)>, String> {
        let terms: Vec<&Term> = self.terms.on_demand.values().collect();
        let term = match terms.as_slice() {
            [term] => *term,
            terms => terms
                .iter()
                .find(|t| t.offer_term_code == ON_DEMAND_TERM)
                .copied()
                .ok_or_else(|| format!("sku {}: {} on-demand terms", self.product.sku, terms.len()))?,
        };
        let mut tiers: Vec<(f64, f64)> = Vec::new();
        for dimension in term.price_dimensions.values() {
            let usd = dimension.price_per_unit.get("USD").ok_or_else(|| format!("sku {}: no usd", self.product.sku))?;
            let price = usd.parse::<f64>().ok().filter(|p| valid_price(*p));
            let begin = if dimension.begin_range.is_empty() { Some(0.0) } else { dimension.begin_range.parse().ok() };
            match (begin, price) {
                (Some(begin), Some(price)) => tiers.push((begin, price)),
                _ => return Err(format!("sku {}: bad price {usd:?} or range", self.product.sku)),
            }
        }
        tiers.sort_by(|a, b| a.0.total_cmp(&b.0));
        if tiers.is_empty() {
            return Err(format!("sku {}: no price dimensions", self.product.sku));
        }
        Ok(tiers)
    }
}

/// The one candidate's on-demand tiers, or why there is no price: no candidate, several (refused,
/// not guessed), or one whose terms don't read.
pub(crate) fn single(label: &str, candidates: &[&PriceItem]) -> Result<Vec<(f64, f64)>, String> {
    match candidates {
        [item] => item.on_demand_tiers().map_err(|e| format!("no price for {label}: {e}")),
        [] => Err(format!("no price for {label}: no matching product")),
        items => {
            let skus = items.iter().map(|i| i.product.sku.as_str()).collect::<Vec<_>>().join(", ");
            Err(format!("refusing to guess the price of {label}: {} products match: {skus}", items.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_json_documents_in_strings_with_prices_in_strings() {
        let document = r#"{"product":{"sku":"S","productFamily":"Storage","attributes":{"volumeType":"Standard"}},
            "terms":{"OnDemand":{"S.JRTCKXETXF":{"offerTermCode":"JRTCKXETXF","priceDimensions":{
              "S.JRTCKXETXF.B":{"beginRange":"51200","pricePerUnit":{"USD":"0.0220000000"}},
              "S.JRTCKXETXF.A":{"beginRange":"0","pricePerUnit":{"USD":"0.0230000000"}}}}}}}"#;
        let body =
            serde_json::json!({"FormatVersion": "aws_v1", "NextToken": "t", "PriceList": [document, {"product": {}}]});
        let page = ProductsPage::parse(&body.to_string()).unwrap();
        assert_eq!(page.next_token.as_deref(), Some("t"));
        let items = page.items();
        let item = items[0].as_ref().unwrap();
        assert_eq!(item.product.product_family, "Storage");
        assert!(item.matches(&[("volumeType", "Standard")]) && !item.matches(&[("volumeType", "Cold")]));
        assert_eq!(item.on_demand_tiers().unwrap(), vec![(0.0, 0.023), (51200.0, 0.022)], "lowest range first");
        assert_eq!(items[1].as_ref().unwrap_err(), "not a json document in a string");
    }

    #[test]
    fn a_price_that_is_not_a_number_makes_the_item_unreadable() {
        let document = r#"{"product":{"sku":"S"},"terms":{"OnDemand":{"S.T":{"priceDimensions":{
            "S.T.A":{"beginRange":"0","pricePerUnit":{"USD":"free"}}}}}}}"#;
        let item: PriceItem = serde_json::from_str(document).unwrap();
        assert!(item.on_demand_tiers().unwrap_err().contains("bad price \"free\""));
    }
}
