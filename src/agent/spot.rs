//! The spot interruption watch of a launched cloud instance (`agent.cloud`): polls the instance
//! metadata service every `agent.spot_poll`; on a notice, every attempt is told at once (they
//! write the deadline to their preempt file, SIGTERM their process group, SIGKILL it at the
//! deadline and end `preempted`), and on Azure the event is acknowledged once they have stopped,
//! so that the VM may go without waiting for its deadline.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::metadata::{MetadataClient, SpotNotice};
use crate::config::agent::CloudKind;

/// The node's notice, once there is one: each attempt holds a receiver while it runs.
pub(super) type Notices = Arc<watch::Sender<Option<SpotNotice>>>;

/// How often the watch looks whether the attempts have stopped, after a notice.
const STOPPED_CHECK: Duration = Duration::from_millis(20);
/// Failed polls between two warnings (the first is always logged).
const WARN_EVERY: u32 = 60;

/// A new, empty notice channel.
pub(super) fn notices() -> Notices {
    Arc::new(watch::channel(None).0)
}

/// Polls until a notice comes, publishes it on `notices`, then acknowledges it (Azure) once no
/// attempt holds a receiver any more, or at the deadline.
pub(super) async fn watch(client: MetadataClient, period: Duration, notices: Notices) {
    let vm_name = match client.cloud() {
        // Scheduled events name the VMs they are about.
        CloudKind::Azure => loop {
            match client.instance_name().await {
                Ok(name) => break name,
                Err(e) => {
                    tracing::warn!("spot watch: the VM name: {e}; trying again");
                    tokio::time::sleep(period).await;
                }
            }
        },
        CloudKind::Aws => String::new(),
    };
    tracing::info!(period_ms = period.as_millis() as u64, "watching the instance metadata service for spot notices");
    let mut failures = 0u32;
    let notice = loop {
        match client.spot_notice(&vm_name).await {
            Ok(Some(notice)) => break notice,
            Ok(None) => failures = 0,
            Err(e) => {
                if failures.is_multiple_of(WARN_EVERY) {
                    tracing::warn!(failures, "spot watch: {e}");
                }
                failures += 1;
            }
        }
        tokio::time::sleep(period).await;
    };
    let attempts = notices.receiver_count();
    notices.send_replace(Some(notice.clone()));
    tracing::warn!(
        action = notice.action,
        deadline = %notice.deadline_rfc3339(),
        attempts,
        "spot interruption notice: stopping every attempt"
    );
    while notices.receiver_count() > 0 && notice.time_left(SystemTime::now()) > Duration::ZERO {
        tokio::time::sleep(STOPPED_CHECK).await;
    }
    match client.acknowledge(&notice).await {
        Ok(()) if notice.event_id.is_some() => tracing::info!(
            event = notice.event_id.as_deref().unwrap_or_default(),
            "spot interruption notice acknowledged: the attempts have stopped"
        ),
        Ok(()) => {}
        Err(e) => tracing::warn!("spot interruption notice not acknowledged: {e}"),
    }
}
