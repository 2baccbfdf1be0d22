//! Kafka backend of the replication [`Transport`] (rdkafka, bundled librdkafka).
//!
//! ```text
//!  stream                      topic                          partition   key       value
//!  DDL of group G              {prefix}.G.ddl                 0           "0"       ChangeEvent (protobuf)
//!  shard S of collection C     {prefix}.G.c{C}                S           "S"       ChangeEvent (protobuf)
//! ```
//!
//! Every message also carries the header `tandem-lsn` (the event's position, decimal) and the
//! Kafka timestamp of the event's physical clock (`ts >> 18`, ms). docs/kafka.md is the
//! reference for operators and third-party consumers.
//!
//! Guarantees and how they are kept:
//! - no acknowledged event is lost: the producer is idempotent with `acks=all`, and `publish`
//!   returns only once the broker acknowledged every event of the call;
//! - order per shard: one partition per shard, and the idempotent producer keeps order per
//!   partition with up to 5 requests in flight;
//! - fencing is not Kafka's job here (tansu has no transactions): every event carries the
//!   leader's epoch and subscribers reject older epochs;
//! - positions are tandem's own (`lsn`), not Kafka offsets: `subscribe` finds the first offset
//!   holding `lsn >= from_lsn` by binary search over the partition (lsns never decrease with
//!   the offset), and subscribers never commit offsets to Kafka.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::Deserialize;
use tandem_proto::replication::v1::ChangeEvent;
use tracing::{debug, info, warn};

use crate::error::{ExportError, Result};
use crate::transport::{EventStream, StreamId, Transport, check_event, is_tick};

const BACKEND: &str = "kafka";

/// Name of the message header that holds the event's position (decimal string).
pub const LSN_HEADER: &str = "tandem-lsn";

/// Settings tandem owns because its guarantees depend on them; `extra` may not override them.
const RESERVED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "client.id",
    "group.id",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "transactional.id",
    "allow.auto.create.topics",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
];

/// Longest topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

/// `[transport.kafka]` of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Replication group id; part of every topic name.
    pub group: String,
    /// First part of every topic name.
    pub topic_prefix: String,
    /// Kafka client id (shows in broker logs and quotas).
    pub client_id: String,
    /// Replication factor of the topics `ensure_stream` creates (1 is only fit for tests).
    pub replication_factor: u16,
    /// Topic-level settings for the topics `ensure_stream` creates, e.g. `retention.ms`.
    pub topic_config: BTreeMap<String, String>,
    /// Bound on one metadata, admin or search round trip, in milliseconds.
    pub timeout_ms: u64,
    /// How long the producer keeps retrying an event before `publish` fails, in milliseconds.
    pub delivery_timeout_ms: u64,
    /// Passed verbatim to librdkafka (every client), e.g. `security.protocol`, `sasl.*`.
    /// Settings tandem relies on (acks, idempotence, offsets...) are refused.
    pub extra: BTreeMap<String, String>,
    /// The largest event, in bytes: one shard's part of the largest write the leader accepts
    /// plus the event's framing. Producer, consumers and the topics `ensure_stream` creates
    /// are sized for it (Kafka's own defaults are 1 MB: a bigger event would block its shard).
    pub max_event_bytes: u32,
}

/// Room for an event's fields around its rows.
const EVENT_OVERHEAD: usize = 1 << 20;

/// librdkafka's ceiling for `message.max.bytes`.
const LIBRDKAFKA_MAX_MESSAGE: usize = 1_000_000_000;

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            group: String::new(),
            topic_prefix: "tandem".to_string(),
            client_id: "tandem".to_string(),
            replication_factor: 1,
            topic_config: BTreeMap::new(),
            timeout_ms: 10_000,
            delivery_timeout_ms: 30_000,
            extra: BTreeMap::new(),
            max_event_bytes: (64 << 20) + EVENT_OVERHEAD as u32,
        }
    }
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

impl KafkaConfig {
    /// The transport of a cluster from its `[replication]` settings and its largest accepted
    /// message (`limits.max_message_bytes`). Empty values keep their defaults; timeouts are the
    /// defaults.
    pub fn from_settings(
        group: &str,
        cluster_id: &str,
        s: &tandem_cluster::config::KafkaSettings,
        max_message_bytes: usize,
    ) -> KafkaConfig {
        let d = KafkaConfig::default();
        KafkaConfig {
            brokers: s.brokers.clone(),
            group: group.to_string(),
            topic_prefix: if s.topic_prefix.is_empty() { d.topic_prefix.clone() } else { s.topic_prefix.clone() },
            client_id: if cluster_id.is_empty() { d.client_id.clone() } else { format!("tandem-{cluster_id}") },
            replication_factor: s.replication_factor,
            topic_config: s.topic_config.clone(),
            extra: s.properties.clone(),
            max_event_bytes: max_message_bytes.saturating_add(EVENT_OVERHEAD).min(LIBRDKAFKA_MAX_MESSAGE) as u32,
            ..d
        }
    }

    /// Rejects configurations that could not work, naming the bad value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ExportError::Config(m));
        if self.brokers.trim().is_empty() {
            return bad("kafka brokers is empty: set it to host:port[,host:port...]".into());
        }
        if self.brokers.split(',').any(|b| b.trim().is_empty()) {
            return bad(format!("kafka brokers {:?} has an empty entry", self.brokers));
        }
        for (what, value) in [("group", &self.group), ("topic_prefix", &self.topic_prefix)] {
            if value.is_empty() {
                return bad(format!("kafka {what} is empty: it is part of every topic name"));
            }
            if let Some(c) = value.chars().find(|&c| !is_topic_char(c)) {
                return bad(format!(
                    "kafka {what} {value:?} contains {c:?}: topic names allow only ASCII letters, digits, '.', '_' and '-'"
                ));
            }
        }
        // The longest name is that of a shard topic with the largest collection id.
        let longest = self.topic(&StreamId::Shard { collection_id: u64::MAX, shard: 0 });
        if longest.len() > MAX_TOPIC_LEN {
            return bad(format!(
                "kafka topic_prefix {:?} and group {:?} are too long: topic names would exceed {MAX_TOPIC_LEN} characters",
                self.topic_prefix, self.group
            ));
        }
        if self.client_id.is_empty() {
            return bad("kafka client_id is empty".into());
        }
        if self.replication_factor == 0 {
            return bad("kafka replication_factor is 0: it must be at least 1".into());
        }
        if self.timeout_ms == 0 {
            return bad("kafka timeout_ms is 0".into());
        }
        if self.max_event_bytes < 1 << 16 {
            return bad(format!("kafka max_event_bytes {} is below 65536", self.max_event_bytes));
        }
        if self.delivery_timeout_ms == 0 {
            return bad("kafka delivery_timeout_ms is 0".into());
        }
        if let Some(key) = self.extra.keys().find(|k| RESERVED.contains(&k.as_str())) {
            return bad(format!("kafka extra setting {key:?} is managed by tandem and cannot be overridden"));
        }
        Ok(())
    }

    /// The topic that holds `stream`.
    pub fn topic(&self, stream: &StreamId) -> String {
        match stream {
            StreamId::Ddl => format!("{}.{}.ddl", self.topic_prefix, self.group),
            StreamId::Shard { collection_id, .. } => format!("{}.{}.c{collection_id}", self.topic_prefix, self.group),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// Settings shared by every client: brokers, client id, then `extra`.
    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            // Requests are small and latency-bound (one publish, one fetch at a time): Nagle's
            // algorithm would hold them back behind delayed ACKs.
            .set("socket.nagle.disable", "true");
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    fn producer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("message.timeout.ms", self.delivery_timeout_ms.to_string())
            // A topic is created by `ensure_stream` with one partition per shard; broker-side
            // auto-creation would make one with the broker's default count instead.
            .set("allow.auto.create.topics", "false");
        self.set_default(&mut c, "message.max.bytes", self.max_event_bytes.to_string());
        if !self.extra.contains_key("linger.ms") && !self.extra.contains_key("queue.buffering.max.ms") {
            // The leader acknowledges writes after export: batching comes from the events of
            // one `publish` call, not from waiting.
            c.set("linger.ms", "0");
        }
        c
    }

    /// A consumer that reads assigned partitions from explicit offsets: no group membership,
    /// no commits (subscribers store their position with their data), and an error rather
    /// than a silent jump when the position falls out of the log.
    fn consumer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("group.id", format!("{}.{}.subscriber", self.topic_prefix, self.group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "false")
            .set("allow.auto.create.topics", "false");
        // A fetch returns whole messages only (tansu returns none at all when the next one is
        // larger than the fetch's limit): every limit must admit the largest event.
        let max = self.max_event_bytes;
        self.set_default(&mut c, "message.max.bytes", max.to_string());
        self.set_default(&mut c, "fetch.message.max.bytes", max.to_string());
        self.set_default(&mut c, "fetch.max.bytes", max.to_string());
        self.set_default(&mut c, "receive.message.max.bytes", (u64::from(max) + (1 << 20)).to_string());
        // How long a fetch at the end of the log waits for data: Kafka answers as soon as data
        // arrives, but tansu 0.6 always waits the whole time (and then sleeps out the rest
        // even when it found data), so with tansu this is the replication latency: an event
        // waits up to twice this long. librdkafka's default is 500 ms. 5 ms keeps the lag
        // well under 20 ms at the cost of ~200 fetch round trips a second per idle shard.
        self.set_default(&mut c, "fetch.wait.max.ms", FETCH_WAIT_MS.to_string());
        c
    }

    /// Sets `key` unless `extra` does.
    fn set_default(&self, c: &mut ClientConfig, key: &str, value: String) {
        if !self.extra.contains_key(key) {
            c.set(key, value);
        }
    }
}

/// Default `fetch.wait.max.ms` of subscriptions (see `consumer_config`).
pub const FETCH_WAIT_MS: u32 = 5;

fn unavailable(message: impl std::fmt::Display) -> ExportError {
    ExportError::Unavailable { backend: BACKEND, message: message.to_string() }
}

fn decode_event(stream: &StreamId, payload: Option<&[u8]>) -> std::result::Result<ChangeEvent, String> {
    crate::transport::decode_event(stream, payload.ok_or("message has no value")?)
}

/// Topic and partition of a stream.
fn place(cfg: &KafkaConfig, stream: &StreamId) -> Result<(String, i32)> {
    let partition = match stream {
        StreamId::Ddl => 0,
        StreamId::Shard { shard, .. } => {
            i32::try_from(*shard).map_err(|_| ExportError::Config(format!("shard {shard} is beyond kafka's partition range")))?
        }
    };
    Ok((cfg.topic(stream), partition))
}

struct Inner {
    cfg: KafkaConfig,
    /// Replaced when librdkafka reports a fatal error (an idempotent producer that lost track
    /// of its sequence numbers cannot be used again).
    producer: parking_lot::Mutex<FutureProducer>,
    admin: AdminClient<DefaultClientContext>,
    /// Idle consumers that read single messages for the searches of `subscribe` and `end_lsn`,
    /// with the topics whose metadata each has. One per concurrent search: a rejoining leader
    /// searches every shard at once.
    probes: parking_lot::Mutex<Vec<(BaseConsumer, std::collections::HashSet<String>)>>,
    /// Topics known to exist with their partition count, so that `publish` checks each once.
    known: parking_lot::Mutex<std::collections::HashMap<String, usize>>,
    /// Where positions were seen, per partition: the last offset holding each of the latest
    /// [`ANCHORS_KEPT`] positions that subscriptions delivered. A search for a position just
    /// after one of them starts there (see [`search`]).
    anchors: parking_lot::Mutex<std::collections::HashMap<(String, i32), std::collections::BTreeMap<u64, Anchor>>>,
    /// Fetches the start searches made, in all.
    search_fetches: std::sync::atomic::AtomicU64,
}

/// Positions remembered per partition (see `Inner::anchors`).
const ANCHORS_KEPT: usize = 64;

/// The Kafka [`Transport`]: one producer and one admin client, a consumer per subscription.
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport").field("cfg", &self.inner.cfg).finish_non_exhaustive()
    }
}

impl KafkaTransport {
    /// Validates `cfg` and creates the clients. Connecting is lazy: a broker that is down makes
    /// the calls fail with `Unavailable`, not this constructor.
    pub fn new(cfg: KafkaConfig) -> Result<Self> {
        cfg.validate()?;
        let producer = cfg.producer_config().create().map_err(|e| ExportError::Config(format!("kafka producer: {e}")))?;
        let admin = cfg.client_config().create().map_err(|e| ExportError::Config(format!("kafka admin client: {e}")))?;
        info!(brokers = %cfg.brokers, group = %cfg.group, prefix = %cfg.topic_prefix, "kafka transport ready");
        Ok(KafkaTransport {
            inner: Arc::new(Inner {
                cfg,
                producer: parking_lot::Mutex::new(producer),
                admin,
                probes: Default::default(),
                known: Default::default(),
                anchors: Default::default(),
                search_fetches: Default::default(),
            }),
        })
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.inner.cfg
    }

    /// How many fetches the searches for subscriptions' start offsets have made (each a round
    /// trip to the broker that returns what follows its offset).
    pub fn search_fetches(&self) -> u64 {
        self.inner.search_fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes sure the topic exists before producing to it (once per topic): the producer would
    /// otherwise wait `delivery_timeout_ms` for a topic that will never appear. The DDL topic is
    /// created here if need be, since its shape is fixed; a shard topic must come from
    /// `ensure_stream`, which knows the shard count.
    async fn check_topic(&self, stream: &StreamId, topic: &str, partition: i32) -> Result<()> {
        let known = self.inner.known.lock().get(topic).copied();
        let count = match known {
            Some(n) => n,
            None if *stream == StreamId::Ddl => {
                self.ensure_stream(stream, 1).await?;
                return Ok(());
            }
            None => {
                let t = topic.to_string();
                match self.inner.blocking(move |i| i.partition_count(&t)).await? {
                    Some(n) => {
                        self.inner.known.lock().insert(topic.to_string(), n);
                        n
                    }
                    None => {
                        return Err(unavailable(format!(
                            "topic {topic} of stream {stream} does not exist: ensure_stream must create it first"
                        )));
                    }
                }
            }
        };
        if usize::try_from(partition).is_ok_and(|p| p < count) {
            Ok(())
        } else {
            Err(ExportError::Config(format!("stream {stream} needs partition {partition} but topic {topic} has {count}")))
        }
    }
}

impl Inner {
    /// Runs blocking librdkafka calls (metadata, watermarks, searches) off the async workers.
    async fn blocking<T: Send + 'static>(self: &Arc<Self>, f: impl FnOnce(&Inner) -> Result<T> + Send + 'static) -> Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me)).await.map_err(|e| unavailable(format!("blocking task failed: {e}")))?
    }

    /// Partition count of `topic`, `None` if the broker does not know it.
    fn partition_count(&self, topic: &str) -> Result<Option<usize>> {
        let md = self
            .admin
            .inner()
            .fetch_metadata(Some(topic), self.cfg.timeout())
            .map_err(|e| unavailable(format!("metadata of topic {topic}: {e}")))?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else { return Ok(None) };
        match t.error() {
            None if !t.partitions().is_empty() => Ok(Some(t.partitions().len())),
            None => Ok(None),
            Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => Ok(None),
            Some(e) => Err(unavailable(format!("metadata of topic {topic}: {}", RDKafkaErrorCode::from(e)))),
        }
    }

    fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64)> {
        self.admin
            .inner()
            .fetch_watermarks(topic, partition, self.cfg.timeout())
            .map_err(|e| unavailable(format!("offsets of {topic}/{partition}: {e}")))
    }

    /// Runs a search with an idle probe consumer, or a new one (a client costs a connection and
    /// a metadata round trip, so they are kept); one that failed is dropped so that the next
    /// search starts afresh.
    fn with_probe<T>(&self, stream: &StreamId, topic: &str, partition: i32, f: impl FnOnce(&mut Probe<'_>) -> Result<T>) -> Result<T> {
        let idle = self.probes.lock().pop();
        let (consumer, mut topics) = match idle {
            Some(p) => p,
            None => {
                let mut c = self.cfg.consumer_config();
                // A probe reads what one fetch brings (its first message, or a short walk): do
                // not prefetch past that, and leave no long-polling or backed-off fetch behind
                // that the next jump would wait for.
                // Fetch limits stay those of `consumer_config`: a smaller one would never return
                // a large event (tansu returns nothing then).
                c.set("queued.min.messages", "1").set("fetch.queue.backoff.ms", "0").set("fetch.wait.max.ms", "10");
                (c.create().map_err(|e| unavailable(format!("creating consumer: {e}")))?, Default::default())
            }
        };
        // librdkafka learns a new topic's partition leaders on its own only at its next
        // one-second topic scan, and until then a fetch from it waits: a connected client's first
        // search on a topic took a second. A metadata request for the topic fills its cache,
        // which the assignment then uses.
        if !topics.contains(topic) {
            consumer.fetch_metadata(Some(topic), self.cfg.timeout()).map_err(|e| unavailable(format!("metadata of {topic}: {e}")))?;
            topics.insert(topic.to_string());
        }
        let mut probe =
            Probe { consumer: &consumer, stream, topic, partition, timeout: self.cfg.timeout(), from: 0, assigned: false, fetches: 0 };
        let r = f(&mut probe);
        let _ = consumer.unassign();
        if !matches!(r, Err(ExportError::Unavailable { .. })) {
            self.probes.lock().push((consumer, topics));
        }
        r
    }

    /// Remembers that offset `at.offset` of `topic`/`partition` holds position `at.lsn`.
    fn remember(&self, topic: &str, partition: i32, at: Anchor) {
        let mut all = self.anchors.lock();
        let seen = match all.get_mut(&(topic.to_string(), partition)) {
            Some(seen) => seen,
            None => all.entry((topic.to_string(), partition)).or_default(),
        };
        // Positions only grow along a partition, but a fenced leader's in-flight messages may
        // land after the next leader's (docs/architecture.md, residual risk): an anchor for
        // such a position would send a search past events it must return.
        if seen.last_key_value().is_some_and(|(&newest, _)| at.lsn < newest) {
            return;
        }
        // The last offset of a position: ticks repeat it after the change.
        seen.entry(at.lsn).and_modify(|a| *a = if at.offset > a.offset { at } else { *a }).or_insert(at);
        if seen.len() > ANCHORS_KEPT {
            seen.pop_first();
        }
    }

    /// The latest remembered event below `from_lsn` in `[low, high)` of `topic`/`partition`.
    fn anchor_below(&self, topic: &str, partition: i32, from_lsn: u64, low: i64, high: i64) -> Option<Anchor> {
        let all = self.anchors.lock();
        let seen = all.get(&(topic.to_string(), partition))?;
        seen.range(..from_lsn).next_back().map(|(_, a)| *a).filter(|a| (low..high).contains(&a.offset))
    }

    /// The producer to use, or a fresh one if the current one hit a fatal error.
    fn producer(&self) -> Result<FutureProducer> {
        let mut p = self.producer.lock();
        if let Some((code, reason)) = p.client().fatal_error() {
            warn!(%code, %reason, "kafka producer hit a fatal error; creating a new one");
            *p = self.cfg.producer_config().create().map_err(|e| unavailable(format!("recreating producer: {e}")))?;
        }
        Ok(p.clone())
    }
}

fn produce_error(stream: &StreamId, lsn: u64, e: &KafkaError) -> ExportError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => ExportError::Config(format!(
            "event at position {lsn} of stream {stream} is larger than the kafka message.max.bytes (raise it on the broker, topic and in extra)"
        )),
        _ => unavailable(format!("publishing position {lsn} of stream {stream}: {e}")),
    }
}

fn settle(
    stream: &StreamId,
    partition: i32,
    lsn: u64,
    r: std::result::Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
) -> Result<()> {
    match r {
        Ok(Ok(d)) if d.partition == partition => Ok(()),
        Ok(Ok(d)) => {
            Err(unavailable(format!("position {lsn} of stream {stream} landed on partition {} instead of {partition}", d.partition)))
        }
        Ok(Err((e, _))) => Err(produce_error(stream, lsn, &e)),
        Err(_) => Err(unavailable(format!("producer dropped position {lsn} of stream {stream}"))),
    }
}

#[async_trait::async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn needs_publisher(&self) -> bool {
        true
    }

    /// Creates the topic if the broker does not have it, then waits until its metadata shows
    /// the partitions. Cancel-safe (creating a topic twice is harmless).
    async fn ensure_stream(&self, stream: &StreamId, shards: u32) -> Result<()> {
        let (topic, _) = place(&self.inner.cfg, stream)?;
        let partitions = match stream {
            StreamId::Ddl => 1,
            StreamId::Shard { .. } => shards,
        };
        if partitions == 0 {
            return Err(ExportError::Config(format!("stream {stream} needs at least one shard")));
        }
        let want = usize::try_from(partitions).unwrap_or(usize::MAX);
        let t = topic.clone();
        let existing = self.inner.blocking(move |i| i.partition_count(&t)).await?;
        if existing.is_none() {
            let cfg = &self.inner.cfg;
            let mut new = NewTopic::new(
                &topic,
                i32::try_from(partitions).map_err(|_| ExportError::Config(format!("{partitions} shards is too many for kafka")))?,
                TopicReplication::Fixed(i32::from(cfg.replication_factor)),
            );
            let max = cfg.max_event_bytes.to_string();
            if !cfg.topic_config.contains_key("max.message.bytes") {
                new = new.set("max.message.bytes", &max);
            }
            for (k, v) in &cfg.topic_config {
                new = new.set(k, v);
            }
            let opts = AdminOptions::new().operation_timeout(Some(cfg.timeout())).request_timeout(Some(cfg.timeout()));
            let results =
                self.inner.admin.create_topics([&new], &opts).await.map_err(|e| unavailable(format!("creating topic {topic}: {e}")))?;
            for r in results {
                match r {
                    Ok(_) => info!(%topic, partitions, "created kafka topic"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => debug!(%topic, "kafka topic already exists"),
                    Err((_, RDKafkaErrorCode::InvalidReplicationFactor)) => {
                        return Err(ExportError::Config(format!(
                            "creating topic {topic}: replication_factor {} is more than the brokers available",
                            cfg.replication_factor
                        )));
                    }
                    Err((_, code)) => return Err(unavailable(format!("creating topic {topic}: {code}"))),
                }
            }
        }
        // Metadata propagates asynchronously between brokers; wait until it shows the topic so
        // that the first publish, end_lsn or subscribe finds every partition.
        let deadline = Instant::now() + self.inner.cfg.timeout();
        loop {
            let t = topic.clone();
            match self.inner.blocking(move |i| i.partition_count(&t)).await? {
                Some(n) if n >= want => {
                    self.inner.known.lock().insert(topic, n);
                    return Ok(());
                }
                Some(n) if existing.is_some() => {
                    return Err(ExportError::Config(format!(
                        "topic {topic} exists with {n} partitions but stream {stream} has {partitions} shards"
                    )));
                }
                _ if Instant::now() >= deadline => {
                    return Err(unavailable(format!("topic {topic} did not show {partitions} partitions in time")));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Produces the events in order to the stream's partition and waits for every
    /// acknowledgement. Not cancel-safe (see the trait): a cancelled call may have published a
    /// prefix.
    async fn publish(&self, stream: &StreamId, events: Vec<ChangeEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let (topic, partition) = place(&self.inner.cfg, stream)?;
        for ev in &events {
            check_event(stream, ev).map_err(|message| ExportError::Malformed { stream: stream.to_string(), position: ev.lsn, message })?;
        }
        self.check_topic(stream, &topic, partition).await?;
        let producer = self.inner.producer()?;
        let key = partition.to_string();
        let mut pending: VecDeque<(u64, DeliveryFuture)> = VecDeque::with_capacity(events.len());
        let result: Result<()> = async {
            for ev in &events {
                let payload = ev.encode_to_vec();
                let lsn = ev.lsn.to_string();
                // 0 would mean "now" to librdkafka; an event without a clock keeps that.
                let ms = kafka_timestamp(ev.ts);
                loop {
                    let mut record = FutureRecord::to(&topic)
                        .partition(partition)
                        .key(&key)
                        .payload(&payload)
                        .headers(OwnedHeaders::new().insert(Header { key: LSN_HEADER, value: Some(lsn.as_str()) }));
                    if ms > 0 {
                        record = record.timestamp(ms);
                    }
                    match producer.send_result(record) {
                        Ok(delivery) => {
                            pending.push_back((ev.lsn, delivery));
                            break;
                        }
                        // The local queue is full: wait for the oldest delivery to free room.
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => match pending.pop_front() {
                            Some((lsn, d)) => settle(stream, partition, lsn, d.await)?,
                            None => tokio::time::sleep(Duration::from_millis(5)).await,
                        },
                        Err((e, _)) => return Err(produce_error(stream, ev.lsn, &e)),
                    }
                }
            }
            while let Some((lsn, d)) = pending.pop_front() {
                settle(stream, partition, lsn, d.await)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = &result {
            warn!(%stream, error = %e, "kafka publish failed");
            // Makes the next call start with a working producer.
            let _ = self.inner.producer();
        }
        result
    }

    /// Finds the start offset (a few blocking round trips), then streams from it. Cancel-safe.
    ///
    /// The stream yields `Malformed` for a message that is not a valid event of this stream and
    /// goes on with the next one; its `position` is that of the last event before it (so that
    /// stepping over it consumes no position) and its message names the Kafka offset. Any other
    /// error ends the stream: `Truncated` when the log lost positions the subscriber still needs
    /// (retention caught up with it, or the log has a gap), `Unavailable` when the consumer
    /// failed in a way librdkafka does not recover from by itself (it does from broker restarts
    /// and disconnections: those are only logged).
    async fn subscribe(&self, stream: &StreamId, from_lsn: u64) -> Result<EventStream> {
        self.open(stream, from_lsn, None).await
    }

    /// `subscribe`, with the search for the start offset beginning where the broker's time index
    /// puts `ts` (see [`search`]).
    async fn subscribe_at(&self, stream: &StreamId, from_lsn: u64, ts: u64) -> Result<EventStream> {
        self.open(stream, from_lsn, Some(ts)).await
    }

    async fn end_lsn(&self, stream: &StreamId) -> Result<u64> {
        let (topic, partition) = place(&self.inner.cfg, stream)?;
        let s = *stream;
        self.inner.blocking(move |i| last_lsn(i, &s, &topic, partition)).await
    }
}

impl KafkaTransport {
    /// A subscription from `from_lsn`; `ts` is the ts of the change there, when known.
    async fn open(&self, stream: &StreamId, from_lsn: u64, ts: Option<u64>) -> Result<EventStream> {
        let (topic, partition) = place(&self.inner.cfg, stream)?;
        let (s, t) = (*stream, topic.clone());
        let start = self.inner.blocking(move |i| locate(i, &s, &t, partition, from_lsn, ts)).await?;
        debug!(%stream, from_lsn, start, "kafka subscription starts");

        let inner = self.inner.clone();
        let t = topic.clone();
        let consumer = self
            .inner
            .blocking(move |i| {
                let c: StreamConsumer = i.cfg.consumer_config().create().map_err(|e| unavailable(format!("creating consumer: {e}")))?;
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&t, partition, Offset::Offset(start))
                    .map_err(|e| unavailable(format!("assigning {t}/{partition}: {e}")))?;
                c.assign(&tpl).map_err(|e| unavailable(format!("assigning {t}/{partition}: {e}")))?;
                Ok(c)
            })
            .await?;
        let tail = Tail {
            consumer: OffRuntime(Some(consumer)),
            inner,
            stream: *stream,
            topic,
            partition,
            want: from_lsn.max(1),
            checking: true,
            last_lsn: from_lsn.max(1) - 1,
            done: false,
        };
        Ok(futures::stream::unfold(tail, Tail::next).boxed())
    }
}

/// Reads a partition from chosen offsets, for the searches (blocking).
struct Probe<'a> {
    consumer: &'a BaseConsumer,
    stream: &'a StreamId,
    topic: &'a str,
    partition: i32,
    timeout: Duration,
    /// The offset of the next message the consumer delivers (once `assigned`): messages before
    /// it are leftovers of an earlier position.
    from: i64,
    assigned: bool,
    /// Seeks so far: each is a fetch (a round trip that returns what follows the offset).
    fetches: u32,
}

impl<'a> Probe<'a> {
    fn seek(&mut self, offset: i64) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        let assign = |e: KafkaError| unavailable(format!("reading {}/{} at offset {offset}: {e}", self.topic, self.partition));
        tpl.add_partition_offset(self.topic, self.partition, Offset::Offset(offset)).map_err(assign)?;
        self.consumer.assign(&tpl).map_err(assign)?;
        self.from = offset;
        self.assigned = true;
        self.fetches += 1;
        Ok(())
    }

    /// The first offset whose Kafka timestamp is at or after `ms`, from the broker's time
    /// index (one round trip); `None` when no message is that recent, or the broker cannot say
    /// (it is only where a search starts).
    fn offset_at_time(&self, ms: i64) -> Option<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(self.topic, self.partition, Offset::Offset(ms)).ok()?;
        match self.consumer.offsets_for_times(tpl, self.timeout) {
            Ok(found) => match found.find_partition(self.topic, self.partition)?.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            },
            Err(e) => {
                debug!(topic = self.topic, partition = self.partition, error = %e, "the broker's time index did not answer");
                None
            }
        }
    }

    /// The next message below `end`, decoded; `None` once at `end`.
    fn next(&mut self, end: i64) -> Result<Option<(i64, std::result::Result<ChangeEvent, String>)>> {
        if self.from >= end {
            return Ok(None);
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(unavailable(format!("timed out reading {}/{} at offset {}", self.topic, self.partition, self.from)));
            }
            match self.consumer.poll(left) {
                None => continue,
                Some(Err(e)) => {
                    return Err(unavailable(format!("reading {}/{} at offset {}: {e}", self.topic, self.partition, self.from)));
                }
                Some(Ok(m)) => {
                    if m.topic() != self.topic || m.partition() != self.partition || m.offset() < self.from {
                        continue;
                    }
                    let offset = m.offset();
                    self.from = offset + 1;
                    if offset >= end {
                        return Ok(None);
                    }
                    return Ok(Some((offset, decode_event(self.stream, m.payload()))));
                }
            }
        }
    }
}

/// The offset to start reading `stream` at for events with `lsn >= from_lsn`, or `Truncated`
/// when the log no longer holds `from_lsn` (blocking).
/// `ts` is that of the change at `from_lsn`, when the caller knows it.
fn locate(inner: &Inner, stream: &StreamId, topic: &str, partition: i32, from_lsn: u64, ts: Option<u64>) -> Result<i64> {
    let (low, high) = inner.watermarks(topic, partition)?;
    if low >= high {
        // Empty (possibly emptied by retention): whether a gap hides here shows with the
        // first event, which the stream checks.
        return Ok(high);
    }
    let started = Instant::now();
    let hint = inner.anchor_below(topic, partition, from_lsn, low, high);
    let (start, probes, guess, fetches) = inner.with_probe(stream, topic, partition, |probe| {
        // The change was published with its ts as the message timestamp, so the time index
        // points at it or at a message of the same millisecond before it. One before that is
        // the first probe: it usually holds the position before, and the change follows in the
        // same fetch.
        // tansu 0.6 answers offset 0 when no message is that recent, and a fetch there reads
        // the whole partition: a guess at the log's start is left to the search proper.
        let guess = if hint.is_none() { ts.and_then(|ts| probe.offset_at_time(kafka_timestamp(ts))) } else { None };
        let guess = guess.filter(|&g| g > low);
        let (start, probes) = search(probe, stream, low, high, from_lsn, hint, guess.map(|g| g - 1))?;
        Ok((start, probes, guess, probe.fetches))
    })?;
    inner.search_fetches.fetch_add(u64::from(fetches), std::sync::atomic::Ordering::Relaxed);
    let (hint, ms) = (hint.map(|a| a.offset), started.elapsed().as_millis() as u64);
    debug!(%stream, from_lsn, low, high, start, probes, fetches, ?hint, ?guess, ms, "located start offset");
    Ok(start)
}

/// The Kafka timestamp of an event: the physical part of its ts, in ms.
fn kafka_timestamp(ts: u64) -> i64 {
    i64::try_from(ts >> 18).unwrap_or(i64::MAX)
}

/// What the start search reads: the first well-formed event at or after `offset` and below
/// `end` (one fetch). [`Probe`] reads the broker; the tests read a log in memory.
trait EventAt {
    fn first_event(&mut self, offset: i64, end: i64) -> Result<Option<(i64, ChangeEvent)>>;
    /// The first well-formed event after the last one read, below `end`: a fetch returns what
    /// follows its offset too, so this costs no round trip until that runs out.
    fn next_event(&mut self, end: i64) -> Result<Option<(i64, ChangeEvent)>>;
}

impl EventAt for Probe<'_> {
    fn first_event(&mut self, offset: i64, end: i64) -> Result<Option<(i64, ChangeEvent)>> {
        if offset >= end {
            return Ok(None);
        }
        // Reading on from the message just read (a walk after a probe) needs no new fetch: the
        // last one brought what follows.
        if !self.assigned || offset != self.from {
            self.seek(offset)?;
        }
        self.next_event(end)
    }

    fn next_event(&mut self, end: i64) -> Result<Option<(i64, ChangeEvent)>> {
        while let Some((o, decoded)) = self.next(end)? {
            if let Ok(ev) = decoded {
                return Ok(Some((o, ev)));
            }
        }
        Ok(None)
    }
}

/// Events read forward in one go (see [`search`]): from a hint, and across a bracket this
/// narrow. One fetch brings them; bisecting 64 offsets would take six.
const WALK: u32 = 64;

/// The start offset for `from_lsn` in `[low, high)`, and how many probes it took.
///
/// `pred(o)` = "the first well-formed event at or after offset `o` has `lsn >= from_lsn`" (true
/// when there is none) is monotonic because lsns never decrease with the offset, so the start
/// is the first offset where it holds. Malformed messages take the value of the event after
/// them: one just before the start is delivered (reported again after a restart) rather than
/// skipped unseen.
///
/// Each probe is a fetch, and a fetch returns everything from the probe to the end of the
/// partition (up to the fetch limit, which cannot be small: tansu then returns nothing for a
/// large event), so probes should land late. Plain bisection after reading the partition's
/// first message fetched the whole partition, then half of it, and so on: an old leader
/// rejoining spent seconds here, more each round as the partition grew, although it resumes
/// near the end. Instead the search reads the last message (a small fetch; past it, the start
/// is the end), then gallops from an estimate towards the start with doubling strides until
/// the start is bracketed, and bisects the bracket. The estimate is an upper bound: there is at
/// least one message per position between the start and the last message. When a probe lands
/// on the change `from_lsn` itself, the offset before it is tried at once, which usually ends
/// the search. Near the end that is a few small fetches; far from it, about twice bisection's
/// probes, where the subscription is about to read that much anyway.
///
/// A `hint` (an event below `from_lsn` that this transport's subscriptions delivered, at an
/// offset in the log) bounds the start from below, and the log is read forward from it for up
/// to [`WALK`] events (one fetch brings them) before the search proper. That is the usual
/// case of a subscription that resumes where another one stopped: an old leader rejoining reads
/// its last record to decide whether to keep its log, then follows from the position after it,
/// a few ticks further on; each probe is a fetch of ~100 ms with tansu, and without the hint
/// the second search took five to nine of them.
///
/// Without a hint, a `guess` (an offset the broker's time index gave for the change's ts, when
/// the subscriber knows it) is the first probe, and when it lands below the start the log is
/// read forward from it as from a hint. Any offset is a sound probe, so a wrong guess (a clock
/// that went back, a late message) costs probes, never the result. An old leader checking its
/// last record took five to seven probes without it, each a fetch that tansu (0.6, sqlite)
/// answers more slowly the longer the partition; with it, one.
///
/// The log's first event is only needed when no event below `from_lsn` was seen: then the start
/// is `low`, and that event says whether `from_lsn` is still held (`Truncated` otherwise).
fn search(
    probe: &mut impl EventAt,
    stream: &StreamId,
    low: i64,
    high: i64,
    from_lsn: u64,
    hint: Option<Anchor>,
    guess: Option<i64>,
) -> Result<(i64, u32)> {
    let mut b = Bracket { lo: low, hi: high, left: None, right: None, probes: 0 };
    if let Some(h) = hint.filter(|h| h.lsn < from_lsn && (low..high).contains(&h.offset)) {
        b.lo = h.offset + 1;
        b.left = Some(h);
        if b.lo < b.hi {
            b.walk(probe, from_lsn)?;
        }
        if b.lo >= b.hi {
            return Ok((b.lo, b.probes));
        }
    } else if let Some(g) = guess.map(|g| g.clamp(low, high - 1)) {
        if !b.probe_change(probe, g, from_lsn)? && b.lo < b.hi {
            b.walk(probe, from_lsn)?;
        }
        if b.lo >= b.hi {
            return Ok((b.lo, b.probes));
        }
    }
    // The last message bounds the start from above (unless a probe already did).
    if b.right.is_none() {
        b.probe(probe, high - 1, from_lsn)?;
    }
    let last = b.right;
    if b.lo < b.hi {
        let mut mid = match last {
            Some(last) => last.offset.saturating_sub(i64::try_from(last.lsn - from_lsn).unwrap_or(i64::MAX)).clamp(b.lo, b.hi - 1),
            // The last message is malformed.
            None => b.lo + (b.hi - b.lo) / 2,
        };
        let mut stride = 1i64;
        let mut moving_down = None;
        while b.lo < b.hi {
            let holds = b.probe_change(probe, mid, from_lsn)?;
            if b.lo >= b.hi || moving_down.is_some_and(|down| down != holds) {
                break;
            }
            moving_down = Some(holds);
            mid = if holds {
                // At least a stride down; further when the density of positions between here
                // and the last message says so.
                let by_density = match (last, b.right) {
                    (Some(l), Some(r)) if l.lsn > r.lsn => {
                        r.offset.saturating_sub(scale(r.lsn - from_lsn, l.offset - r.offset, l.lsn - r.lsn))
                    }
                    _ => b.hi - stride,
                };
                by_density.min(b.hi - stride).max(b.lo)
            } else {
                (b.lo + stride - 1).min(b.hi - 1)
            };
            stride = stride.saturating_mul(2);
        }
        // Bracketed: interpolate between the events either side, bisecting after a step that
        // did not halve the bracket.
        let mut bisect = false;
        while b.lo < b.hi {
            let width = b.hi - b.lo;
            if width <= i64::from(WALK) {
                // One fetch brings the whole bracket: read it instead of bisecting it.
                b.walk(probe, from_lsn)?;
                continue;
            }
            let mid = match (b.left, b.right) {
                (Some(l), Some(r)) if !bisect && r.lsn > l.lsn => {
                    l.offset.saturating_add(scale(from_lsn - l.lsn, r.offset - l.offset, r.lsn - l.lsn)).clamp(b.lo, b.hi - 1)
                }
                _ => b.lo + width / 2,
            };
            b.probe(probe, mid, from_lsn)?;
            bisect = !bisect && (b.hi - b.lo) * 2 > width;
        }
    }
    if b.left.is_none()
        && let Some(first) = b.right
    {
        // The start is `low`, and `right` is the log's first well-formed event (everything
        // before it is malformed; with none at all, the malformed messages are delivered and
        // the stream checks the first event). A tick repeats the position of the change before
        // it: if the log starts with a tick at position p, change p is gone.
        let available = if first.tick { first.lsn + 1 } else { first.lsn };
        if from_lsn.max(1) < available {
            return Err(ExportError::Truncated { stream: stream.to_string(), lsn: from_lsn, first: available });
        }
    }
    Ok((b.lo, b.probes))
}

/// `positions * offsets / per` (offsets spanned by `positions` at `offsets` per `per`
/// positions), rounded down, saturating.
fn scale(positions: u64, offsets: i64, per: u64) -> i64 {
    let v = i128::from(positions) * i128::from(offsets.max(0)) / i128::from(per.max(1));
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An event a probe found.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    offset: i64,
    lsn: u64,
    tick: bool,
}

/// What [`search`] knows: `pred` is false below `lo` and true from `hi` on; `left` is the last
/// event seen below `from_lsn`, `right` the first event at or after `hi` (once seen).
struct Bracket {
    lo: i64,
    hi: i64,
    left: Option<Anchor>,
    right: Option<Anchor>,
    probes: u32,
}

impl Bracket {
    /// Reads forward from `lo` for up to [`WALK`] events (one fetch brings what follows a
    /// probe), narrowing the bracket past every event below `from_lsn`; closes it at the first
    /// well-formed event at or past `from_lsn`, or when there is none before `hi` (malformed
    /// messages take the value of what follows).
    fn walk(&mut self, p: &mut impl EventAt, from_lsn: u64) -> Result<()> {
        self.probes += 1;
        let mut at = p.first_event(self.lo, self.hi)?;
        for _ in 0..WALK {
            match at {
                Some((o, ev)) if ev.lsn < from_lsn => {
                    self.lo = o + 1;
                    self.left = Some(Anchor { offset: o, lsn: ev.lsn, tick: is_tick(&ev) });
                }
                Some((o, ev)) => {
                    self.right = Some(Anchor { offset: o, lsn: ev.lsn, tick: is_tick(&ev) });
                    self.hi = self.lo;
                }
                None => self.hi = self.lo,
            }
            if self.lo >= self.hi {
                break;
            }
            at = p.next_event(self.hi)?;
        }
        Ok(())
    }

    /// [`Bracket::probe`], and when `mid` holds the change `from_lsn` itself, the offset before
    /// it too: the change is the start unless the message before it is still at or above
    /// `from_lsn` (a malformed one, which takes its value). Whether pred(mid) holds.
    fn probe_change(&mut self, p: &mut impl EventAt, mid: i64, from_lsn: u64) -> Result<bool> {
        let (holds, exact) = self.probe(p, mid, from_lsn)?;
        if exact && self.lo < self.hi {
            self.probe(p, mid - 1, from_lsn)?;
        }
        Ok(holds)
    }

    /// Reads the first well-formed event at or after `mid` (`lo <= mid < hi`) and narrows the
    /// bracket: (whether pred(mid) holds, whether `mid` holds the change `from_lsn` itself).
    fn probe(&mut self, p: &mut impl EventAt, mid: i64, from_lsn: u64) -> Result<(bool, bool)> {
        self.probes += 1;
        match p.first_event(mid, self.hi)? {
            Some((o, ev)) => {
                let at = Anchor { offset: o, lsn: ev.lsn, tick: is_tick(&ev) };
                if ev.lsn < from_lsn {
                    self.lo = o + 1;
                    self.left = Some(at);
                    Ok((false, false))
                } else {
                    self.hi = mid;
                    self.right = Some(at);
                    Ok((true, ev.lsn == from_lsn && !at.tick && o == mid))
                }
            }
            // Only malformed messages in [mid, hi): they take the value of what follows.
            None => {
                self.hi = mid;
                Ok((true, false))
            }
        }
    }
}

/// Position of the last well-formed event (blocking).
fn last_lsn(inner: &Inner, stream: &StreamId, topic: &str, partition: i32) -> Result<u64> {
    let (low, high) = inner.watermarks(topic, partition)?;
    if low >= high {
        return Ok(0);
    }
    inner.with_probe(stream, topic, partition, |probe| {
        // Backwards past malformed messages, one fetch each (they are rare).
        let mut offset = high - 1;
        while offset >= low {
            probe.seek(offset)?;
            if let Some((o, Ok(ev))) = probe.next(high)?
                && o == offset
            {
                return Ok(ev.lsn);
            }
            offset -= 1;
        }
        Ok(0)
    })
}

/// Drops librdkafka handles on the blocking pool: closing a consumer waits for its threads.
struct OffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        if let Some(v) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn_blocking(move || drop(v));
        }
    }
}

/// State of a live subscription.
struct Tail {
    consumer: OffRuntime<StreamConsumer>,
    inner: Arc<Inner>,
    stream: StreamId,
    topic: String,
    partition: i32,
    /// The first position the subscriber needs.
    want: u64,
    /// Until the change at `want` arrives, anything past it means the log has a gap there.
    checking: bool,
    /// Position of the last event delivered (`want - 1` before the first): where a malformed
    /// message sits, and where to search again after a truncation.
    last_lsn: u64,
    done: bool,
}

/// librdkafka recovers from these by itself (reconnects, leader moves): not worth ending the
/// stream for.
fn recovers_by_itself(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::NetworkException
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotCoordinator
            | C::CoordinatorNotAvailable
    )
}

impl Tail {
    fn header_lsn(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<String> {
        use rdkafka::message::Headers;
        let h = m.headers()?.iter().find(|h| h.key == LSN_HEADER)?;
        Some(String::from_utf8_lossy(h.value?).into_owned())
    }

    fn end_with(mut self, err: ExportError) -> Option<(Result<ChangeEvent>, Tail)> {
        self.done = true;
        Some((Err(err), self))
    }

    async fn next(mut self) -> Option<(Result<ChangeEvent>, Tail)> {
        if self.done {
            return None;
        }
        loop {
            let consumer = self.consumer.0.as_ref()?;
            let received = match consumer.recv().await {
                Ok(m) => Ok((m.offset(), decode_event(&self.stream, m.payload()).map_err(|e| (e, Self::header_lsn(&m))))),
                Err(e) => Err(e),
            };
            match received {
                Ok((offset, Ok(ev))) => {
                    if self.checking {
                        let gap = if is_tick(&ev) { ev.lsn >= self.want } else { ev.lsn > self.want };
                        if gap {
                            let first = if is_tick(&ev) { ev.lsn + 1 } else { ev.lsn };
                            warn!(stream = %self.stream, want = self.want, offset, lsn = ev.lsn, "kafka log has a gap before the wanted position");
                            let err = ExportError::Truncated { stream: self.stream.to_string(), lsn: self.want, first };
                            return self.end_with(err);
                        }
                        if !is_tick(&ev) && ev.lsn == self.want {
                            self.checking = false;
                        }
                    }
                    self.last_lsn = self.last_lsn.max(ev.lsn);
                    self.inner.remember(&self.topic, self.partition, Anchor { offset, lsn: ev.lsn, tick: is_tick(&ev) });
                    return Some((Ok(ev), self));
                }
                Ok((offset, Err((problem, header)))) => {
                    // Positions are tandem's, and an undecodable message has none we can trust
                    // (its header may be missing or belong to another stream): report it at the
                    // position it follows, so that stepping over it consumes no real position.
                    // The message names the exact Kafka offset for the operator.
                    let header = header.map(|h| format!(", {LSN_HEADER} header {h:?}")).unwrap_or_default();
                    let message = format!("kafka message {}/{}@{offset}{header}: {problem}", self.topic, self.partition);
                    warn!(stream = %self.stream, offset, after = self.last_lsn, %message, "malformed kafka message");
                    let err = ExportError::Malformed { stream: self.stream.to_string(), position: self.last_lsn, message };
                    return Some((Err(err), self));
                }
                Err(e) => {
                    let what = format!("reading {}/{} after position {}: {e}", self.topic, self.partition, self.last_lsn);
                    match e.rdkafka_error_code() {
                        Some(RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset) => {
                            // Retention removed what we were about to read. Searching again
                            // gives the precise error (with the first position still held).
                            let (s, t, p, want) = (self.stream, self.topic.clone(), self.partition, self.last_lsn + 1);
                            let err = match self.inner.blocking(move |i| locate(i, &s, &t, p, want, None)).await {
                                Err(e) => e,
                                Ok(_) => unavailable(format!("{what}; subscribe again")),
                            };
                            return self.end_with(err);
                        }
                        Some(code) if recovers_by_itself(code) && !matches!(e, KafkaError::MessageConsumptionFatal(_)) => {
                            debug!(stream = %self.stream, error = %e, "kafka consumer error; librdkafka retries");
                        }
                        _ => return self.end_with(unavailable(what)),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KafkaConfig {
        KafkaConfig { brokers: "127.0.0.1:9092".into(), group: "g1".into(), ..KafkaConfig::default() }
    }

    /// A partition in memory (`None` is a malformed message) that counts fetches as a
    /// [`Probe`] makes them.
    struct MemLog {
        log: Vec<Option<ChangeEvent>>,
        /// The lowest offset read.
        lowest: i64,
        /// The offset after the last event read (`None` before the first read).
        next: Option<i64>,
        fetches: u32,
    }

    impl MemLog {
        fn new(log: Vec<Option<ChangeEvent>>) -> MemLog {
            MemLog { log, lowest: i64::MAX, next: None, fetches: 0 }
        }
    }

    impl EventAt for MemLog {
        fn first_event(&mut self, offset: i64, end: i64) -> Result<Option<(i64, ChangeEvent)>> {
            self.lowest = self.lowest.min(offset);
            if self.next != Some(offset) {
                self.fetches += 1;
            }
            self.next = Some(offset.max(0));
            self.next_event(end)
        }

        fn next_event(&mut self, end: i64) -> Result<Option<(i64, ChangeEvent)>> {
            let end = end.min(self.log.len() as i64);
            let from = self.next.unwrap_or(0);
            let found = (from..end).find_map(|o| self.log[o as usize].clone().map(|e| (o, e)));
            self.next = Some(found.as_ref().map_or(end, |(o, _)| o + 1));
            Ok(found)
        }
    }

    fn ev(lsn: u64, tick: bool) -> Option<ChangeEvent> {
        let body = if tick {
            tandem_proto::replication::v1::change_event::Body::Tick(Default::default())
        } else {
            tandem_proto::replication::v1::change_event::Body::Delete(Default::default())
        };
        Some(ChangeEvent { lsn, body: Some(body), ..Default::default() })
    }

    /// Changes `first..=last`, each followed by `ticks(lsn)` ticks and, where `bad(lsn)`, a
    /// malformed message.
    fn mem_log(first: u64, last: u64, ticks: impl Fn(u64) -> u64, bad: impl Fn(u64) -> bool) -> Vec<Option<ChangeEvent>> {
        let mut log = Vec::new();
        for lsn in first..=last {
            log.push(ev(lsn, false));
            log.extend((0..ticks(lsn)).map(|_| ev(lsn, true)));
            if bad(lsn) {
                log.push(None);
            }
        }
        log
    }

    /// The start by definition: the first offset whose first well-formed event at or after it
    /// has `lsn >= from` (the end when none has).
    fn linear(log: &[Option<ChangeEvent>], from: u64) -> i64 {
        (0..log.len()).find(|&o| log[o..].iter().flatten().next().is_none_or(|e| e.lsn >= from)).unwrap_or(log.len()) as i64
    }

    #[test]
    fn start_search_finds_exactly_the_first_offset_for_every_position() {
        let s = StreamId::Shard { collection_id: 1, shard: 0 };
        let logs = [
            mem_log(1, 300, |l| l * 7 % 5, |l| l % 37 == 0),
            mem_log(5, 400, |_| 0, |_| false),
            mem_log(1, 200, |l| if (50..60).contains(&l) { 40 } else { 1 }, |l| l == 120),
            mem_log(1, 150, |l| (l * 13 % 11) * 3, |l| l % 9 == 0),
        ];
        for log in logs {
            let high = log.len() as i64;
            let first = log.iter().flatten().next().unwrap().lsn;
            for from in first..=log.iter().flatten().last().unwrap().lsn + 2 {
                let mut m = MemLog::new(log.clone());
                let (start, probes) = search(&mut m, &s, 0, high, from, None, None).unwrap();
                assert_eq!(start, linear(&log, from), "from {from}");
                // Galloping then bisecting: about twice bisection's probes.
                let bound = 2 * (64 - (high as u64).leading_zeros()) + 4;
                assert!(probes <= bound, "from {from}: {probes} probes > {bound} (log of {high})");
            }
            let mut m = MemLog::new(log.clone());
            assert!(matches!(search(&mut m, &s, 0, high, first - 1, None, None), Err(ExportError::Truncated { .. })) || first == 1);
        }
    }

    #[test]
    fn a_hint_finds_a_nearby_position_in_one_probe_and_never_misleads() {
        let s = StreamId::Shard { collection_id: 1, shard: 0 };
        let log = mem_log(1, 400, |l| l * 7 % 5, |l| l % 37 == 0);
        let high = log.len() as i64;
        // The last offset holding each position: what a subscription remembers.
        let last_of = |lsn: u64| {
            let o = log.iter().rposition(|e| e.as_ref().is_some_and(|e| e.lsn == lsn)).unwrap() as i64;
            Anchor { offset: o, lsn, tick: is_tick(log[o as usize].as_ref().unwrap()) }
        };
        for from in 2..=402 {
            let hinted = |hint| {
                let mut m = MemLog::new(log.clone());
                search(&mut m, &s, 0, high, from, Some(hint), None).unwrap()
            };
            // Resuming right after the last position seen: one probe (none past the end).
            let (start, probes) = hinted(last_of(from.min(401) - 1));
            assert_eq!(start, linear(&log, from), "from {from}");
            assert!(probes <= 1, "from {from}: {probes} probes");
            // A few positions back (ticks since, as the hint of a rejoining leader): read
            // forward in the same fetch.
            let (start, probes) = hinted(last_of(from.saturating_sub(4).max(1)));
            assert_eq!((start, probes), (linear(&log, from), 1), "from {from}, hint 4 positions back");
            // A hint further back, or not below the position wanted, still gives the start.
            for back in [from.saturating_sub(60).max(1), from.min(400)] {
                let (start, _) = hinted(last_of(back));
                assert_eq!(start, linear(&log, from), "from {from}, hint at position {back}");
            }
        }
        // A hint the log no longer holds (outside [low, high)) is ignored.
        let mut m = MemLog::new(log.clone());
        let stale = Anchor { offset: high + 5, lsn: 1, tick: false };
        assert_eq!(search(&mut m, &s, 0, high, 200, Some(stale), None).unwrap().0, linear(&log, 200));
    }

    #[test]
    fn a_guess_from_the_time_index_finds_the_change_in_one_fetch_and_never_misleads() {
        let s = StreamId::Shard { collection_id: 1, shard: 0 };
        let log = mem_log(1, 300, |l| l * 7 % 5, |l| l % 37 == 0);
        let high = log.len() as i64;
        let change_at = |lsn: u64| log.iter().position(|e| e.as_ref().is_some_and(|e| e.lsn == lsn && !is_tick(e))).unwrap() as i64;
        for from in 2..=300 {
            let guessed = |g| {
                let mut m = MemLog::new(log.clone());
                let (start, _) = search(&mut m, &s, 0, high, from, None, Some(g)).unwrap();
                (start, m.fetches)
            };
            // The time index points at the change; `locate` probes the message before it,
            // which holds the position before, and reads on to the change in the same fetch.
            let before = change_at(from) - 1;
            let (start, fetches) = guessed(before);
            assert_eq!(start, linear(&log, from), "from {from}");
            if log[before as usize].is_some() {
                assert_eq!(fetches, 1, "from {from}");
            }
            // Any other offset (a clock that went back, a late message) still gives the start.
            for g in (-3..high + 3).step_by(5) {
                assert_eq!(guessed(g).0, linear(&log, from), "from {from}, guess {g}");
            }
        }
    }

    #[test]
    fn anchors_keep_the_last_offset_of_each_position_and_ignore_positions_going_back() {
        // No broker needed: the clients connect lazily, and anchors are the transport's own.
        let t = KafkaTransport::new(cfg()).unwrap();
        let i = &t.inner;
        let a = |offset, lsn| Anchor { offset, lsn, tick: false };
        let below = |from, low| i.anchor_below("t", 0, from, low, 100).map(|a| a.offset);
        i.remember("t", 0, a(10, 5));
        i.remember("t", 0, a(11, 5)); // a tick repeating position 5
        i.remember("t", 0, a(12, 6));
        i.remember("t", 0, a(13, 5)); // a fenced leader's late message
        assert_eq!(below(6, 0), Some(11));
        assert_eq!(below(7, 0), Some(12));
        assert_eq!(below(5, 0), None);
        assert_eq!(below(7, 13), None, "retention removed it");
        assert!(i.anchor_below("t", 1, 7, 0, 100).is_none(), "another partition");
        for lsn in 7..200u64 {
            i.remember("t", 0, a(lsn as i64 + 10, lsn));
        }
        assert_eq!(i.anchors.lock()[&("t".to_string(), 0)].len(), ANCHORS_KEPT);
    }

    #[test]
    fn start_search_near_the_end_reads_only_the_end() {
        // One or two ticks per change, as on a busy shard: an old leader rejoining resumes a few
        // positions before the end, and plain bisection fetched the whole partition first.
        let s = StreamId::Shard { collection_id: 1, shard: 0 };
        let log = mem_log(1, 3000, |l| 1 + l % 2, |l| l % 97 == 0);
        let high = log.len() as i64;
        for from in 2900..=3002 {
            let mut m = MemLog::new(log.clone());
            let (start, probes) = search(&mut m, &s, 0, high, from, None, None).unwrap();
            assert_eq!(start, linear(&log, from));
            // Galloping from the end, then reading the last 64 offsets in one fetch.
            assert!(probes <= 7, "from {from}: {probes} probes");
            // Nothing before the start was fetched beyond a few hundred messages.
            assert!(m.lowest >= start - 512, "from {from}: read from offset {} for a start at {start}", m.lowest);
        }
    }

    #[test]
    fn topic_names() {
        let c = cfg();
        assert_eq!(c.topic(&StreamId::Ddl), "tandem.g1.ddl");
        assert_eq!(c.topic(&StreamId::Shard { collection_id: 42, shard: 3 }), "tandem.g1.c42");
        assert_eq!(place(&c, &StreamId::Shard { collection_id: 42, shard: 3 }).unwrap(), ("tandem.g1.c42".into(), 3));
        assert_eq!(place(&c, &StreamId::Ddl).unwrap().1, 0);
    }

    #[test]
    fn validation_names_the_bad_value() {
        cfg().validate().unwrap();
        let msg = |c: KafkaConfig| c.validate().unwrap_err().to_string();
        assert!(msg(KafkaConfig { brokers: " ".into(), ..cfg() }).contains("brokers is empty"));
        assert!(msg(KafkaConfig { brokers: "a:1,,b:2".into(), ..cfg() }).contains("empty entry"));
        assert!(msg(KafkaConfig { group: "".into(), ..cfg() }).contains("group is empty"));
        assert!(msg(KafkaConfig { group: "eu/west".into(), ..cfg() }).contains("\"eu/west\" contains '/'"));
        assert!(msg(KafkaConfig { topic_prefix: "a b".into(), ..cfg() }).contains("topic_prefix"));
        assert!(msg(KafkaConfig { group: "g".repeat(240), ..cfg() }).contains("too long"));
        assert!(msg(KafkaConfig { replication_factor: 0, ..cfg() }).contains("replication_factor"));
        let extra = BTreeMap::from([("acks".to_string(), "1".to_string())]);
        assert!(msg(KafkaConfig { extra, ..cfg() }).contains("\"acks\""));
    }

    #[test]
    fn config_from_cluster_settings() {
        let s = tandem_cluster::config::KafkaSettings {
            brokers: "k:9092".into(),
            topic_prefix: String::new(),
            replication_factor: 3,
            topic_config: BTreeMap::from([("retention.ms".to_string(), "1000".to_string())]),
            properties: BTreeMap::from([("security.protocol".to_string(), "ssl".to_string())]),
        };
        let c = KafkaConfig::from_settings("eu", "c1", &s, 8 << 20);
        assert_eq!((c.replication_factor, c.topic_config["retention.ms"].as_str()), (3, "1000"));
        assert_eq!(c.max_event_bytes, (8 << 20) + (1 << 20));
        assert_eq!(
            (c.brokers.as_str(), c.group.as_str(), c.topic_prefix.as_str(), c.client_id.as_str()),
            ("k:9092", "eu", "tandem", "tandem-c1")
        );
        assert_eq!(c.extra, s.properties);
        c.validate().unwrap();
    }

    #[test]
    fn config_from_toml_keeps_defaults() {
        let c: KafkaConfig = toml::from_str("brokers = \"k:9092\"\ngroup = \"g\"\n[extra]\n\"security.protocol\" = \"ssl\"\n").unwrap();
        assert_eq!(c.topic_prefix, "tandem");
        assert_eq!(c.extra["security.protocol"], "ssl");
        assert!(toml::from_str::<KafkaConfig>("brokerz = \"x\"").is_err());
    }

    #[test]
    fn events_must_match_their_stream() {
        let s = StreamId::Shard { collection_id: 7, shard: 1 };
        let ev = ChangeEvent { format_version: 1, collection_id: 7, shard: 1, lsn: 3, ..Default::default() };
        check_event(&s, &ev).unwrap();
        assert!(check_event(&s, &ChangeEvent { shard: 2, ..ev.clone() }).unwrap_err().contains("shard 2"));
        assert!(check_event(&s, &ChangeEvent { format_version: 0, ..ev.clone() }).is_err());
        assert!(decode_event(&s, Some(&[0xff, 0xff, 0xff])).is_err());
        assert!(decode_event(&s, Some(&[])).is_err());
        assert!(decode_event(&s, None).is_err());
        assert_eq!(decode_event(&s, Some(&ev.encode_to_vec())).unwrap(), ev);
    }
}
