//! The poll task: owns rumqttc's event loop, hands each message to the committer under a
//! permit, and writes each commit group's PUBACKs into the connection with one flush.

use super::config::MqttConfig;
use super::status::IngestStatus;
use super::subscriptions::{Resubscribed, SubscriptionChange, Subscriptions, filter_diff};
use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::telemetry::RateLimit;
use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, Packet, QoS, SubscribeFilter,
    SubscribeReasonCode,
};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// One message received from the broker, on its way to the journal.
pub(super) struct Incoming {
    pub(super) generation: u64,
    /// Counts every connection (the ack `generation` changes only when the broker lost the
    /// session): the committer looks up the first messages of each one by identity.
    pub(super) connection: u64,
    pub(super) pkid: u16,
    pub(super) qos: QoS,
    pub(super) dup: bool,
    pub(super) topic: String,
    pub(super) payload: Bytes,
    pub(super) received_ms: i64,
    pub(super) received_at: Instant,
    pub(super) subscription: Option<usize>,
    /// A new subscription table (after a reload), carried by the first message matched with
    /// it: from this message on the committer decodes with it.
    pub(super) table: Option<Arc<Subscriptions>>,
    pub(super) permit: OwnedSemaphorePermit,
}

/// An acknowledgement to send once everything before it is durable.
///
/// It carries no permit: the permit (the memory bound on undecided messages) is returned as
/// soon as the message is durable. Tying it to the acknowledgement instead would deadlock:
/// acks leave only while the event loop is polled, and the poll task waits for permits.
pub(super) struct AckRequest {
    pub(super) generation: u64,
    pub(super) pkid: u16,
    pub(super) qos: QoS,
}

/// Connection state, logged once per change rather than once per attempt.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum LinkState {
    Connecting,
    Up,
    Down(String),
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn poll_loop(
    cfg: &MqttConfig,
    client: AsyncClient,
    eventloop: &mut EventLoop,
    in_tx: mpsc::Sender<Incoming>,
    permits: Arc<Semaphore>,
    generation: Arc<AtomicU64>,
    status: Arc<IngestStatus>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
    mut acks: mpsc::UnboundedReceiver<Vec<AckRequest>>,
    clock: &crate::clock::GatewayClock,
    blocked: &AtomicBool,
    mut subs: SubscriptionState,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), cfg.reconnect_max);
    let mut state = LinkState::Connecting;
    let mut in_tx = Some(in_tx);
    let mut ever_connected = false;
    let mut connection = 0u64;
    let stalls = RateLimit::new(Duration::from_secs(10));
    loop {
        if in_tx.is_none() {
            break;
        }
        let ev = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                in_tx = None;
                continue;
            }
            Some(group) = acks.recv() => {
                let since = Instant::now();
                write_acks(eventloop, group, &generation).await;
                slow_wait(&stalls, (&status, blocked), Wait::AckWrite, since);
                continue;
            }
            Some(change) = subs.next_change() => {
                subs.change(change, &client, state == LinkState::Up);
                continue;
            }
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    continue;
                }
                backoff.reset();
                connection += 1;
                if ever_connected {
                    status.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                if !ack.session_present
                    && (ever_connected || status.expect_session.load(Ordering::Relaxed))
                {
                    // A persistent session (clean_session = false) that the broker should
                    // have kept: it restarted without persistence, or saved it too rarely
                    // (Mosquitto's autosave_interval), or expired it. Whatever it queued for
                    // edgeferry meanwhile is gone, and edgeferry cannot know how much.
                    status.sessions_lost.fetch_add(1, Ordering::Relaxed);
                    status
                        .last_session_lost_ms
                        .store(crate::clock::now_ms(), Ordering::Relaxed);
                    metrics::counter!("edgeferry_ingest_sessions_lost_total").increment(1);
                    tracing::warn!(
                        "the broker {} did not keep edgeferry's session (session_present = \
                         false): messages it queued while edgeferry was away may be lost; check \
                         its persistence and autosave_interval (README)",
                        cfg.url
                    );
                }
                ever_connected = true;
                if !ack.session_present {
                    // Acks still queued for the previous connection would now acknowledge
                    // *new* messages that reuse those packet ids; a new generation makes the
                    // ack task drop them (their messages are durable already).
                    generation.fetch_add(1, Ordering::SeqCst);
                }
                status.connected.store(true, Ordering::Relaxed);
                status.set_error(None);
                if state != LinkState::Up {
                    tracing::info!(
                        session_present = ack.session_present,
                        "connected to MQTT broker {}",
                        cfg.url
                    );
                    state = LinkState::Up;
                }
                // Subscribe on every connect: rumqttc does not resubscribe when the broker
                // lost the session, and re-subscribing a live session is harmless.
                subs.on_connect(&client, ack.session_present);
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Subscribe(pkid))) => subs.sent(pkid),
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let Some(request) = subs.acknowledged(ack.pkid) else {
                    continue;
                };
                let refused: Vec<_> = ack
                    .return_codes
                    .iter()
                    .zip(&request.filters)
                    .filter(|(c, _)| matches!(c, SubscribeReasonCode::Failure))
                    .map(|(_, f)| f.as_str())
                    .collect();
                let reload = request.done.is_some();
                if refused.is_empty() {
                    // Logged before READY goes out, so the log reads in the order things
                    // happened: the daemon's "ready" line follows this one.
                    tracing::info!(filters = ?request.filters, "subscribed with QoS 1");
                    if !reload {
                        status.subscribed.store(true, Ordering::Relaxed);
                        let _ = ready.send(true);
                    }
                    if let Some(done) = request.done {
                        let _ = done.send(Ok(Resubscribed::Acknowledged));
                    }
                } else {
                    tracing::error!(
                        ?refused,
                        "the broker refused these subscriptions; check its ACLs for this user"
                    );
                    status.set_error(Some(format!("subscription refused: {refused:?}")));
                    if let Some(done) = request.done {
                        let _ = done.send(Err(format!(
                            "the broker refused the subscriptions {refused:?}; check its ACLs \
                             for this user"
                        )));
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                status.messages.fetch_add(1, Ordering::Relaxed);
                if p.retain {
                    // A retained copy is resent on every (re)subscribe; it is a reading we
                    // saw live already (or a stale one from before edgeferry ran).
                    metrics::counter!("edgeferry_ingest_retained_ignored_total").increment(1);
                    // Acknowledge through the same ordered path as everything else.
                    let since = Instant::now();
                    let permit = acquire(&permits, &shutdown).await;
                    slow_wait(&stalls, (&status, blocked), Wait::Permits, since);
                    let Some(permit) = permit else {
                        in_tx = None;
                        continue;
                    };
                    let mut marker = retained_marker(&p, &generation, connection, permit);
                    marker.table = subs.handover.take();
                    forward(&mut in_tx, &shutdown, marker).await;
                    continue;
                }
                let subscription = subs.table.matching(&p.topic);
                let since = Instant::now();
                let permit = acquire(&permits, &shutdown).await;
                slow_wait(&stalls, (&status, blocked), Wait::Permits, since);
                let Some(permit) = permit else {
                    in_tx = None;
                    continue;
                };
                let incoming = Incoming {
                    generation: generation.load(Ordering::SeqCst),
                    connection,
                    pkid: p.pkid,
                    qos: p.qos,
                    dup: p.dup,
                    topic: p.topic,
                    payload: p.payload,
                    received_ms: clock.arrival_ms(),
                    received_at: Instant::now(),
                    subscription,
                    table: subs.handover.take(),
                    permit,
                };
                let since = Instant::now();
                forward(&mut in_tx, &shutdown, incoming).await;
                slow_wait(&stalls, (&status, blocked), Wait::Committer, since);
            }
            Ok(_) => {}
            Err(e) => {
                status.connected.store(false, Ordering::Relaxed);
                status.subscribed.store(false, Ordering::Relaxed);
                subs.disconnected();
                let mut msg = e.to_string();
                if matches!(
                    e,
                    rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                        rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)
                    ))
                ) {
                    msg = format!(
                        "{msg}: a message larger than {} bytes is stuck in the broker's queue; \
                         set `message_size_limit` in mosquitto.conf below that",
                        cfg.packet_limit()
                    );
                }
                status.set_error(Some(msg.clone()));
                // Compare without digits: the same failure often carries a changing time
                // or counter, and must still be logged once, not once per attempt.
                let next = LinkState::Down(crate::telemetry::failure_key(&msg));
                if state != next {
                    tracing::warn!(
                        "MQTT broker {} unreachable: {msg}; retrying with backoff",
                        cfg.url
                    );
                    state = next;
                }
                let pause = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.cancelled() => { in_tx = None; }
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
    // Flush: the committer commits what it already has and then drops its sender; write
    // every acknowledgement it sends until then (bounded by a deadline), then say goodbye.
    // Anything received but not committed stays unacknowledged and the broker redelivers it
    // to the next session.
    drop(in_tx);
    let deadline = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            biased;
            _ = &mut deadline => break,
            g = acks.recv() => match g {
                Some(group) => write_acks(eventloop, group, &generation).await,
                None => break,
            },
            ev = eventloop.poll() => if ev.is_err() { break },
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// One SUBSCRIBE the poll task sent: its filters (the SUBACK's codes are in their order) and,
/// for a reload's, who waits for the answer.
pub(super) struct SubscribeRequest {
    filters: Vec<String>,
    done: Option<oneshot::Sender<Result<Resubscribed, String>>>,
}

/// The poll task's side of the subscriptions: the table it matches topics with, the one to
/// hand to the committer, and the SUBSCRIBEs waiting for their SUBACK.
pub(super) struct SubscriptionState {
    table: Arc<Subscriptions>,
    /// Set when a reload replaced `table`; taken by the next message forwarded.
    handover: Option<Arc<Subscriptions>>,
    changes: Option<mpsc::Receiver<SubscriptionChange>>,
    /// Queued in rumqttc, not yet sent (rumqttc gives the packet id when it sends).
    queued: VecDeque<SubscribeRequest>,
    /// Sent, waiting for the SUBACK with this packet id.
    sent: HashMap<u16, SubscribeRequest>,
    /// Filters removed while the broker was away: the persistent session still holds them,
    /// so they are unsubscribed at the next connect.
    unsubscribe_owed: Vec<String>,
}

impl SubscriptionState {
    pub(super) fn new(
        table: Arc<Subscriptions>,
        changes: Option<mpsc::Receiver<SubscriptionChange>>,
    ) -> Self {
        SubscriptionState {
            table,
            handover: None,
            changes,
            queued: VecDeque::new(),
            sent: HashMap::new(),
            unsubscribe_owed: Vec::new(),
        }
    }

    /// The next reload's change; pending for ever once nobody can send one.
    async fn next_change(&mut self) -> Option<SubscriptionChange> {
        if let Some(rx) = self.changes.as_mut() {
            if let Some(change) = rx.recv().await {
                return Some(change);
            }
            self.changes = None;
        }
        std::future::pending().await
    }

    fn subscribe(
        &mut self,
        client: &AsyncClient,
        filters: Vec<String>,
        done: Option<oneshot::Sender<Result<Resubscribed, String>>>,
    ) {
        let packet = filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        match client.try_subscribe_many(packet) {
            Ok(()) => self.queued.push_back(SubscribeRequest { filters, done }),
            Err(e) => {
                tracing::error!("cannot queue subscription: {e}");
                if let Some(done) = done {
                    let _ = done.send(Err(format!("cannot queue the subscription: {e}")));
                }
            }
        }
    }

    fn unsubscribe(client: &AsyncClient, filters: &[String]) {
        for f in filters {
            match client.try_unsubscribe(f.clone()) {
                Ok(()) => tracing::info!(filter = %f, "unsubscribed"),
                Err(e) => tracing::error!(filter = %f, "cannot queue unsubscription: {e}"),
            }
        }
    }

    /// Connected: subscribe every filter in effect, unsubscribe those a reload removed while
    /// the broker was away.
    ///
    /// SUBSCRIBEs still queued in rumqttc when the connection broke (a reload's, or the
    /// previous connect's) are sent first after a connect that resumes the session, and
    /// dropped by rumqttc after one that does not. The queue here follows suit, or the next
    /// SUBACK would be matched to the wrong request: READY on a SUBACK that covered only some
    /// filters, a refusal reported against the wrong ones. A dropped reload's request is
    /// answered by dropping its sender ("made at the reconnect"): this connect's
    /// subscription covers its filters.
    fn on_connect(&mut self, client: &AsyncClient, session_present: bool) {
        if !session_present {
            self.queued.clear();
        }
        self.subscribe(client, self.table.filters.clone(), None);
        let owed = std::mem::take(&mut self.unsubscribe_owed);
        Self::unsubscribe(client, &owed);
    }

    /// The connection broke: SUBSCRIBEs sent and not answered are lost with it (rumqttc does
    /// not send them again) and answered by the next connect's; those not sent yet stay
    /// queued (see [`SubscriptionState::on_connect`]).
    fn disconnected(&mut self) {
        self.sent.clear();
    }

    fn sent(&mut self, pkid: u16) {
        if let Some(r) = self.queued.pop_front() {
            self.sent.insert(pkid, r);
        }
    }

    fn acknowledged(&mut self, pkid: u16) -> Option<SubscribeRequest> {
        self.sent.remove(&pkid)
    }

    /// A reload's new subscriptions: swap the table (handed to the committer with the next
    /// message), then subscribe what is new and unsubscribe what is gone, now if `connected`,
    /// else at the next connect.
    fn change(&mut self, change: SubscriptionChange, client: &AsyncClient, connected: bool) {
        let table = match self.table.reloaded(&change.subscribe) {
            Ok(t) => Arc::new(t),
            Err(e) => {
                let _ = change.done.send(Err(e.to_string()));
                return;
            }
        };
        let (added, removed) = filter_diff(&self.table.filters, &table.filters);
        self.unsubscribe_owed.retain(|f| !table.filters.contains(f));
        self.table = table.clone();
        self.handover = Some(table);
        if !connected {
            self.unsubscribe_owed.extend(removed);
            let _ = change.done.send(Ok(Resubscribed::AtReconnect));
            return;
        }
        Self::unsubscribe(client, &removed);
        if added.is_empty() {
            let _ = change.done.send(Ok(Resubscribed::Acknowledged));
        } else {
            self.subscribe(client, added, Some(change.done));
        }
    }
}

/// A retained delivery only needs its acknowledgement, in order with the rest.
pub(super) fn retained_marker(
    p: &rumqttc::Publish,
    generation: &AtomicU64,
    connection: u64,
    permit: OwnedSemaphorePermit,
) -> Incoming {
    Incoming {
        generation: generation.load(Ordering::SeqCst),
        connection,
        pkid: p.pkid,
        qos: p.qos,
        dup: p.dup,
        topic: String::new(),
        payload: Bytes::new(),
        // Never journaled (the message carries no readings): the wall clock is label enough.
        received_ms: now_ms(),
        received_at: Instant::now(),
        subscription: None,
        table: None,
        permit,
    }
}

/// Waits of the poll loop longer than this are logged and counted: meanwhile edgeferry reads
/// nothing from the broker and acknowledges nothing, so a stall of the whole chain shows up
/// here if edgeferry is its cause (and not here if the broker is).
pub(super) const SLOW_WAIT: Duration = Duration::from_millis(250);

/// What the poll loop waited for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Wait {
    /// Writing a commit group's PUBACKs into the socket (the broker is not reading).
    AckWrite,
    /// A memory permit (`max_unacked` messages received and not yet committed).
    Permits,
    /// Room in the committer's queue.
    Committer,
}

impl Wait {
    fn label(self) -> &'static str {
        match self {
            Wait::AckWrite => "ack_write",
            Wait::Permits => "permits",
            Wait::Committer => "committer_queue",
        }
    }
}

pub(super) fn slow_wait(
    limit: &RateLimit,
    (status, blocked): (&IngestStatus, &AtomicBool),
    what: Wait,
    since: Instant,
) {
    let waited = since.elapsed();
    if waited < SLOW_WAIT {
        return;
    }
    metrics::counter!("edgeferry_ingest_poll_stalls_total", "cause" => what.label()).increment(1);
    if let Some(hidden) = limit.check(what.label()) {
        tracing::warn!(
            waited_ms = waited.as_millis() as u64,
            similar_hidden = hidden,
            "MQTT poll loop stalled waiting for {what:?}: nothing read from or acknowledged to the broker meanwhile; {}",
            stall_cause(
                what,
                status.journal_error(),
                blocked.load(Ordering::Relaxed)
            )
        );
    }
}

/// What a field engineer should read into a stall: edgeferry holding back on purpose (the
/// quota's `block` policy, a disk that cannot write) or a backlog being drained.
pub(super) fn stall_cause(what: Wait, journal_error: Option<String>, blocked: bool) -> String {
    match (what, blocked, journal_error) {
        (Wait::AckWrite, _, _) => {
            "the broker is not reading its socket (overloaded, or the link to it is stuck)".into()
        }
        (_, true, _) => "cause: store.max_disk is reached and store.when_full = \"block\" holds \
             ingest back until the upstream drains the outbox; the broker keeps the messages"
            .into(),
        (_, false, Some(e)) => {
            format!(
                "cause: the journal cannot write ({e}); retrying, the broker keeps the messages"
            )
        }
        (_, false, None) => "cause: messages arrive faster than the journal commits them, as \
             when the broker delivers a backlog it kept (after a restart or reconnect); it \
             catches up by itself"
            .into(),
    }
}

pub(super) async fn acquire(
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = permits.clone().try_acquire_owned() {
        return Some(p);
    }
    metrics::counter!("edgeferry_ingest_backpressure_total").increment(1);
    tokio::select! {
        p = permits.clone().acquire_owned() => p.ok(),
        _ = shutdown.cancelled() => None,
    }
}

pub(super) async fn forward(
    in_tx: &mut Option<mpsc::Sender<Incoming>>,
    shutdown: &CancellationToken,
    incoming: Incoming,
) {
    let Some(tx) = in_tx.as_ref() else { return };
    // Almost always there is room: skip the select! (and its cancellation waiter).
    let incoming = match tx.try_send(incoming) {
        Ok(()) => return,
        Err(mpsc::error::TrySendError::Closed(_)) => {
            *in_tx = None;
            return;
        }
        Err(mpsc::error::TrySendError::Full(m)) => m,
    };
    tokio::select! {
        r = tx.send(incoming) => if r.is_err() { *in_tx = None; },
        _ = shutdown.cancelled() => { *in_tx = None; }
    }
}

/// Publishes alerts on the local broker (QoS 1). A separate task because `publish` can wait
/// for room in rumqttc's request queue, which must never stall the poll loop.
pub(super) async fn publish_loop(
    client: AsyncClient,
    mut rx: mpsc::Receiver<crate::model::Publication>,
) {
    while let Some(p) = rx.recv().await {
        match client
            .publish(p.topic.clone(), QoS::AtLeastOnce, false, p.payload)
            .await
        {
            Ok(()) => {
                metrics::counter!("edgeferry_alerts_published_total").increment(1);
                if let Some(t) = p.received_at {
                    metrics::histogram!("edgeferry_alert_latency_seconds")
                        .record(t.elapsed().as_secs_f64());
                }
            }
            Err(e) => tracing::warn!(topic = %p.topic, "alert not published: {e}"),
        }
    }
}

/// Writes a commit group's PUBACKs straight into the connection's write buffer and flushes
/// once. Acks of an older connection generation (the broker lost the session) are dropped:
/// their messages are durable, and the packet ids now belong to new messages. Without a
/// connection they are dropped too: the broker redelivers those messages (DUP) and the
/// committer recognises them.
pub(super) async fn write_acks(
    eventloop: &mut EventLoop,
    group: Vec<AckRequest>,
    generation: &AtomicU64,
) {
    let current = generation.load(Ordering::SeqCst);
    if eventloop.network.is_none() {
        metrics::counter!("edgeferry_ingest_acks_unsent_total").increment(group.len() as u64);
        return;
    }
    let pkids = group
        .into_iter()
        .filter(|a| a.qos != QoS::AtMostOnce)
        .filter(|a| {
            let stale = a.generation != current;
            if stale {
                metrics::counter!("edgeferry_ingest_stale_acks_dropped_total").increment(1);
            }
            !stale
        })
        .map(|a| a.pkid);
    crate::puback::write_pubacks(eventloop, pkids).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_filters(r: Option<SubscribeRequest>) -> Vec<String> {
        r.map(|r| r.filters).unwrap_or_default()
    }

    fn configs(filters: &[&str]) -> Vec<super::super::config::SubscribeConfig> {
        filters
            .iter()
            .map(|f| {
                serde_json::from_value(serde_json::json!({ "filter": f, "format": "number" }))
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_subscribe_queued_across_a_reconnect_is_matched_to_its_own_suback() {
        // Not connected anywhere: the client only queues requests in its channel.
        let (client, _eventloop) =
            AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 16);
        for session_present in [true, false] {
            let table = Arc::new(Subscriptions::new(&configs(&["a/#"])).unwrap());
            let mut subs = SubscriptionState::new(table, None);
            subs.on_connect(&client, true);
            subs.sent(1);
            assert_eq!(request_filters(subs.acknowledged(1)), ["a/#"]);
            // A reload adds b/#; the connection breaks before rumqttc sent the SUBSCRIBE.
            let (done, answered) = oneshot::channel();
            let subscribe = configs(&["a/#", "b/#"]);
            subs.change(SubscriptionChange { subscribe, done }, &client, true);
            subs.disconnected();
            subs.on_connect(&client, session_present);
            if session_present {
                // rumqttc sends the reload's SUBSCRIBE first, then the connect's.
                subs.sent(2);
                subs.sent(3);
                assert_eq!(request_filters(subs.acknowledged(3)), ["a/#", "b/#"]);
                let reload = subs.acknowledged(2).expect("the reload's request");
                assert_eq!(reload.filters, ["b/#"]);
                assert!(reload.done.is_some(), "the reload hears its own SUBACK");
            } else {
                // rumqttc dropped the reload's SUBSCRIBE: the connect's is the next one sent.
                subs.sent(2);
                assert_eq!(request_filters(subs.acknowledged(2)), ["a/#", "b/#"]);
                assert!(
                    answered.blocking_recv().is_err(),
                    "the reload is told the filters come with the reconnect"
                );
            }
            assert!(subs.queued.is_empty() && subs.sent.is_empty());
        }
    }

    #[test]
    fn a_stall_names_its_cause() {
        let quota = stall_cause(Wait::Permits, None, true);
        assert!(quota.contains("when_full = \"block\""), "{quota}");
        let disk = stall_cause(
            Wait::Committer,
            Some("No space left on device".into()),
            false,
        );
        assert!(
            disk.contains("journal cannot write (No space left"),
            "{disk}"
        );
        let drain = stall_cause(Wait::Permits, None, false);
        assert!(drain.contains("backlog"), "{drain}");
        assert!(stall_cause(Wait::AckWrite, None, true).contains("broker is not reading"));
    }

    #[test]
    fn only_poll_loop_waits_over_the_threshold_are_reported() {
        let limit = RateLimit::new(Duration::from_secs(10));
        let status = IngestStatus::default();
        let held = AtomicBool::new(false);
        slow_wait(&limit, (&status, &held), Wait::Permits, Instant::now());
        assert_eq!(
            limit.check("permits"),
            Some(0),
            "a short wait reports nothing"
        );
        let long_ago = Instant::now() - SLOW_WAIT - Duration::from_millis(10);
        slow_wait(&limit, (&status, &held), Wait::AckWrite, long_ago);
        assert_eq!(
            limit.check("ack_write"),
            None,
            "a long wait was just logged"
        );
    }
}
