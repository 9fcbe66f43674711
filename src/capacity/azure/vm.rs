//! The virtual machine resource as Resource Manager wants and returns it: the create body of a
//! launch (size, image, OS disk and NIC deleted with the VM, cloud-init in `customData`, spot
//! priority with eviction policy Delete) and the [`Instance`] read back from a VM.

use std::time::UNIX_EPOCH;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};

use crate::capacity::{Instance, InstanceState, LaunchSpec, TAG_BROKER, TAG_LAUNCH, TAG_SITE};
use crate::model::UnixMillis;
use crate::model::capacity::AzureLaunch;
use crate::model::price::Market;

/// The Compute API version of every VM call.
pub const COMPUTE_API_VERSION: &str = "2024-07-01";
/// The Network API version the VM creates its NIC with.
pub const NETWORK_API_VERSION: &str = "2022-11-01";
/// The most `customData` Azure takes, before base64.
pub const MAX_CUSTOM_DATA: usize = 65_535;

/// The body of `PUT …/virtualMachines/{launch_id}`.
pub fn create_body(spec: &LaunchSpec, launch: &AzureLaunch, location: &str) -> Value {
    let name = spec.launch_id.as_str();
    let mut properties = Map::new();
    properties.insert("hardwareProfile".into(), json!({ "vmSize": spec.instance_type }));
    properties.insert(
        "storageProfile".into(),
        json!({
            "imageReference": image_reference(&launch.image),
            "osDisk": { "createOption": "FromImage", "deleteOption": "Delete", "caching": "ReadWrite" },
        }),
    );
    properties.insert(
        "osProfile".into(),
        json!({
            "computerName": name,
            "adminUsername": launch.admin_username,
            "customData": B64.encode(spec.user_data.as_bytes()),
            "linuxConfiguration": {
                "disablePasswordAuthentication": true,
                "ssh": { "publicKeys": [{
                    "path": format!("/home/{}/.ssh/authorized_keys", launch.admin_username),
                    "keyData": launch.ssh_public_key.trim(),
                }] },
            },
        }),
    );
    properties.insert(
        "networkProfile".into(),
        json!({
            "networkApiVersion": NETWORK_API_VERSION,
            "networkInterfaceConfigurations": [{
                "name": format!("{name}-nic"),
                "properties": {
                    "primary": true,
                    "deleteOption": "Delete",
                    "ipConfigurations": [{
                        "name": format!("{name}-ip"),
                        "properties": { "primary": true, "subnet": { "id": launch.subnet_id } },
                    }],
                },
            }],
        }),
    );
    if spec.market == Market::Spot {
        properties.insert("priority".into(), json!("Spot"));
        properties.insert("evictionPolicy".into(), json!("Delete"));
        properties.insert("billingProfile".into(), json!({ "maxPrice": -1 }));
    }
    let mut body = json!({
        "location": location,
        "tags": { TAG_BROKER: spec.broker, TAG_SITE: spec.site, TAG_LAUNCH: spec.launch_id },
        "properties": properties,
    });
    if let Some(identity) = &launch.managed_identity {
        body["identity"] = json!({ "type": "UserAssigned", "userAssignedIdentities": { identity.as_str(): {} } });
    }
    body
}

/// An image resource id, or a marketplace URN `publisher:offer:sku:version`.
fn image_reference(image: &str) -> Value {
    let image = image.trim();
    match image.split(':').collect::<Vec<_>>()[..] {
        [publisher, offer, sku, version] if !image.starts_with('/') => {
            json!({ "publisher": publisher, "offer": offer, "sku": sku, "version": version })
        }
        _ => json!({ "id": image }),
    }
}

/// A tag of a VM resource.
pub fn tag<'v>(vm: &'v Value, name: &str) -> Option<&'v str> {
    vm.get("tags")?.get(name)?.as_str()
}

/// The instance a VM resource describes; `None` when it has no name.
pub fn instance(vm: &Value) -> Option<Instance> {
    let properties = vm.get("properties").unwrap_or(&Value::Null);
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let priority = text(properties.get("priority")).unwrap_or_default();
    Some(Instance {
        instance_id: text(vm.get("name"))?,
        launch_id: tag(vm, TAG_LAUNCH).map(str::to_owned),
        site: tag(vm, TAG_SITE).map(str::to_owned),
        instance_type: text(properties.pointer("/hardwareProfile/vmSize")).unwrap_or_default(),
        market: if matches!(priority.as_str(), "Spot" | "Low") { Market::Spot } else { Market::OnDemand },
        state: state(properties.get("provisioningState").and_then(Value::as_str).unwrap_or("")),
        launched_at: properties.get("timeCreated").and_then(Value::as_str).and_then(parse_time),
    })
}

/// The state a VM's `provisioningState` means. `Failed` and `Canceled` count as going away: a
/// launch deletes a VM whose creation failed.
pub fn state(provisioning_state: &str) -> InstanceState {
    match provisioning_state {
        "Succeeded" | "Updating" | "Migrating" => InstanceState::Running,
        "Deleting" | "Failed" | "Canceled" => InstanceState::Stopping,
        "Deleted" => InstanceState::Terminated,
        _ => InstanceState::Pending,
    }
}

/// Azure's timestamps: RFC 3339 with up to seven fraction digits and an offset
/// (`2026-12-06T19:30:00.1234567+00:00`).
pub fn parse_time(text: &str) -> Option<UnixMillis> {
    let text = text.trim();
    let (base, offset_minutes) = if let Some(base) = text.strip_suffix('Z') {
        (base, 0)
    } else if text.len() > 6 && matches!(text.as_bytes()[text.len() - 6], b'+' | b'-') {
        let (base, offset) = text.split_at(text.len() - 6);
        let (hours, minutes) = offset[1..].split_once(':')?;
        let minutes = hours.parse::<i64>().ok()? * 60 + minutes.parse::<i64>().ok()?;
        (base, if offset.starts_with('-') { -minutes } else { minutes })
    } else {
        (text, 0)
    };
    let at = humantime::parse_rfc3339_weak(base).ok()?;
    let millis = at.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64;
    Some(millis - offset_minutes * 60_000)
}

/// Whether `name` can be a VM name in a URL path (the launch ids and names this broker makes).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_timestamps_parse_with_offsets_and_seven_digits() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(parse_time("1970-01-01T00:00:01.1234567+00:00"), Some(1123));
        assert_eq!(parse_time("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_time("1970-01-01T00:00:00-00:30"), Some(1_800_000));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn images_are_ids_or_urns() {
        assert_eq!(image_reference("/subscriptions/s/images/i"), json!({ "id": "/subscriptions/s/images/i" }));
        assert_eq!(
            image_reference("Canonical:ubuntu-24_04-lts:server:latest"),
            json!({ "publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest" })
        );
    }

    #[test]
    fn provisioning_states_map_to_instance_states() {
        assert_eq!(state("Creating"), InstanceState::Pending);
        assert_eq!(state("Succeeded"), InstanceState::Running);
        assert_eq!(state("Deleting"), InstanceState::Stopping);
        assert!(valid_name("hbl-0123456789abcdef") && !valid_name("../x") && !valid_name(""));
    }
}
