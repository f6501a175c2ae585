//! Simulated sensors: random walks published over MQTT QoS 1, with the scripted overheat and
//! silence.

use super::scenario::*;
use crate::clock::now_ms;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub(super) struct SensorSpec {
    pub(super) site: &'static str,
    pub(super) device: &'static str,
    pub(super) temp_base: f64,
    pub(super) hum_base: f64,
    pub(super) overheats: bool,
    pub(super) silent_at: Option<Duration>,
}

#[derive(Default)]
pub(super) struct SensorStats {
    /// Publishes handed to the client.
    pub(super) sent: AtomicU64,
    /// PUBACKs received: only these readings count as published in the demo's final check.
    pub(super) acked: AtomicU64,
    /// Event time of the last reading published (epoch ms).
    pub(super) last_ms: AtomicU64,
}

/// A mean-reverting random walk: realistic sensor noise around `base`.
pub(super) struct Walk {
    pub(super) base: f64,
    pub(super) value: f64,
    pub(super) step: f64,
}

impl Walk {
    pub(super) fn new(base: f64, step: f64) -> Walk {
        Walk {
            base,
            value: base + rand::random_range(-step..step) * 5.0,
            step,
        }
    }

    pub(super) fn next(&mut self) -> f64 {
        self.value += (self.base - self.value) * 0.05 + rand::random_range(-self.step..self.step);
        self.value
    }
}

pub(super) async fn run_sensor(
    spec: SensorSpec,
    port: u16,
    stats: Arc<SensorStats>,
    timeline: Timeline,
    t0: Instant,
    stop: CancellationToken,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(
        format!("demo-{}-{}", spec.site, spec.device),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(o, 256);
    let acks = stats.clone();
    let net_stop = CancellationToken::new();
    let mut net = tokio::spawn({
        let net_stop = net_stop.clone();
        async move {
            loop {
                tokio::select! {
                    ev = eventloop.poll() => match ev {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acks.acked.fetch_add(1, Ordering::SeqCst);
                        }
                        // Sent DISCONNECT: done (polling on would reconnect).
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(e) => {
                            if net_stop.is_cancelled() {
                                return;
                            }
                            tracing::debug!("sensor connection: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    },
                    _ = net_stop.cancelled() => return,
                }
            }
        }
    });

    let mut temp = Walk::new(spec.temp_base, 0.08);
    let mut hum = Walk::new(spec.hum_base, 0.3);
    // Sensors do not tick in lockstep.
    let phase = Duration::from_millis(rand::random_range(0..PUBLISH_EVERY.as_millis() as u64));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let prefix = format!("sensors/{}/{}", spec.site, spec.device);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let t = t0.elapsed();
        if t >= timeline.duration {
            break;
        }
        if spec.silent_at.is_some_and(|at| t >= at) {
            // Dead battery: nothing more from this device.
            stop.cancelled().await;
            break;
        }
        let mut celsius = temp.next();
        if spec.overheats {
            celsius += timeline.heat(t, spec.temp_base);
        }
        let humidity = hum.next().clamp(0.0, 100.0);
        let ts = now_ms();
        for (metric, value) in [("temperature", celsius), ("humidity", humidity)] {
            let payload = format!(r#"{{"value":{value:.2},"ts":{ts}}}"#);
            if client
                .publish(
                    format!("{prefix}/{metric}"),
                    QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .is_err()
            {
                break;
            }
            stats.sent.fetch_add(1, Ordering::SeqCst);
        }
        stats.last_ms.fetch_max(ts as u64, Ordering::SeqCst);
    }
    // Wait for the outstanding PUBACKs, so the published count is final.
    let started = Instant::now();
    while stats.acked.load(Ordering::SeqCst) < stats.sent.load(Ordering::SeqCst)
        && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(1), &mut net)
        .await
        .is_err()
    {
        net_stop.cancel();
        let _ = net.await;
    }
}
