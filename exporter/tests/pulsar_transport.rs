//! The Pulsar transport against a real Pulsar-protocol broker (pulsar-lite, started per test on
//! a free port).
#![cfg(feature = "pulsar")]

#[path = "common/events.rs"]
mod events;

use futures::StreamExt;
use tandem_exporter::pulsar::{PulsarConfig, PulsarTransport};
use tandem_exporter::{ExportError, StreamId, Transport};
use tandem_harness::PulsarLite;
use tandem_proto::replication::v1::{ChangeEvent, change_event::Body};
use tandem_proto::storage::v1::RowBatch;

use events::*;

fn config(broker: &PulsarLite) -> PulsarConfig {
    PulsarConfig { service_url: broker.url(), group: GROUP.into(), ..PulsarConfig::default() }
}

fn transport(broker: &PulsarLite) -> PulsarTransport {
    PulsarTransport::new(config(broker)).unwrap()
}

/// (position, tick?) of each event: what an assertion failure shows.
fn shape(events: &[ChangeEvent]) -> Vec<(u64, bool)> {
    events.iter().map(|e| (e.lsn, is_tick(e))).collect()
}

fn lsns(events: &[ChangeEvent]) -> Vec<u64> {
    events.iter().map(|e| e.lsn).collect()
}

#[tokio::test]
async fn publish_then_subscribe_from_the_start_gets_everything_in_order() {
    let broker = PulsarLite::start();
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
    let broker = PulsarLite::start();
    let t = transport(&broker);
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    // Changes 1..=40 with a varying number of ticks after each, so that entry ids and positions
    // drift apart irregularly.
    let log = log_with_ticks(&s, 40, |lsn| lsn * 7 % 5);
    t.publish(&s, log.clone()).await.unwrap();
    for from in 1..=40u64 {
        let mut sub = t.subscribe(&s, from).await.unwrap();
        let first = log.iter().position(|e| e.lsn == from && !is_tick(e)).unwrap();
        let want = &log[first..];
        let got = take(&mut sub, want.len()).await;
        assert_eq!(shape(&got), shape(want), "subscribed from {from}");
        assert_eq!(got, want, "subscribed from {from}");
    }
    // Past the end: only what comes next (the tick repeating 40 too: a subscriber needs it to
    // advance on an idle shard).
    let mut sub = t.subscribe(&s, 41).await.unwrap();
    let more = vec![tick(&s, 40, 9), change(&s, 41)];
    t.publish(&s, more.clone()).await.unwrap();
    assert_eq!(take(&mut sub, 2).await, more);
}

#[tokio::test]
async fn shards_are_independent_topics() {
    let broker = PulsarLite::start();
    let t = transport(&broker);
    t.ensure_stream(&shard(0), 3).await.unwrap();
    assert_eq!(t.config().topic(&shard(2)), "persistent://public/default/tandem.g1.c7.s2");
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
}

#[tokio::test]
async fn live_tail_delivers_events_published_after_subscribing() {
    let broker = PulsarLite::start();
    let t = std::sync::Arc::new(transport(&broker));
    t.ensure_stream(&StreamId::Ddl, 1).await.unwrap();
    assert_eq!(t.config().topic(&StreamId::Ddl), "persistent://public/default/tandem.g1.ddl");
    let mut sub = t.subscribe(&StreamId::Ddl, 1).await.unwrap();
    // More than the subscription's permits, so that it has to ask for more.
    let events: Vec<ChangeEvent> = (1..=600).map(|l| change(&StreamId::Ddl, l)).collect();
    let publisher = {
        let (t, events) = (t.clone(), events.clone());
        tokio::spawn(async move {
            for e in events.chunks(50) {
                t.publish(&StreamId::Ddl, e.to_vec()).await.unwrap();
            }
        })
    };
    let got = take(&mut sub, 600).await;
    assert_eq!(lsns(&got), lsns(&events));
    assert_eq!(got, events);
    publisher.await.unwrap();
}

#[tokio::test]
async fn end_lsn_is_the_last_events_position() {
    let broker = PulsarLite::start();
    let t = transport(&broker);
    let s = shard(1);
    t.ensure_stream(&s, 2).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 0);
    t.publish(&s, (1..=4).map(|l| change(&s, l)).collect()).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 4);
    t.publish(&s, vec![tick(&s, 4, 1), tick(&s, 4, 2)]).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 4);
    // Garbage at the end does not hide the last event.
    t.publish_raw(&s, vec![(vec![0xff; 5], None), (vec![0xfe; 3], Some(9))]).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 4);
    // The other shard is still empty, and a topic nobody wrote to is empty too.
    assert_eq!(t.end_lsn(&shard(0)).await.unwrap(), 0);
    assert_eq!(t.end_lsn(&StreamId::Shard { collection_id: 99, shard: 0 }).await.unwrap(), 0);
}

#[tokio::test]
async fn malformed_message_is_reported_with_its_id_and_the_stream_goes_on() {
    let broker = PulsarLite::start();
    let t = transport(&broker);
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    t.publish(&s, vec![change(&s, 1), change(&s, 2)]).await.unwrap();
    // Garbage, then an event of another shard (as wrong as garbage).
    t.publish_raw(&s, vec![(vec![0xff, 0xff, 0xff, 0x01], Some(3)), (prost::Message::encode_to_vec(&change(&shard(5), 3)), None)])
        .await
        .unwrap();
    t.publish(&s, vec![change(&s, 3), change(&s, 4)]).await.unwrap();

    // Reported at the position they follow (stepping over them consumes no position), with
    // their message id in the message.
    let mut sub = t.subscribe(&s, 1).await.unwrap();
    assert_eq!(lsns(&take(&mut sub, 2).await), [1, 2]);
    match next(&mut sub).await {
        Err(ExportError::Malformed { stream, position, message }) => {
            assert_eq!((stream.as_str(), position), ("c7/s0", 2));
            assert!(message.contains("tandem.g1.c7.s0@0:2") && message.contains("ChangeEvent"), "{message}");
            assert!(message.contains("tandem-lsn property \"3\""), "{message}");
        }
        other => panic!("expected a malformed event, got {other:?}"),
    }
    match next(&mut sub).await {
        Err(ExportError::Malformed { position: 2, message, .. }) => {
            assert!(message.contains("@0:3") && message.contains("shard 5"), "{message}")
        }
        other => panic!("expected a malformed event, got {other:?}"),
    }
    assert_eq!(lsns(&take(&mut sub, 2).await), [3, 4]);
    assert_eq!(t.end_lsn(&s).await.unwrap(), 4);

    // Resuming at 3 reports the malformed messages just before it again rather than skipping
    // them unseen...
    let mut sub = t.subscribe(&s, 3).await.unwrap();
    for entry in [2, 3] {
        match next(&mut sub).await {
            Err(ExportError::Malformed { position: 2, message, .. }) => assert!(message.contains(&format!("@0:{entry}")), "{message}"),
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
    let broker = PulsarLite::start();
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
async fn publish_refuses_what_does_not_fit_the_stream_or_the_size_limit() {
    let broker = PulsarLite::start();
    let t = PulsarTransport::new(PulsarConfig { max_event_bytes: 1 << 20, ..config(&broker) }).unwrap();
    t.ensure_stream(&shard(0), 2).await.unwrap();
    let err = t.publish(&shard(0), vec![change(&shard(1), 1)]).await.unwrap_err();
    assert!(matches!(err, ExportError::Malformed { position: 1, .. }), "{err}");
    assert_eq!(t.end_lsn(&shard(0)).await.unwrap(), 0);
    // An event above the largest the leader may write (max_event_bytes, from
    // limits.max_message_bytes): a clear, non-transient error naming it, and nothing published.
    let s = shard(0);
    let mut big = change(&s, 1);
    big.body = Some(Body::Insert(RowBatch { ids: vec![1], vectors: vec![0.5; 300_000], ..Default::default() }));
    let err = t.publish(&s, vec![big]).await.unwrap_err();
    assert!(matches!(&err, ExportError::Config(m) if m.contains("max_event_bytes (1048576)") && m.contains("position 1")), "{err}");
    assert!(!err.is_transient());
    assert_eq!(t.end_lsn(&s).await.unwrap(), 0);
    // The producer is fine afterwards.
    t.publish(&s, vec![change(&s, 1)]).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 1);
}

#[tokio::test]
async fn a_large_event_replicates_whole() {
    let broker = PulsarLite::start();
    let t = transport(&broker);
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    // ~24 MiB: far above the broker's message size (5 MiB: Pulsar's default, and a hard limit
    // on frames in pulsar-lite), so it travels in chunks and is put back together.
    let mut big = change(&s, 1);
    big.body = Some(Body::Insert(RowBatch {
        ids: (0..6000).collect(),
        vectors: (0..6000 * 1024).map(|i| i as f32).collect(),
        ..Default::default()
    }));
    t.publish(&s, vec![big.clone(), change(&s, 2)]).await.unwrap();
    let mut sub = t.subscribe(&s, 1).await.unwrap();
    assert_eq!(next(&mut sub).await.unwrap(), big);
    assert_eq!(next(&mut sub).await.unwrap().lsn, 2);
    // The searches step over chunks: from 2, from 1 again, and the end.
    assert_eq!(lsns(&take(&mut t.subscribe(&s, 2).await.unwrap(), 1).await), [2]);
    assert_eq!(next(&mut t.subscribe(&s, 1).await.unwrap()).await.unwrap(), big);
    assert_eq!(t.end_lsn(&s).await.unwrap(), 2);
    t.publish(
        &s,
        vec![big.clone()]
            .into_iter()
            .map(|mut e| {
                e.lsn = 3;
                e
            })
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 3);
    assert_eq!(lsns(&take(&mut t.subscribe(&s, 3).await.unwrap(), 1).await), [3]);
}

#[tokio::test]
async fn a_broker_that_is_down_is_a_transient_error() {
    let mut broker = PulsarLite::start();
    // Publishing retries a lost broker for send_timeout_ms before it fails.
    let t = PulsarTransport::new(PulsarConfig { send_timeout_ms: 1000, ..config(&broker) }).unwrap();
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    broker.kill();
    let err = t.publish(&s, vec![change(&s, 1)]).await.unwrap_err();
    assert!(matches!(err, ExportError::Unavailable { backend: "pulsar", .. }) && err.is_transient(), "{err}");
    let err = t.end_lsn(&s).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(t.subscribe(&s, 1).await.err().expect("no broker to subscribe to").is_transient());
    broker.restart();
    t.publish(&s, vec![change(&s, 1)]).await.unwrap();
    assert_eq!(t.end_lsn(&s).await.unwrap(), 1);
}

#[tokio::test]
async fn durable_broker_restart_loses_nothing() {
    let mut broker = PulsarLite::start();
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
async fn a_live_subscription_survives_a_broker_restart() {
    let mut broker = PulsarLite::start();
    let t = transport(&broker);
    let s = shard(0);
    t.ensure_stream(&s, 1).await.unwrap();
    let events: Vec<ChangeEvent> = (1..=10).map(|l| change(&s, l)).collect();
    t.publish(&s, events[..5].to_vec()).await.unwrap();
    let mut sub = t.subscribe(&s, 1).await.unwrap();
    assert_eq!(take(&mut sub, 5).await, events[..5]);
    broker.restart();
    t.publish(&s, events[5..].to_vec()).await.unwrap();
    // The stream reconnects by itself after the last entry it received: nothing lost or
    // repeated.
    assert_eq!(take(&mut sub, 5).await, events[5..]);
}

#[tokio::test]
async fn token_auth_is_sent_and_tls_needs_the_ssl_scheme() {
    // pulsar-lite accepts any token (it has no authentication): this checks that a configured
    // token does not break the handshake; the broker-side check is Pulsar's.
    let broker = PulsarLite::start();
    let t = PulsarTransport::new(PulsarConfig { auth_token: "eyJhbGciOiJIUzI1NiJ9.e30.sig".into(), ..config(&broker) }).unwrap();
    t.publish(&StreamId::Ddl, vec![change(&StreamId::Ddl, 1)]).await.unwrap();
    assert_eq!(t.end_lsn(&StreamId::Ddl).await.unwrap(), 1);
    // TLS against a plain-text listener fails the handshake: transient (a broker being fixed),
    // and the error says where.
    let dir = tempfile::tempdir().unwrap();
    let tls = PulsarTransport::new(PulsarConfig {
        service_url: format!("pulsar+ssl://127.0.0.1:{}", broker.port()),
        tls_trust_certs_file: write_ca(dir.path()),
        timeout_ms: 2000,
        ..config(&broker)
    })
    .unwrap();
    let err = tls.end_lsn(&StreamId::Ddl).await.unwrap_err();
    assert!(err.to_string().contains("pulsar+ssl://127.0.0.1"), "{err}");
}

/// A self-signed CA certificate (made with openssl for these tests; its key is not kept).
fn write_ca(dir: &std::path::Path) -> String {
    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBiDCCAS+gAwIBAgIUdiYtZM5HiY0NA1Pev6QJnvxRIW0wCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOdGFuZGVtLXRlc3QtY2EwIBcNMjYxMTIyMDMyOTM4WhgPMjEy
NjEwMjkwMzI5MzhaMBkxFzAVBgNVBAMMDnRhbmRlbS10ZXN0LWNhMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAEUXHO3LHnuP8AYqkpJFChWS38ys2MmRtxoJKqHHfZ
jWHjsvNZPwNpmEFpA5H9ir37bEMQAnCJ016JrrLGEdJ7/KNTMFEwHQYDVR0OBBYE
FBzIA3tHseqiRZ1LJCkD03JB0C7SMB8GA1UdIwQYMBaAFBzIA3tHseqiRZ1LJCkD
03JB0C7SMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIgVqZbiWVD
qBbKMSysj8g180mI68Wh1XqZEKwJDSyoQdoCIGoVEbXmS7D6P6x/tQGtUxctQyzk
QBzleGoBqLUdgKot
-----END CERTIFICATE-----
";
    let p = dir.join("ca.pem");
    std::fs::write(&p, CA).unwrap();
    p.to_string_lossy().into_owned()
}
