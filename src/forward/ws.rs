//! The WebSocket(+TLS) transport of the upstream link ([`super::link`] holds the logic both
//! transports share): the `Hello`/`Welcome` handshake gives the resume point and the window,
//! batches travel as `Dict` + `Batch` frames with a dictionary per connection, acknowledgements
//! come back as `Ack` frames, and heartbeats go both ways (a peer silent for three intervals
//! is dropped, and so is one that takes no frame for as long).
//!
//! Both bounds matter on a path that stalls without closing (a dead NAT entry, a radio link
//! gone quiet): no FIN or RST ever arrives, so only the heartbeat bound ends the connection
//! (`tests/link_faults.rs` stalls one behind a fault proxy and measures it).

use super::UpstreamConfig;
use super::link::{Connection, LinkError, Resume, Transport};
use crate::model::batch::OutboxBatch;
use crate::protocol::{self, DictEncoder, Frame, Hello};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long connecting, and then waiting for `Welcome`, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a polite close may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects over `ws://` or `wss://` to `[upstream] url`.
pub struct WsTransport {
    cfg: UpstreamConfig,
}

impl WsTransport {
    /// A transport for `[upstream]`.
    pub fn new(cfg: UpstreamConfig) -> WsTransport {
        WsTransport { cfg }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One WebSocket connection after `Welcome`.
pub struct WsConnection {
    ws: Ws,
    /// The negotiated protocol version (Health frames need 3).
    version: u16,
    dict: DictEncoder,
    max_frame: u32,
    heartbeat: tokio::time::Interval,
    heartbeat_every: Duration,
    last_heard: Instant,
}

impl WsConnection {
    /// How long the central side may stay silent, or take no frame, before the connection is
    /// given up: three heartbeat intervals (docs/PROTOCOL.md section 5).
    fn silence_bound(&self) -> Duration {
        self.heartbeat_every * 3
    }

    /// Sends one frame, at most for [`Self::silence_bound`]. Over a stalled path the socket
    /// buffers fill and a send never completes; without a bound the link waited in it for
    /// good (the silence deadline is only watched while waiting for acknowledgements), until
    /// the kernel gave up retransmitting, many minutes later. The collector, for its part,
    /// drops a gateway whose frame has not arrived within the same three intervals.
    async fn send_frame(&mut self, f: &Frame) -> Result<(), LinkError> {
        let bound = self.silence_bound();
        tokio::time::timeout(bound, send(&mut self.ws, f, self.max_frame))
            .await
            .map_err(|_| {
                LinkError::Broken(format!(
                    "the central side took no {:?} frame for {bound:?} (not reading, or the \
                     path stalled)",
                    f.kind()
                ))
            })?
    }
}

impl Transport for WsTransport {
    type Conn = WsConnection;

    async fn connect(
        &mut self,
        url: &str,
        hello: &Hello,
    ) -> Result<(WsConnection, Resume), LinkError> {
        let mut request = url
            .into_client_request()
            .map_err(|e| LinkError::Connect(format!("bad upstream.url: {e}")))?;
        if let Some(tf) = &self.cfg.token_file {
            let token = std::fs::read_to_string(tf).map_err(|e| {
                LinkError::Connect(format!("upstream.token_file {}: {e}", tf.display()))
            })?;
            let value = format!("Bearer {}", token.trim()).parse().map_err(|e| {
                LinkError::Connect(format!("token is not a valid header value: {e}"))
            })?;
            request.headers_mut().insert("authorization", value);
        }
        let connector = if url.starts_with("wss://") {
            let tls = crate::tls::client_config(
                self.cfg.ca_file.as_deref(),
                self.cfg.cert_file.as_deref(),
                self.cfg.key_file.as_deref(),
            )
            .map_err(|e| LinkError::Connect(e.to_string()))?;
            Some(tokio_tungstenite::Connector::Rustls(Arc::new(tls)))
        } else {
            None
        };
        let (mut ws, _) = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector),
        )
        .await
        .map_err(|_| LinkError::Connect("connect timed out".into()))?
        .map_err(upgrade_error)?;

        ws.send(Message::binary(protocol::encode(&Frame::Hello(
            hello.clone(),
        ))))
        .await
        .map_err(|e| LinkError::Broken(e.to_string()))?;
        let welcome = loop {
            let m = tokio::time::timeout(HANDSHAKE_TIMEOUT, ws.next())
                .await
                .map_err(|_| LinkError::Connect("no Welcome within 15 s".into()))?
                .ok_or_else(|| LinkError::Connect("closed during handshake".into()))?
                .map_err(|e| LinkError::Connect(e.to_string()))?;
            match m {
                Message::Binary(b) => match protocol::decode(&b, protocol::DEFAULT_MAX_FRAME)
                    .map_err(|e| LinkError::Broken(e.to_string()))?
                {
                    Frame::Welcome(w) => break w,
                    Frame::Error(e) => return Err(LinkError::Refused(e.code, e.message)),
                    other => {
                        return Err(LinkError::Broken(format!(
                            "expected Welcome, got {:?}",
                            other.kind()
                        )));
                    }
                },
                Message::Close(c) => {
                    return Err(LinkError::Connect(format!(
                        "closed during handshake: {c:?}"
                    )));
                }
                _ => {}
            }
        };
        let heartbeat_every = Duration::from_secs(welcome.heartbeat_secs.max(1) as u64);
        let conn = WsConnection {
            ws,
            version: welcome.version,
            dict: DictEncoder::new(),
            max_frame: welcome.max_frame,
            heartbeat: tokio::time::interval(heartbeat_every),
            heartbeat_every,
            last_heard: Instant::now(),
        };
        let resume = Resume {
            stored: welcome.stored,
            max_in_flight: welcome.max_in_flight.max(1) as usize,
            detail: format!("WebSocket, protocol version {}", welcome.version),
        };
        Ok((conn, resume))
    }
}

impl Connection for WsConnection {
    async fn health(&mut self, health: &protocol::Health) -> Result<(), LinkError> {
        if self.version < 3 {
            return Ok(()); // a version 2 receiver does not know the frame
        }
        self.send_frame(&Frame::Health(health.clone())).await
    }

    async fn send(
        &mut self,
        seq: u64,
        batch: &OutboxBatch,
        _hello: &Hello,
    ) -> Result<(), LinkError> {
        let (d, frame) = self.dict.encode_batch(seq, batch);
        if let Some(d) = d {
            self.send_frame(&d).await?;
        }
        self.send_frame(&frame).await
    }

    /// Acknowledgements, with the silence bound as a deadline of its own: checked only when
    /// the heartbeat ticked, silence was noticed up to one interval late (between 3 and 4
    /// intervals after the last frame; 4.0 s for a 1 s heartbeat in `tests/link_faults.rs`).
    async fn acks(&mut self) -> Result<Vec<u64>, LinkError> {
        loop {
            let silent_until = self.last_heard + self.silence_bound();
            tokio::select! {
                m = self.ws.next() => {
                    let m = m.ok_or_else(|| LinkError::Broken("connection closed".into()))?
                        .map_err(|e| LinkError::Broken(e.to_string()))?;
                    self.last_heard = Instant::now();
                    match m {
                        Message::Binary(b) => match protocol::decode(&b, protocol::DEFAULT_MAX_FRAME)
                            .map_err(|e| LinkError::Broken(e.to_string()))?
                        {
                            Frame::Ack(a) => return Ok(a.seqs),
                            Frame::Heartbeat(_) => {}
                            Frame::Error(e) => return Err(LinkError::Refused(e.code, e.message)),
                            other => {
                                return Err(LinkError::Broken(format!(
                                    "unexpected {:?} frame",
                                    other.kind()
                                )));
                            }
                        },
                        Message::Close(c) => {
                            return Err(LinkError::Broken(format!(
                                "closed by the central side: {c:?}"
                            )));
                        }
                        _ => {}
                    }
                }
                () = tokio::time::sleep_until(silent_until) => {
                    return Err(LinkError::Broken(format!(
                        "no frame from the central side for {:?}",
                        self.last_heard.elapsed()
                    )));
                }
                _ = self.heartbeat.tick() => {
                    let hb = Frame::Heartbeat(protocol::Heartbeat {
                        time_ms: crate::clock::now_ms(),
                    });
                    self.send_frame(&hb).await?;
                }
            }
        }
    }

    /// Best effort and bounded: over a stalled path the Close frame would never be flushed,
    /// and a shutdown's drain must not wait for it.
    async fn close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close(None)).await;
    }
}

/// Bytes of the frame envelope around a body (magic, version, kind, length, CRC).
const ENVELOPE_LEN: usize = 12;

async fn send<S>(ws: &mut S, f: &Frame, max_frame: u32) -> Result<(), LinkError>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let bytes = protocol::encode(f);
    if bytes.len() > max_frame as usize + ENVELOPE_LEN {
        return Err(LinkError::Broken(format!(
            "a {:?} frame of {} bytes exceeds the server's max_frame {max_frame}; lower upstream.batch_max",
            f.kind(),
            bytes.len()
        )));
    }
    ws.send(Message::binary(bytes))
        .await
        .map_err(|e| LinkError::Broken(e.to_string()))
}

/// Says what an HTTP refusal of the upgrade means for the field engineer reading the log.
fn upgrade_error(e: tokio_tungstenite::tungstenite::Error) -> LinkError {
    use tokio_tungstenite::tungstenite::{Error, http::StatusCode};
    match e {
        Error::Http(resp) => LinkError::Connect(match resp.status() {
            StatusCode::SERVICE_UNAVAILABLE => {
                "the collector is busy (HTTP 503: at its connection limit); retrying".into()
            }
            StatusCode::UNAUTHORIZED => {
                "the collector refused the token (HTTP 401): check upstream.token_file".into()
            }
            other => format!("the collector refused the WebSocket upgrade (HTTP {other})"),
        }),
        other => LinkError::Connect(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::alert::{Alert, AlertState};
    use crate::model::batch::{BatchKind, OutboxItem};
    use tokio::net::TcpListener;

    /// A central side that answers the Hello with a Welcome (heartbeat 1 s), then hands the
    /// connection to `then` (which decides how long it stays open).
    async fn central<F, Fut>(then: F) -> String
    where
        F: FnOnce(WebSocketStream<TcpStream>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let _hello = ws.next().await.unwrap().unwrap();
            let welcome = Frame::Welcome(protocol::Welcome {
                version: protocol::PROTOCOL_VERSION,
                stored: vec![],
                max_in_flight: 64,
                max_frame: protocol::DEFAULT_MAX_FRAME,
                heartbeat_secs: 1,
            });
            ws.send(Message::binary(protocol::encode(&welcome)))
                .await
                .unwrap();
            then(ws).await;
        });
        url
    }

    async fn connect(url: String) -> WsConnection {
        let mut t = WsTransport::new(UpstreamConfig {
            url: url.as_str().into(),
            token_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            batch_max: 500,
            linger: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(1),
            topic: String::new(),
        });
        let (conn, _) = t.connect(&url, &hello()).await.unwrap();
        conn
    }

    fn hello() -> Hello {
        Hello {
            gateway: "gw-unit".into(),
            epoch: 1,
            versions: protocol::SUPPORTED_VERSIONS.to_vec(),
            first_seq: 0,
            software: "test".into(),
        }
    }

    #[tokio::test]
    async fn silence_ends_the_connection_three_intervals_after_the_last_frame() {
        let url = central(|mut ws| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let ack = Frame::Ack(protocol::Ack { seqs: vec![7] });
            ws.send(Message::binary(protocol::encode(&ack)))
                .await
                .unwrap();
            // Silent from now on, reading (and dropping) what the gateway sends.
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
        })
        .await;
        let mut conn = connect(url).await;
        assert_eq!(conn.acks().await.unwrap(), vec![7]);
        let heard = Instant::now();
        let e = conn.acks().await.unwrap_err();
        let after = heard.elapsed();
        assert!(
            e.to_string().contains("no frame from the central side"),
            "{e}"
        );
        // Checked at heartbeat ticks only, this was 3.9 s (the Ack came 0.1 s after a tick).
        assert!(
            after >= Duration::from_millis(2900) && after <= Duration::from_millis(3300),
            "given up {after:?} after the last frame, bound 3 s"
        );
    }

    #[tokio::test]
    async fn a_central_side_that_stops_reading_ends_a_send_within_the_bound() {
        // Accepts the connection, then neither reads nor writes: the socket buffers fill.
        let url = central(|ws| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(ws);
        })
        .await;
        let mut conn = connect(url).await;
        let batch = OutboxBatch {
            kind: BatchKind::Alerts,
            created_ms: 0,
            items: vec![OutboxItem::Alert(Alert {
                rule: "r".repeat(256 * 1024),
                series: "m".into(),
                metric: "m".into(),
                tags: Default::default(),
                state: AlertState::Raised,
                value: Some(1.0),
                time_ms: 0,
            })],
        };
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(20), async {
            for seq in 0..400u64 {
                let sent_at = Instant::now();
                if let Err(e) = conn.send(seq * 2 + 1, &batch, &hello()).await {
                    return (seq, e, sent_at.elapsed());
                }
            }
            panic!("100 MiB sent to a peer that reads nothing");
        })
        .await;
        let (seq, e, blocked) =
            outcome.expect("a send to a peer that reads nothing must not wait forever");
        assert!(e.to_string().contains("took no"), "{e}");
        assert!(
            blocked >= Duration::from_millis(2900) && blocked <= Duration::from_millis(3500),
            "send {seq} given up after {blocked:?} ({:?} in all)",
            started.elapsed()
        );
    }
}
