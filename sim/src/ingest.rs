//! A fake agent's `outflow.v1.Ingest` stream: Hello and Welcome, then Batches and their Acks,
//! for the simulator, the collector's tests and the benchmarks.
//!
//! The real agent's sender (`outflow-agent`'s `sender` module) adds what a fake agent does
//! without: a spool, reconnects and backoff. Here each caller sets its own pace:
//! [`IngestStream::batch`] sends a batch and waits for its Ack; [`IngestStream::send_batch`] and
//! [`IngestStream::next_ack`] pipeline on one task; [`IngestStream::split`] gives the sending
//! and the answering half to two; [`IngestStream::send_encoded`] sends a message encoded in
//! advance, so that a benchmark's clock measures the collector rather than the encoding.
use std::time::Duration;

use outflow_proto::v1::{
    self, AgentMessage, CollectorMessage, agent_message::Msg, collector_message,
};
use prost::{
    Message as _,
    bytes::{BufMut, Bytes},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    GrpcMethod, Request, Status, Streaming,
    client::Grpc,
    codec::{Codec, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    metadata::{Ascii, MetadataMap, MetadataValue},
    service::Interceptor,
    transport::Channel,
};
use tonic_prost::ProstDecoder;

/// How long one answer (a Welcome or an Ack) may take, unless [`Options`] say otherwise.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Messages queued for the wire before a send waits, unless [`Options`] say otherwise.
pub const QUEUE: usize = 64;
/// How long [`IngestStream::close`] waits for the collector to end the stream.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the token is not a valid header value")]
    Token,
    /// The collector refused the stream (authentication, too many streams, not serving).
    #[error("open Ingest stream: {} ({})", .0.code(), .0.message())]
    Open(Box<Status>),
    /// The collector ended the stream with this status.
    #[error("Ingest stream: {} ({})", .0.code(), .0.message())]
    Status(Box<Status>),
    /// The collector ended the stream without an error.
    #[error("the collector ended the stream")]
    Ended,
    /// A send on an [`IngestSender`] after the collector ended the stream: its status comes
    /// from the [`IngestAnswers`].
    #[error("the collector closed the stream")]
    Closed,
    #[error("no answer in {0:?}")]
    Timeout(Duration),
    #[error("want {want}, got {got}")]
    Unexpected { want: &'static str, got: String },
}

impl IngestError {
    /// The status the collector answered with, when that is what failed.
    pub fn status(&self) -> Option<&Status> {
        match self {
            IngestError::Open(s) | IngestError::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// Adds `authorization: Bearer <token>` when a token is set; an [`Interceptor`] for the other
/// services' clients too.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Whitespace around the token (a token file's newline) is not part of it.
    pub fn new(token: Option<&str>) -> Result<Bearer, IngestError> {
        token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| IngestError::Token)
            })
            .transpose()
            .map(Bearer)
    }

    fn apply(&self, metadata: &mut MetadataMap) {
        if let Some(v) = &self.0 {
            metadata.insert("authorization", v.clone());
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.apply(request.metadata_mut());
        Ok(request)
    }
}

/// How to open a stream.
#[derive(Clone, Debug)]
pub struct Options {
    pub bearer: Bearer,
    /// Messages queued for the wire before a send waits.
    pub queue: usize,
    /// How long one answer may take.
    pub answer_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bearer: Bearer::default(),
            queue: QUEUE,
            answer_timeout: ANSWER_TIMEOUT,
        }
    }
}

/// One fake agent's stream.
#[derive(Debug)]
pub struct IngestStream {
    sender: IngestSender,
    answers: IngestAnswers,
}

impl IngestStream {
    /// Opens a stream over `channel`, with `token` as bearer token if given.
    pub async fn open(channel: Channel, token: Option<&str>) -> Result<Self, IngestError> {
        let options = Options {
            bearer: Bearer::new(token)?,
            ..Options::default()
        };
        Self::open_with(channel, options).await
    }

    /// Opens a stream over `channel` as `options` say. Not through the generated
    /// `ingest_client`: its codec encodes every message itself, where
    /// [`IngestStream::send_encoded`] needs bytes passed through as they are.
    pub async fn open_with(channel: Channel, options: Options) -> Result<Self, IngestError> {
        let refused = |s: Status| IngestError::Open(Box::new(s));
        let (tx, rx) = mpsc::channel(options.queue);
        let mut request = Request::new(ReceiverStream::new(rx));
        options.bearer.apply(request.metadata_mut());
        request
            .extensions_mut()
            .insert(GrpcMethod::new("outflow.v1.Ingest", "Stream"));
        let mut grpc = Grpc::new(channel).max_encoding_message_size(usize::MAX);
        grpc.ready()
            .await
            .map_err(|e| refused(Status::unknown(format!("Service was not ready: {e}"))))?;
        let rx = grpc
            .streaming(
                request,
                PathAndQuery::from_static("/outflow.v1.Ingest/Stream"),
                IngestCodec,
            )
            .await
            .map_err(refused)?
            .into_inner();
        Ok(IngestStream {
            sender: IngestSender { tx },
            answers: IngestAnswers {
                rx,
                timeout: options.answer_timeout,
            },
        })
    }

    /// Sends `hello` and returns the collector's Welcome.
    pub async fn hello(&mut self, hello: v1::Hello) -> Result<v1::Welcome, IngestError> {
        self.send(AgentMessage {
            msg: Some(Msg::Hello(hello)),
        })
        .await?;
        match self.answers.next().await?.msg {
            Some(collector_message::Msg::Welcome(w)) => Ok(w),
            other => Err(IngestError::Unexpected {
                want: "a Welcome",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Sends a batch and waits for its Ack; returns the Ack's seq.
    pub async fn batch(&mut self, batch: v1::Batch) -> Result<u64, IngestError> {
        self.send_batch(batch).await?;
        self.answers.next_ack().await
    }

    /// Sends a batch without waiting for its Ack.
    pub async fn send_batch(&mut self, batch: v1::Batch) -> Result<(), IngestError> {
        self.send(AgentMessage {
            msg: Some(Msg::Batch(batch)),
        })
        .await
    }

    /// Sends any message, the protocol's or not, without waiting for an answer. If the
    /// collector has ended the stream, the error is the status it ended it with.
    pub async fn send(&mut self, msg: AgentMessage) -> Result<(), IngestError> {
        let sent = self.sender.send(msg).await;
        self.or_why_closed(sent).await
    }

    /// Sends an `AgentMessage` encoded in advance (`prost::Message::encode_to_vec`), as
    /// [`IngestStream::send`].
    pub async fn send_encoded(&mut self, msg: Bytes) -> Result<(), IngestError> {
        let sent = self.sender.send_encoded(msg).await;
        self.or_why_closed(sent).await
    }

    /// A failed send means the collector ended the stream: its answers say why.
    async fn or_why_closed(&mut self, sent: Result<(), IngestError>) -> Result<(), IngestError> {
        match sent {
            Err(IngestError::Closed) => loop {
                // Answers sent before the end go unread: the stream is over.
                self.answers.next().await?;
            },
            sent => sent,
        }
    }

    /// The next answer, or why there is none.
    pub async fn next(&mut self) -> Result<CollectorMessage, IngestError> {
        self.answers.next().await
    }

    /// Waits for the next answer, an Ack; returns its seq.
    pub async fn next_ack(&mut self) -> Result<u64, IngestError> {
        self.answers.next_ack().await
    }

    /// The sending and the answering half, for two tasks.
    pub fn split(self) -> (IngestSender, IngestAnswers) {
        (self.sender, self.answers)
    }

    /// Half-closes the stream and waits (10 s at most) for the collector to end it.
    pub async fn close(self) {
        let IngestStream {
            sender,
            mut answers,
        } = self;
        drop(sender);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Ok(Some(_)) = answers.rx.message().await {}
        })
        .await;
    }
}

/// The sending half of an [`IngestStream`]. Dropping every clone half-closes the stream.
#[derive(Clone, Debug)]
pub struct IngestSender {
    tx: mpsc::Sender<Outgoing>,
}

impl IngestSender {
    /// Sends any message without waiting for an answer.
    pub async fn send(&self, msg: AgentMessage) -> Result<(), IngestError> {
        self.send_outgoing(Outgoing::Message(msg)).await
    }

    /// Sends a batch without waiting for its Ack.
    pub async fn send_batch(&self, batch: v1::Batch) -> Result<(), IngestError> {
        self.send(AgentMessage {
            msg: Some(Msg::Batch(batch)),
        })
        .await
    }

    /// Sends an `AgentMessage` encoded in advance.
    pub async fn send_encoded(&self, msg: Bytes) -> Result<(), IngestError> {
        self.send_outgoing(Outgoing::Encoded(msg)).await
    }

    async fn send_outgoing(&self, msg: Outgoing) -> Result<(), IngestError> {
        self.tx.send(msg).await.map_err(|_| IngestError::Closed)
    }
}

/// The answering half of an [`IngestStream`].
#[derive(Debug)]
pub struct IngestAnswers {
    rx: Streaming<CollectorMessage>,
    timeout: Duration,
}

impl IngestAnswers {
    /// The next answer, or why there is none.
    pub async fn next(&mut self) -> Result<CollectorMessage, IngestError> {
        match tokio::time::timeout(self.timeout, self.rx.message()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err(IngestError::Ended),
            Ok(Err(s)) => Err(IngestError::Status(Box::new(s))),
            Err(_) => Err(IngestError::Timeout(self.timeout)),
        }
    }

    /// Waits for the next answer, an Ack; returns its seq.
    pub async fn next_ack(&mut self) -> Result<u64, IngestError> {
        match self.next().await?.msg {
            Some(collector_message::Msg::Ack(a)) => Ok(a.seq),
            other => Err(IngestError::Unexpected {
                want: "an Ack",
                got: format!("{other:?}"),
            }),
        }
    }
}

/// What goes on the request stream: a message, or one encoded in advance.
#[derive(Debug)]
enum Outgoing {
    Message(AgentMessage),
    Encoded(Bytes),
}

/// Encodes [`Outgoing`] and decodes the collector's answers as the generated client does.
#[derive(Clone, Copy, Debug, Default)]
struct IngestCodec;

impl Codec for IngestCodec {
    type Encode = Outgoing;
    type Decode = CollectorMessage;
    type Encoder = OutgoingEncoder;
    type Decoder = ProstDecoder<CollectorMessage>;

    fn encoder(&mut self) -> OutgoingEncoder {
        OutgoingEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<CollectorMessage> {
        ProstDecoder::default()
    }
}

#[derive(Debug)]
struct OutgoingEncoder;

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding an AgentMessage: {e}")))
    }
}

impl Outgoing {
    fn encode(self, dst: &mut impl BufMut) -> Result<(), prost::EncodeError> {
        match self {
            Outgoing::Message(m) => m.encode(dst),
            Outgoing::Encoded(b) => {
                dst.put_slice(&b);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_message_goes_on_the_wire_as_the_message_would() {
        let msg = AgentMessage {
            msg: Some(Msg::Batch(v1::Batch {
                seq: 7,
                end_ms: 1_000,
                ..v1::Batch::default()
            })),
        };
        let wire = |item: Outgoing| {
            let mut buf = Vec::new();
            item.encode(&mut buf).unwrap();
            buf
        };
        let encoded = Bytes::from(msg.encode_to_vec());
        assert_eq!(
            wire(Outgoing::Message(msg)),
            wire(Outgoing::Encoded(encoded))
        );
    }

    #[test]
    fn the_bearer_token_is_trimmed_and_checked() {
        let mut md = MetadataMap::new();
        Bearer::new(Some(" tok\n")).unwrap().apply(&mut md);
        assert_eq!(md.get("authorization").unwrap(), "Bearer tok");
        assert!(matches!(Bearer::new(Some("a\nb")), Err(IngestError::Token)));
        let mut md = MetadataMap::new();
        Bearer::new(None).unwrap().apply(&mut md);
        assert!(md.is_empty());
    }
}
