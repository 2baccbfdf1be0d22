//! The Kafka transport against a real broker (tansu, started per test on a free port).
#![cfg(feature = "kafka")]

#[path = "common/events.rs"]
mod events;

use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, Timestamp};
use tandem_exporter::kafka::{KafkaConfig, KafkaTransport, LSN_HEADER};
use tandem_exporter::{ExportError, StreamId, Transport};
use tandem_proto::replication::v1::ChangeEvent;

use events::*;
use tandem_harness::Tansu;

fn transport(broker: &Tansu) -> KafkaTransport {
    KafkaTransport::new(KafkaConfig { brokers: broker.brokers(), group: GROUP.into(), ..KafkaConfig::default() }).unwrap()
}

fn lsns(events: &[ChangeEvent]) -> Vec<u64> {
    events.iter().map(|e| e.lsn).collect()
}

fn raw_producer(broker: &Tansu) -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", broker.brokers()).set("linger.ms", "0").create().unwrap()
}

#[tokio::test]
async fn publish_then_subscribe_from_the_start_gets_everything_in_order() {
    let broker = Tansu::start(false);
    let t = transport(&broker);
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    t.ensure_stream(&s, 1).await.unwrap(); // idempotent
    let events: Vec<ChangeEvent> = (1..=30).map(|l| change(&s, l)).collect();
    for chunk in events.chunks(7) {
        t.publish(&s, chunk.to_vec()).await.unwrap();
    }
    let mut sub = t.subscribe(&s, 1).await.unwrap();
    assert_eq!(take(&mut sub, 30).await, events);
    assert_eq!(t.end_lsn(&s).await.unwrap(), 30);
}

#[tokio::test]
async fn subscribe_from_a_middle_position_starts_exactly_there() {
    let broker = Tansu::start(false);
    let t = transport(&broker);
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    // Changes 1..=40 with a varying number of ticks after each, so that offsets and positions
    // drift apart irregularly.
    let log = log_with_ticks(&s, 40, |lsn| lsn * 7 % 5);
    t.publish(&s, log.clone()).await.unwrap();
    for from in 1..=40u64 {
        let mut sub = t.subscribe(&s, from).await.unwrap();
        let first = log.iter().position(|e| e.lsn == from && !is_tick(e)).unwrap();
        let want = &log[first..];
        assert_eq!(take(&mut sub, want.len()).await, want, "subscribed from {from}");
    }
    // Past the end: only what comes next (the tick repeating 40 too: a subscriber needs it to
    // advance on an idle shard).
    let mut sub = t.subscribe(&s, 41).await.unwrap();
    let more = vec![tick(&s, 40, 9), change(&s, 41)];
    t.publish(&s, more.clone()).await.unwrap();
    assert_eq!(take(&mut sub, 2).await, more);
}

#[tokio::test]
async fn subscribe_at_a_known_ts_starts_there_in_one_fetch_and_a_wrong_ts_costs_only_fetches() {
    let broker = Tansu::start(false);
    let s = shard(0);
    let writer = transport(&broker);
    writer.ensure_stream(&s, 1).await.unwrap();
    let log = log_with_ticks(&s, 60, |lsn| lsn * 7 % 4);
    writer.publish(&s, log.clone()).await.unwrap();
    for from in [2u64, 17, 31, 45, 59, 60] {
        let first = log.iter().position(|e| e.lsn == from && !is_tick(e)).unwrap();
        let want = &log[first..];
        // A new transport each time, as in a restarted process: no hint from earlier
        // subscriptions, only the record's ts.
        let t = transport(&broker);
        let mut sub = t.subscribe_at(&s, from, ts(from, 0)).await.unwrap();
        assert_eq!(take(&mut sub, want.len()).await, want, "subscribed at the ts of {from}");
        assert_eq!(t.search_fetches(), 1, "from {from}: the time index gave the record's offset");
        // The ts of another position, or one past every message: the same events.
        for wrong in [ts(1, 0), ts(from / 2 + 1, 0), ts(from + 5, 0), ts(10_000, 0)] {
            let t = transport(&broker);
            let mut sub = t.subscribe_at(&s, from, wrong).await.unwrap();
            assert_eq!(take(&mut sub, want.len()).await, want, "subscribed at {from} with the ts {wrong}");
        }
    }
}

#[tokio::test]
async fn shards_are_independent_partitions() {
    let broker = Tansu::start(false);
    let t = transport(&broker);
    t.ensure_stream(&shard(0), 3).await.unwrap();
    for sh in 0..3u32 {
        let s = shard(sh);
        let n = 5 + 3 * u64::from(sh);
        t.publish(&s, (1..=n).map(|l| change(&s, l)).collect()).await.unwrap();
    }
    for sh in 0..3u32 {
        let s = shard(sh);
        let n = 5 + 3 * u64::from(sh);
        assert_eq!(t.end_lsn(&s).await.unwrap(), n);
        let mut sub = t.subscribe(&s, 2).await.unwrap();
        let got = take(&mut sub, n as usize - 1).await;
        assert_eq!(lsns(&got), (2..=n).collect::<Vec<_>>());
        assert!(got.iter().all(|e| e.shard == sh && e.collection_id == COLLECTION));
    }

    // What third-party consumers see: partition = shard, key = shard, the lsn header and the
    // event's clock as the Kafka timestamp.
    let topic = t.config().topic(&shard(0));
    assert_eq!(topic, "tandem.g1.c7");
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", "inspect")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 2, Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let raw = tokio::task::spawn_blocking(move || {
        let m = c.poll(GUARD).expect("a message").unwrap();
        let header = m.headers().and_then(|h| h.iter().find(|h| h.key == LSN_HEADER).and_then(|h| h.value.map(<[u8]>::to_vec)));
        (m.partition(), m.key().map(<[u8]>::to_vec), header, m.timestamp())
    })
    .await
    .unwrap();
    assert_eq!(raw.0, 2);
    assert_eq!(raw.1.as_deref(), Some(&b"2"[..]));
    assert_eq!(raw.2.as_deref(), Some(&b"1"[..]));
    assert_eq!(raw.3, Timestamp::CreateTime((ts(1, 0) >> 18) as i64));
}

#[tokio::test]
async fn live_tail_delivers_events_published_after_subscribing() {
    let broker = Tansu::start(false);
    let t = std::sync::Arc::new(transport(&broker));
    t.ensure_stream(&StreamId::Ddl, 1).await.unwrap();
    assert_eq!(t.config().topic(&StreamId::Ddl), "tandem.g1.ddl");
    let mut sub = t.subscribe(&StreamId::Ddl, 1).await.unwrap();
    let events: Vec<ChangeEvent> = (1..=10).map(|l| change(&StreamId::Ddl, l)).collect();
    let publisher = {
        let (t, events) = (t.clone(), events.clone());
        tokio::spawn(async move {
            for e in events {
                t.publish(&StreamId::Ddl, vec![e]).await.unwrap();
            }
        })
    };
    assert_eq!(take(&mut sub, 10).await, events);
    publisher.await.unwrap();
}

#[tokio::test]
async fn end_lsn_is_the_last_events_position() {
    let broker = Tansu::start(false);
    let t = transport(&broker);
    let s = shard(1);
    t.ensure_stream(&s, 2).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 0);
    t.publish(&s, (1..=4).map(|l| change(&s, l)).collect()).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 4);
    t.publish(&s, vec![tick(&s, 4, 1), tick(&s, 4, 2)]).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 4);
    // Garbage at the end does not hide the last event.
    let p = raw_producer(&broker);
    p.send(FutureRecord::<str, [u8]>::to(&t.config().topic(&s)).partition(1).payload(&[0xff; 5]), GUARD).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 4);
    // The other shard is still empty.
    assert_eq!(t.end_lsn(&shard(0)).await.unwrap(), 0);
}

#[tokio::test]
async fn malformed_message_is_reported_with_its_offset_and_the_stream_goes_on() {
    let broker = Tansu::start(false);
    let t = transport(&broker);
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    t.publish(&s, vec![change(&s, 1), change(&s, 2)]).await.unwrap();
    let p = raw_producer(&broker);
    let topic = t.config().topic(&s);
    let garbage =
        p.send(FutureRecord::<str, [u8]>::to(&topic).partition(0).key("0").payload(&[0xff, 0xff, 0xff, 0x01]), GUARD).await.unwrap();
    assert_eq!((garbage.partition, garbage.offset), (0, 2));
    // An event of another shard is as wrong as garbage.
    p.send(FutureRecord::<str, [u8]>::to(&topic).partition(0).payload(&prost::Message::encode_to_vec(&change(&shard(5), 3))), GUARD)
        .await
        .unwrap();
    t.publish(&s, vec![change(&s, 3), change(&s, 4)]).await.unwrap();

    // Reported at the position they follow (stepping over them consumes no position), with
    // their Kafka offset in the message.
    let mut sub = t.subscribe(&s, 1).await.unwrap();
    assert_eq!(lsns(&take(&mut sub, 2).await), [1, 2]);
    match next(&mut sub).await {
        Err(ExportError::Malformed { stream, position, message }) => {
            assert_eq!((stream.as_str(), position), ("c7/s0", 2));
            assert!(message.contains("tandem.g1.c7/0@2") && message.contains("ChangeEvent"), "{message}");
        }
        other => panic!("expected a malformed event, got {other:?}"),
    }
    match next(&mut sub).await {
        Err(ExportError::Malformed { position: 2, message, .. }) => {
            assert!(message.contains("@3") && message.contains("shard 5"), "{message}")
        }
        other => panic!("expected a malformed event, got {other:?}"),
    }
    assert_eq!(lsns(&take(&mut sub, 2).await), [3, 4]);
    assert_eq!(t.end_lsn(&s).await.unwrap(), 4);

    // Resuming at 3 reports the malformed messages just before it again rather than skipping
    // them unseen...
    let mut sub = t.subscribe(&s, 3).await.unwrap();
    for offset in [2, 3] {
        match next(&mut sub).await {
            Err(ExportError::Malformed { position: 2, message, .. }) => assert!(message.contains(&format!("@{offset}")), "{message}"),
            other => panic!("expected a malformed event, got {other:?}"),
        }
    }
    assert_eq!(lsns(&take(&mut sub, 2).await), [3, 4]);
    // ...but not when they are further back.
    let mut sub = t.subscribe(&s, 4).await.unwrap();
    assert_eq!(lsns(&take(&mut sub, 1).await), [4]);
}

#[tokio::test]
async fn positions_missing_from_the_log_are_reported_as_truncated() {
    let broker = Tansu::start(false);
    let t = transport(&broker);
    // A log that starts at position 5 (as after retention, or an exporter that started late).
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    t.publish(&s, (5..=8).map(|l| change(&s, l)).collect()).await.unwrap();
    match t.subscribe(&s, 1).await {
        Err(ExportError::Truncated { lsn: 1, first: 5, .. }) => {}
        Err(e) => panic!("expected truncated, got {e}"),
        Ok(_) => panic!("expected truncated, got a stream"),
    }
    assert_eq!(lsns(&take(&mut t.subscribe(&s, 5).await.unwrap(), 4).await), [5, 6, 7, 8]);

    // Starting with a tick of position 5 means change 5 is gone.
    let s = StreamId::Shard { collection_id: COLLECTION + 1, shard: 1 };
    t.ensure_stream(&s, 2).await.unwrap();
    t.publish(&s, vec![tick(&s, 5, 1), change(&s, 6)]).await.unwrap();
    assert!(matches!(t.subscribe(&s, 5).await, Err(ExportError::Truncated { lsn: 5, first: 6, .. })));
    assert_eq!(lsns(&take(&mut t.subscribe(&s, 6).await.unwrap(), 1).await), [6]);

    // A gap that shows only later: subscribed to an empty log, the first change is past the
    // wanted position.
    t.ensure_stream(&StreamId::Ddl, 1).await.unwrap();
    let mut sub = t.subscribe(&StreamId::Ddl, 1).await.unwrap();
    t.publish(&StreamId::Ddl, vec![change(&StreamId::Ddl, 3)]).await.unwrap();
    assert!(matches!(next(&mut sub).await, Err(ExportError::Truncated { lsn: 1, first: 3, .. })));
    assert!(tokio::time::timeout(GUARD, sub.next()).await.unwrap().is_none(), "the stream ends after truncated");
}

#[tokio::test]
async fn ensure_stream_refuses_a_topic_with_too_few_partitions() {
    let broker = Tansu::start(false);
    let t = transport(&broker);
    t.ensure_stream(&shard(0), 2).await.unwrap();
    t.ensure_stream(&shard(1), 2).await.unwrap();
    match t.ensure_stream(&shard(0), 4).await {
        Err(ExportError::Config(m)) => assert!(m.contains("2 partitions") && m.contains("4 shards"), "{m}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[tokio::test]
async fn publish_refuses_what_does_not_fit_the_stream() {
    let broker = Tansu::start(false);
    let t = transport(&broker);
    t.ensure_stream(&shard(0), 2).await.unwrap();
    let err = t.publish(&shard(0), vec![change(&shard(1), 1)]).await.unwrap_err();
    assert!(matches!(err, ExportError::Malformed { position: 1, .. }), "{err}");
    assert_eq!(t.end_lsn(&shard(0)).await.unwrap(), 0);
    // A shard beyond the topic's partitions, and a topic nobody created: clear errors at once
    // rather than the producer waiting for them to appear.
    let s = shard(2);
    let err = t.publish(&s, vec![change(&s, 1)]).await.unwrap_err();
    assert!(matches!(&err, ExportError::Config(m) if m.contains("has 2")), "{err}");
    let s = StreamId::Shard { collection_id: 99, shard: 0 };
    let err = t.publish(&s, vec![change(&s, 1)]).await.unwrap_err();
    assert!(err.is_transient() && err.to_string().contains("does not exist"), "{err}");
    // The DDL topic has a fixed shape: publish creates it if need be.
    t.publish(&StreamId::Ddl, vec![change(&StreamId::Ddl, 1)]).await.unwrap();
    assert_eq!(t.end_lsn(&StreamId::Ddl).await.unwrap(), 1);
}

#[tokio::test]
async fn durable_broker_restart_loses_nothing() {
    let mut broker = Tansu::start(true);
    let t = transport(&broker);
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    let events: Vec<ChangeEvent> = (1..=20).map(|l| change(&s, l)).collect();
    t.publish(&s, events[..10].to_vec()).await.unwrap();
    broker.restart();
    // The same transport goes on publishing after the broker came back.
    t.publish(&s, events[10..].to_vec()).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 20);
    let mut sub = t.subscribe(&s, 1).await.unwrap();
    assert_eq!(take(&mut sub, 20).await, events);

    // And a fresh client after another restart sees the same log.
    broker.restart();
    let fresh = transport(&broker);
    assert_eq!(fresh.end_lsn(&s).await.unwrap(), 20);
    let mut sub = fresh.subscribe(&s, 11).await.unwrap();
    assert_eq!(take(&mut sub, 10).await, events[10..]);
}

#[tokio::test]
async fn retention_truncates_the_log_and_subscribers_are_told() {
    let mut broker = Tansu::start(true);
    let cfg = KafkaConfig {
        brokers: broker.brokers(),
        group: GROUP.into(),
        topic_config: [("cleanup.policy", "delete"), ("retention.ms", "3600000")].map(|(k, v)| (k.to_string(), v.to_string())).into(),
        ..KafkaConfig::default()
    };
    let t = KafkaTransport::new(cfg.clone()).unwrap();
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    // 1..=5 from 2023 (far past retention), 6..=10 from now.
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let events: Vec<ChangeEvent> = (1..=10)
        .map(|l| {
            let mut e = change(&s, l);
            if l > 5 {
                e.ts = (now_ms + l) << 18;
            }
            e
        })
        .collect();
    t.publish(&s, events.clone()).await.unwrap();
    // tansu applies retention when it starts (then every 10 minutes).
    broker.restart();
    let topic = t.config().topic(&s);
    let brokers = broker.brokers();
    let low = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
        let deadline = std::time::Instant::now() + GUARD;
        loop {
            let (low, _) = c.fetch_watermarks(&topic, 0, Duration::from_secs(5)).unwrap();
            if low > 0 || std::time::Instant::now() > deadline {
                return low;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert_eq!(low, 5, "retention should have removed the five old events");

    match t.subscribe(&s, 3).await {
        Err(ExportError::Truncated { lsn: 3, first: 6, .. }) => {}
        Err(e) => panic!("expected truncated, got {e}"),
        Ok(_) => panic!("expected truncated, got a stream"),
    }
    assert_eq!(take(&mut t.subscribe(&s, 6).await.unwrap(), 5).await, events[5..]);
    assert_eq!(take(&mut t.subscribe(&s, 8).await.unwrap(), 3).await, events[7..]);
    assert_eq!(t.end_lsn(&s).await.unwrap(), 10);
}

#[tokio::test]
async fn a_live_subscription_survives_a_broker_restart() {
    let mut broker = Tansu::start(true);
    let t = transport(&broker);
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    let events: Vec<ChangeEvent> = (1..=10).map(|l| change(&s, l)).collect();
    t.publish(&s, events[..5].to_vec()).await.unwrap();
    let mut sub = t.subscribe(&s, 1).await.unwrap();
    assert_eq!(take(&mut sub, 5).await, events[..5]);
    broker.restart();
    t.publish(&s, events[5..].to_vec()).await.unwrap();
    // librdkafka reconnects by itself: the same stream goes on, nothing lost or repeated.
    assert_eq!(take(&mut sub, 5).await, events[5..]);
}
