//! EC2 `DescribeSpotPriceHistory` answers: the EC2 API speaks the query protocol and answers in
//! XML (`DescribeSpotPriceHistoryResponse` → `spotPriceHistorySet` → `item`, and `nextToken`),
//! read with `quick-xml`'s serde support.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One `item` of the answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SpotItem {
    pub instance_type: String,
    pub product_description: String,
    pub spot_price: f64,
    /// ISO 8601 as EC2 writes it (`2026-09-16T09:12:44.000Z`): one format, so it sorts as text.
    pub timestamp: String,
    pub availability_zone: String,
}

/// One page of the answer: its items, the token of the next page, and a note per item skipped.
#[derive(Debug, Default)]
pub(crate) struct SpotPage {
    pub items: Vec<SpotItem>,
    pub next_token: Option<String>,
    pub skipped: Vec<String>,
}

/// The answer as it is on the wire; any other element (`requestId`, …) is ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    spot_price_history_set: Option<ItemSet>,
    next_token: Option<String>,
}

#[derive(Deserialize)]
struct ItemSet {
    #[serde(rename = "item", default)]
    items: Vec<WireItem>,
}

/// An item's fields, each possibly missing: a malformed item is skipped, not the whole page.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireItem {
    instance_type: Option<String>,
    product_description: Option<String>,
    spot_price: Option<String>,
    timestamp: Option<String>,
    availability_zone: Option<String>,
}

/// Reads one page; an answer without a `spotPriceHistorySet` is not a spot price history.
pub(crate) fn parse_spot_page(xml: &str) -> Result<SpotPage, String> {
    let answer: Answer = quick_xml::de::from_str(xml).map_err(|e| format!("not a spot price history: {e}"))?;
    let set = answer.spot_price_history_set.ok_or("no spotPriceHistorySet in the answer")?;
    let mut page = SpotPage::default();
    for (index, item) in set.items.into_iter().enumerate() {
        match parse_item(item) {
            Ok(item) => page.items.push(item),
            Err(e) => page.skipped.push(format!("skipping malformed spot price item {index}: {e}")),
        }
    }
    page.next_token = answer.next_token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
    Ok(page)
}

fn parse_item(item: WireItem) -> Result<SpotItem, String> {
    let field = |value: Option<String>, tag: &str| value.map(|v| v.trim().to_string()).ok_or(format!("no {tag}"));
    let price = field(item.spot_price, "spotPrice")?;
    let spot_price = price.parse::<f64>().map_err(|_| format!("spotPrice {price:?} is not a number"))?;
    if !super::valid_price(spot_price) {
        return Err(format!("spotPrice {price:?} is not a price"));
    }
    Ok(SpotItem {
        instance_type: field(item.instance_type, "instanceType")?,
        product_description: field(item.product_description, "productDescription")?,
        spot_price,
        timestamp: field(item.timestamp, "timestamp")?,
        availability_zone: field(item.availability_zone, "availabilityZone")?,
    })
}

/// Linux spot prices: EC2 writes `Linux/UNIX` (and `Linux/UNIX (Amazon VPC)` in older accounts).
pub(crate) fn is_linux(item: &SpotItem) -> bool {
    item.product_description == "Linux/UNIX" || item.product_description == "Linux/UNIX (Amazon VPC)"
}

/// Per instance type, the lowest of the zones' current prices (each zone's latest item).
pub(crate) fn lowest_current(items: &[SpotItem]) -> BTreeMap<String, f64> {
    let mut latest: BTreeMap<(&str, &str), &SpotItem> = BTreeMap::new();
    for item in items.iter().filter(|i| is_linux(i)) {
        let key = (item.instance_type.as_str(), item.availability_zone.as_str());
        match latest.get(&key) {
            Some(seen) if seen.timestamp >= item.timestamp => {}
            _ => {
                latest.insert(key, item);
            }
        }
    }
    let mut lowest: BTreeMap<String, f64> = BTreeMap::new();
    for ((instance_type, _), item) in latest {
        let entry = lowest.entry(instance_type.to_string()).or_insert(item.spot_price);
        *entry = entry.min(item.spot_price);
    }
    lowest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_reads_items_entities_and_the_token_and_skips_malformed_items() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
            <DescribeSpotPriceHistoryResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
              <requestId>r</requestId>
              <spotPriceHistorySet>
                <item><instanceType>p5.48xlarge</instanceType><productDescription>Linux/UNIX</productDescription>
                  <spotPrice> 31.5 </spotPrice><timestamp>2026-09-16T09:12:44.000Z</timestamp>
                  <availabilityZone>us-east-1a</availabilityZone><extra><x/></extra></item>
                <item><instanceType>g6</instanceType></item>
                <item><instanceType>g6</instanceType><productDescription>A &amp; B</productDescription>
                  <spotPrice>-1</spotPrice><timestamp>t</timestamp><availabilityZone>z</availabilityZone></item>
              </spotPriceHistorySet>
              <nextToken>a&lt;b</nextToken>
            </DescribeSpotPriceHistoryResponse>"#;
        let page = parse_spot_page(xml).unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0].spot_price, 31.5);
        assert_eq!(page.items[0].availability_zone, "us-east-1a");
        assert_eq!(page.next_token.as_deref(), Some("a<b"), "entities are decoded");
        assert_eq!(page.skipped.len(), 2, "{:?}", page.skipped);
        assert!(page.skipped[0].contains("item 1: no spotPrice"), "{:?}", page.skipped);
        assert!(page.skipped[1].contains("item 2: spotPrice \"-1\" is not a price"), "{:?}", page.skipped);
    }

    #[test]
    fn an_empty_set_or_token_is_a_last_page_and_other_answers_are_refused() {
        let last = "<R><spotPriceHistorySet/><nextToken/></R>";
        let page = parse_spot_page(last).unwrap();
        assert!(page.items.is_empty() && page.next_token.is_none());
        let error = "<Response><Errors><Error><Code>AuthFailure</Code></Error></Errors></Response>";
        assert_eq!(parse_spot_page(error).unwrap_err(), "no spotPriceHistorySet in the answer");
        assert!(parse_spot_page("{\"json\": true}").unwrap_err().starts_with("not a spot price history"));
    }

    fn item(az: &str, price: f64, timestamp: &str) -> SpotItem {
        SpotItem {
            instance_type: "p5.48xlarge".into(),
            product_description: "Linux/UNIX".into(),
            spot_price: price,
            timestamp: timestamp.into(),
            availability_zone: az.into(),
        }
    }

    #[test]
    fn the_lowest_current_price_ignores_older_prices_and_other_systems() {
        let items = vec![
            item("us-east-1a", 30.0, "2026-09-16T09:00:00.000Z"),
            item("us-east-1a", 10.0, "2026-09-15T09:00:00.000Z"),
            item("us-east-1b", 25.0, "2026-09-14T09:00:00.000Z"),
            SpotItem { product_description: "Windows".into(), ..item("us-east-1c", 1.0, "2026-09-16T09:00:00.000Z") },
        ];
        assert_eq!(lowest_current(&items).get("p5.48xlarge"), Some(&25.0));
    }
}
