//! MQTT acknowledgements written on the connection they belong to, shared by the ingest stage
//! and the collector's MQTT source (both acknowledge a message only once it is durable).
//!
//! Why not `AsyncClient::ack`: it queues the PUBACK in rumqttc's request channel, which is
//! read only while the event loop is polled, and which outlives the connection. An ack
//! queued for one connection can then go out on the next one, where the broker (having lost
//! the session) has given that packet id to a *new* message, acknowledging it before it was
//! stored (../shared/FIELD-NOTES.md). Writing into the current connection's buffer from the
//! task that polls the event loop makes "which connection" a fact, not a race.

use rumqttc::{Event, EventLoop, Outgoing, PubAck, Request};

/// Writes a PUBACK for each of `pkids` into the event loop's current connection and flushes
/// once. Returns how many were written; `None` without a connection (the broker redelivers
/// those messages to the next session, marked DUP). A write error ends the batch early: the
/// connection is going, and the rest are redelivered likewise.
pub async fn write_pubacks(
    eventloop: &mut EventLoop,
    pkids: impl IntoIterator<Item = u16>,
) -> Option<usize> {
    let net = eventloop.network.as_mut()?;
    let mut written = 0usize;
    for pkid in pkids {
        match eventloop
            .state
            .handle_outgoing_packet(Request::PubAck(PubAck::new(pkid)))
        {
            Ok(Some(packet)) => {
                if let Err(e) = net.write(packet).await {
                    tracing::debug!("ack not written: {e}");
                    break;
                }
                written += 1;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("ack refused by client state: {e}"),
        }
    }
    // handle_outgoing_packet queues an "outgoing PubAck" event per ack; nobody needs them.
    eventloop
        .state
        .events
        .retain(|e| !matches!(e, Event::Outgoing(Outgoing::PubAck(_))));
    if written > 0
        && let Err(e) = net.flush().await
    {
        tracing::debug!("acks not flushed: {e}");
    }
    Some(written)
}
