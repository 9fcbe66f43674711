//! EC2 `DescribeSpotPriceHistory` answers: the EC2 API speaks the query protocol and answers in
//! XML (`DescribeSpotPriceHistoryResponse` → `spotPriceHistorySet` → `item`, and `nextToken`).
//! The shape is small and fixed, so a tiny tag scanner reads it; no XML crate is needed.

use std::collections::BTreeMap;

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

/// Reads one page; an answer without a `spotPriceHistorySet` is not a spot price history.
pub(crate) fn parse_spot_page(xml: &str) -> Result<SpotPage, String> {
    let set = element(xml, "spotPriceHistorySet").ok_or("no spotPriceHistorySet in the answer")?;
    let mut page = SpotPage::default();
    for (index, item) in elements(set, "item").into_iter().enumerate() {
        match parse_item(item) {
            Ok(item) => page.items.push(item),
            Err(e) => page.skipped.push(format!("skipping malformed spot price item {index}: {e}")),
        }
    }
    // `nextToken` is a sibling of the set: look only outside it.
    let start = set.as_ptr() as usize - xml.as_ptr() as usize;
    let token = element(&xml[start + set.len()..], "nextToken").or_else(|| element(&xml[..start], "nextToken"));
    page.next_token = token.map(unescape).filter(|t| !t.is_empty());
    Ok(page)
}

fn parse_item(item: &str) -> Result<SpotItem, String> {
    let field = |tag: &str| element(item, tag).map(unescape).ok_or_else(|| format!("no {tag}"));
    let price = field("spotPrice")?;
    let spot_price = price.trim().parse::<f64>().map_err(|_| format!("spotPrice {price:?} is not a number"))?;
    if !super::valid_price(spot_price) {
        return Err(format!("spotPrice {price:?} is not a price"));
    }
    Ok(SpotItem {
        instance_type: field("instanceType")?,
        product_description: field("productDescription")?,
        spot_price,
        timestamp: field("timestamp")?,
        availability_zone: field("availabilityZone")?,
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

/// The text inside the first `<tag>…</tag>` (empty for `<tag/>`).
fn element<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    elements(xml, tag).into_iter().next()
}

/// The text inside each `<tag>…</tag>` in order (an element may not contain one of its own name).
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        // `<itemSet>` is not `<item>`: the name must end here.
        if !after.starts_with(['>', '/', ' ', '\t', '\n', '\r']) {
            rest = after;
            continue;
        }
        let Some(end_of_tag) = after.find('>') else { break };
        if after[..end_of_tag].ends_with('/') {
            out.push("");
            rest = &after[end_of_tag + 1..];
            continue;
        }
        let body = &after[end_of_tag + 1..];
        let Some(end) = body.find(&close) else { break };
        out.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    out
}

/// XML's five predefined entities (EC2 values use no others).
fn unescape(text: &str) -> String {
    text.trim()
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scanner_tells_similar_names_and_empty_elements_apart() {
        let xml = "<a><itemSet>x</itemSet><item>1</item><item attr=\"v\">2</item><item/><nextToken/></a>";
        assert_eq!(elements(xml, "item"), vec!["1", "2", ""]);
        assert_eq!(element(xml, "itemSet"), Some("x"));
        assert_eq!(element(xml, "nextToken"), Some(""));
        assert_eq!(element(xml, "missing"), None);
        assert_eq!(unescape(" a &amp;lt; &lt;b&gt; "), "a &lt; <b>");
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
