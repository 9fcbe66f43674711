//! EC2's XML answers, read with `quick-xml`'s serde support: the instances of `RunInstances`
//! (`instancesSet`) and `DescribeInstances` (`reservationSet` → `instancesSet`, `nextToken`), and
//! error documents (`<Response><Errors><Error><Code>`, `<Message>`). Elements the provider does not
//! use are skipped.

use quick_xml::Reader;
use quick_xml::events::Event;
use serde::Deserialize;

use crate::capacity::{Instance, InstanceState, TAG_LAUNCH, TAG_SITE};
use crate::model::UnixMillis;
use crate::model::price::Market;

/// A `RunInstancesResponse`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RunInstancesAnswer {
    instances_set: Option<ItemSet<WireInstance>>,
}

/// A `DescribeInstancesResponse`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeInstancesAnswer {
    reservation_set: Option<ItemSet<Reservation>>,
    next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reservation {
    instances_set: Option<ItemSet<WireInstance>>,
}

/// An EC2 Query list: `<fooSet><item>…</item>…</fooSet>`.
#[derive(Deserialize)]
pub(super) struct ItemSet<T> {
    #[serde(rename = "item", default = "Vec::new")]
    pub items: Vec<T>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireInstance {
    instance_id: Option<String>,
    instance_type: Option<String>,
    instance_state: Option<WireState>,
    launch_time: Option<String>,
    instance_lifecycle: Option<String>,
    tag_set: Option<ItemSet<WireTag>>,
}

#[derive(Deserialize)]
struct WireState {
    code: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct WireTag {
    key: Option<String>,
    value: Option<String>,
}

/// One page of `DescribeInstances`.
#[derive(Debug, Default)]
pub(super) struct InstancesPage {
    pub instances: Vec<Instance>,
    pub next_token: Option<String>,
}

/// The instances a `RunInstances` answer holds.
pub(super) fn parse_run_instances(xml: &str) -> Result<Vec<Instance>, String> {
    let answer: RunInstancesAnswer =
        quick_xml::de::from_str(xml).map_err(|e| format!("not a RunInstances answer: {e}"))?;
    let set = answer.instances_set.ok_or("no instancesSet in the RunInstances answer")?;
    set.items.into_iter().map(instance).collect()
}

/// One page of a `DescribeInstances` answer.
pub(super) fn parse_describe_instances(xml: &str) -> Result<InstancesPage, String> {
    let answer: DescribeInstancesAnswer =
        quick_xml::de::from_str(xml).map_err(|e| format!("not a DescribeInstances answer: {e}"))?;
    let mut page = InstancesPage::default();
    for reservation in answer.reservation_set.map(|s| s.items).unwrap_or_default() {
        for wire in reservation.instances_set.map(|s| s.items).unwrap_or_default() {
            page.instances.push(instance(wire)?);
        }
    }
    page.next_token = answer.next_token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
    Ok(page)
}

fn instance(wire: WireInstance) -> Result<Instance, String> {
    let instance_id = wire.instance_id.map(|i| i.trim().to_owned()).filter(|i| !i.is_empty());
    let instance_id = instance_id.ok_or("an instance without instanceId")?;
    let state = wire.instance_state.ok_or_else(|| format!("instance {instance_id} without instanceState"))?;
    let state = instance_state(state.code.as_deref(), state.name.as_deref())
        .ok_or_else(|| format!("instance {instance_id}: unknown instanceState"))?;
    let tags = wire.tag_set.map(|s| s.items).unwrap_or_default();
    let tag = |name: &str| {
        tags.iter()
            .find(|t| t.key.as_deref().map(str::trim) == Some(name))
            .map(|t| t.value.as_deref().unwrap_or("").trim().to_owned())
    };
    let market = match wire.instance_lifecycle.as_deref().map(str::trim) {
        Some("spot") => Market::Spot,
        _ => Market::OnDemand,
    };
    Ok(Instance {
        launch_id: tag(TAG_LAUNCH),
        site: tag(TAG_SITE),
        instance_type: wire.instance_type.unwrap_or_default().trim().to_owned(),
        market,
        state,
        launched_at: wire.launch_time.as_deref().and_then(parse_time),
        instance_id,
    })
}

/// EC2's state by its code (the low byte; the high byte is internal), else by its name:
/// pending 0, running 16, shutting-down 32, terminated 48, stopping 64, stopped 80.
fn instance_state(code: Option<&str>, name: Option<&str>) -> Option<InstanceState> {
    let by_code = code.and_then(|c| c.trim().parse::<u32>().ok()).and_then(|c| match c & 0xff {
        0 => Some(InstanceState::Pending),
        16 => Some(InstanceState::Running),
        32 | 64 | 80 => Some(InstanceState::Stopping),
        48 => Some(InstanceState::Terminated),
        _ => None,
    });
    by_code.or_else(|| match name.map(str::trim)? {
        "pending" => Some(InstanceState::Pending),
        "running" => Some(InstanceState::Running),
        "shutting-down" | "stopping" | "stopped" => Some(InstanceState::Stopping),
        "terminated" => Some(InstanceState::Terminated),
        _ => None,
    })
}

/// `2026-12-06T19:29:26.000Z` (EC2 writes UTC, with or without milliseconds) as Unix milliseconds.
pub(super) fn parse_time(text: &str) -> Option<UnixMillis> {
    let text = text.trim().strip_suffix('Z')?;
    let (date, clock) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i32>().ok());
    let (year, month, day) = (d.next()??, d.next()??, d.next()??);
    let (clock, fraction) = clock.split_once('.').unwrap_or((clock, "0"));
    let mut c = clock.split(':').map(|p| p.parse::<u8>().ok());
    let (hour, minute, second) = (c.next()??, c.next()??, c.next()??);
    if d.next().is_some() || c.next().is_some() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let millis: i64 = format!("{fraction:0<3}")[..3].parse().ok()?;
    let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year, month, u8::try_from(day).ok()?).ok()?;
    let at = date.with_hms(hour, minute, second).ok()?.assume_utc();
    Some(at.unix_timestamp() * 1000 + millis)
}

/// The `Code` and `Message` of an EC2 error document (`<Response><Errors><Error>…`, or the
/// `<ErrorResponse><Error>…` other AWS query services write); `None` when there is no `Code`.
pub(super) fn parse_error(xml: &str) -> Option<(String, String)> {
    let mut reader = Reader::from_str(xml);
    // The element whose text is being read: 0 = Code, 1 = Message.
    let mut open: Option<usize> = None;
    let mut found: [Option<String>; 2] = [None, None];
    loop {
        let piece = match reader.read_event().ok()? {
            Event::Start(e) => {
                open = match e.local_name().as_ref() {
                    b"Code" if found[0].is_none() => Some(0),
                    b"Message" if found[1].is_none() => Some(1),
                    _ => None,
                };
                None
            }
            Event::Text(t) => Some(t.decode().ok()?.into_owned()),
            Event::GeneralRef(r) => {
                let entity = format!("&{};", r.decode().ok()?);
                Some(quick_xml::escape::unescape(&entity).map(|t| t.into_owned()).unwrap_or(entity))
            }
            Event::End(_) => {
                open = None;
                None
            }
            Event::Eof => break,
            _ => None,
        };
        if let (Some(index), Some(piece)) = (open, piece) {
            found[index].get_or_insert_default().push_str(&piece);
        }
    }
    let [code, message] = found;
    let code = code.map(|c| c.trim().to_owned()).filter(|c| !c.is_empty())?;
    Some((code, message.unwrap_or_default().trim().to_owned()))
}
