//! The WebSocket(+TLS) transport of the upstream link ([`super::link`] holds the logic both
//! transports share): the `Hello`/`Welcome` handshake gives the resume point and the window,
//! batches travel as `Dict` + `Batch` frames with a dictionary per connection, acknowledgements
//! come back as `Ack` frames, and heartbeats go both ways (a peer silent for three intervals
//! is dropped).

use super::UpstreamConfig;
use super::link::{Connection, LinkError, Resume, Transport};
use crate::model::batch::OutboxBatch;
use crate::protocol::{self, DictEncoder, Frame, Hello};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long connecting, and then waiting for `Welcome`, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

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
    dict: DictEncoder,
    max_frame: u32,
    heartbeat: tokio::time::Interval,
    heartbeat_every: Duration,
    last_heard: Instant,
}

impl Transport for WsTransport {
    type Conn = WsConnection;

    async fn connect(&mut self, hello: &Hello) -> Result<(WsConnection, Resume), LinkError> {
        let mut request = self
            .cfg
            .url
            .as_str()
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
        let connector = if self.cfg.url.starts_with("wss://") {
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
    async fn send(
        &mut self,
        seq: u64,
        batch: &OutboxBatch,
        _hello: &Hello,
    ) -> Result<(), LinkError> {
        let (d, frame) = self.dict.encode_batch(seq, batch);
        if let Some(d) = d {
            send(&mut self.ws, &d, self.max_frame).await?;
        }
        send(&mut self.ws, &frame, self.max_frame).await
    }

    async fn acks(&mut self) -> Result<Vec<u64>, LinkError> {
        loop {
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
                _ = self.heartbeat.tick() => {
                    if self.last_heard.elapsed() > self.heartbeat_every * 3 {
                        return Err(LinkError::Broken(format!(
                            "no frame from the central side for {:?}",
                            self.last_heard.elapsed()
                        )));
                    }
                    let hb = Frame::Heartbeat(protocol::Heartbeat {
                        time_ms: crate::clock::now_ms(),
                    });
                    send(&mut self.ws, &hb, self.max_frame).await?;
                }
            }
        }
    }

    async fn close(&mut self) {
        let _ = self.ws.close(None).await;
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
