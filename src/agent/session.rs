//! The agent's stream to the broker: connect, register, heartbeat, take assignments, report; on
//! any failure reconnect with jittered exponential backoff (the [`RetryPolicy`] every retry loop
//! shares). Attempt events are handled while disconnected too, so attempts keep running and their
//! results wait for the next session.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Agent, AttemptEvent, ClientTls, broker_target};
use crate::model::retry::RetryPolicy;
use crate::proto::agent_service_client::AgentServiceClient;
use crate::proto::{self, agent_message::Msg as Out, broker_message::Msg as In};
use crate::tls;

/// Messages queued for the broker; output chunks are dropped (never updates) when it is full.
const OUTBOX: usize = 1024;

/// Why a session ended, and the pause the broker asked for before the next (`Reconnect`).
struct End(String, Option<Duration>);

impl End {
    fn because(why: impl Into<String>) -> Self {
        End(why.into(), None)
    }
}

pub(super) async fn run_sessions(
    agent: &mut Agent,
    client_tls: ClientTls,
    events: &mut mpsc::Receiver<AttemptEvent>,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let reconnect = &agent.config.reconnect;
    let policy = reconnect_policy(reconnect.min_backoff.0, reconnect.max_backoff.0);
    // Sessions that ended in a row without registering, the last one included.
    let mut failures = 0u32;
    loop {
        let Some((registered, end)) = session(agent, &client_tls, events, &mut shutdown).await else { return };
        tracing::warn!(agent = agent.identity.agent_id(), "broker session ended: {}", end.0);
        crate::telemetry::notify::status(&format!("reconnecting: {}", end.0));
        failures = if registered { 1 } else { failures.saturating_add(1) };
        // A broker going away says when to come back (spread over its agents); failed attempts
        // after that back off as usual.
        let pause = end.1.unwrap_or_else(|| policy.delay(failures, None, fastrand::f64()));
        let until = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep_until(until) => break,
                Some(ev) = events.recv() => { agent.on_event(ev); }
            }
        }
    }
}

/// Reconnects: doubling from `min` to `max` while sessions fail to register, back to `min` after
/// one that did; up to half of each pause taken off at random so that agents that lost the broker
/// together do not all come back at once.
fn reconnect_policy(min: Duration, max: Duration) -> RetryPolicy {
    RetryPolicy::exponential(min, max).with_jitter(0.5)
}

/// How long an agent that is stopping waits for the broker to close its side of the stream.
const HANGUP_WAIT: Duration = Duration::from_secs(2);

/// One session; returns whether it got as far as registering, and why it ended; `None` when
/// `shutdown` came first (the stream then ended cleanly: our side first, then the broker's).
async fn session<F: Future<Output = ()>>(
    agent: &mut Agent,
    client_tls: &ClientTls,
    events: &mut mpsc::Receiver<AttemptEvent>,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Option<(bool, End)> {
    let (url, server_name) = broker_target(&agent.config);
    let connect = tls::connect(&url, client_tls.clone(), server_name.as_deref());
    let channel = match tokio::select! { c = connect => c, () = shutdown.as_mut() => return None } {
        Ok(channel) => channel,
        Err(e) => return Some((false, End::because(e.to_string()))),
    };
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(OUTBOX);
    let register = proto::AgentMessage { msg: Some(Out::Register(agent.register())) };
    tx.try_send(register).expect("a new outbox has room");
    let opened =
        tokio::select! { o = client.session(ReceiverStream::new(rx)) => o, () = shutdown.as_mut() => return None };
    let mut inbound = match opened {
        Ok(response) => response.into_inner(),
        Err(status) => return Some((false, End::because(tls::explain_status(&status)))),
    };
    let mut registered = false;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
    heartbeat.reset();
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(proto::BrokerMessage { msg: Some(msg) })) => {
                    // The broker is going away: end the request stream (returning drops it) and
                    // come back after its pause; attempts keep running meanwhile.
                    if let In::Reconnect(r) = &msg {
                        let after = Duration::from_millis(u64::from(r.after_ms));
                        tracing::info!(reason = r.reason, ?after, "the broker asked to reconnect");
                        return Some((registered, End(format!("the broker asked to reconnect: {}", r.reason), Some(after))));
                    }
                    if let In::Registered(r) = &msg {
                        registered = true;
                        let every = Duration::from_millis(u64::from(r.heartbeat_interval_ms.max(50)));
                        heartbeat = tokio::time::interval(every);
                        heartbeat.reset();
                        tracing::info!(agent = r.agent_id, "registered with the broker");
                        crate::telemetry::notify::status(&format!("registered with the broker as {}", r.agent_id));
                    }
                    if let Some(reply) = on_message(agent, msg)
                        && !send(&tx, reply) {
                            return Some((registered, End::because("outbox full")));
                        }
                }
                Ok(Some(_)) => {}
                Ok(None) => return Some((registered, End::because("the broker closed the stream"))),
                Err(status) => return Some((registered, End::because(tls::explain_status(&status)))),
            },
            Some(ev) = events.recv() => {
                let is_output = matches!(ev, AttemptEvent::Output { .. });
                if let Some(msg) = agent.on_event(ev) {
                    let msg = proto::AgentMessage { msg: Some(msg) };
                    if is_output {
                        let _ = tx.try_send(msg); // output is best effort; the work dir keeps all of it
                    } else if tx.send(msg).await.is_err() {
                        return Some((registered, End::because("stream closed")));
                    }
                }
            }
            () = shutdown.as_mut() => {
                // End our half, and give the broker a moment to end its own: the stream closes
                // cleanly instead of being reset.
                drop(tx);
                let hangup = async { while let Ok(Some(_)) = inbound.message().await {} };
                let clean = tokio::time::timeout(HANGUP_WAIT, hangup).await.is_ok();
                tracing::info!(clean, "broker session ended: the agent is stopping");
                return None;
            }
            () = tokio::time::sleep(agent.renewal_due_in()), if registered => {
                if let Some(renew) = agent.renewal_request()
                    && !send(&tx, renew) {
                        return Some((registered, End::because("outbox full")));
                    }
            }
            _ = heartbeat.tick() => {
                let hb = Out::Heartbeat(proto::Heartbeat { inventory: Some(agent.inventory().into()) });
                if !send(&tx, hb) {
                    return Some((registered, End::because("outbox full")));
                }
            }
        }
        if tx.is_closed() {
            return Some((registered, End::because("the request stream closed")));
        }
    }
}

fn send(tx: &mpsc::Sender<proto::AgentMessage>, msg: Out) -> bool {
    tx.try_send(proto::AgentMessage { msg: Some(msg) }).is_ok()
}

/// Applies one broker message; returns what to report back.
fn on_message(agent: &mut Agent, msg: In) -> Option<Out> {
    match msg {
        In::Registered(_) => None,
        In::Assign(a) => {
            tracing::info!(job = a.job_id, attempt = a.attempt, gpus = ?a.gpu_indices, "assigned");
            agent.start(a).map(|r| Out::Update(r.into()))
        }
        In::Stop(s) => {
            agent.stop(&s);
            None
        }
        In::Ack(ack) => {
            agent.ack(&ack);
            None
        }
        In::Renewed(renewed) => {
            agent.renewed(renewed);
            None
        }
        // Reconnect ends the session (`session`).
        In::Reconnect(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_pauses_double_from_min_to_max_with_up_to_half_taken_off() {
        let policy = reconnect_policy(Duration::from_millis(200), Duration::from_secs(10));
        let mut rng = fastrand::Rng::with_seed(13);
        for failures in 1..=12u32 {
            let longest = Duration::from_millis(200 << (failures - 1)).min(Duration::from_secs(10));
            for _ in 0..50 {
                let pause = policy.delay(failures, None, rng.f64());
                assert!(pause <= longest && pause >= longest / 2, "failure {failures}: {pause:?}");
            }
        }
    }
}
