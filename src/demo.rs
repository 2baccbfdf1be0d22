//! `tandem demo`: a guided tour on built-in defaults, with nothing to configure.
//!
//! It starts the all-in-one deployment in this process — a **leading** cluster that takes the
//! writes, an **alternative** that follows it over the direct transport (the leader's WAL
//! streamed over gRPC), and the **gateway** in front of both — then does what an application
//! would, through the public gRPC API (the same [`connect`] every client uses): create a
//! collection and fill it on the leader while the rows appear on the alternative, flush, search
//! and filter-search on the alternative, upsert on the leader and read the new value back on the
//! alternative with the write's session token, delete, try a write on the alternative (refused,
//! naming the leader), send reads through the gateway and watch them spread over both clusters,
//! write-then-read through the gateway with a `session-id` header (read-your-writes even when the
//! read lands on the alternative), and show the clusters' state. Then it keeps serving, with the
//! endpoints printed, so other `tandem` commands can be tried against them.
//!
//! ```text
//!   app ──► gateway ──writes──► leader ──direct transport (Replication.Subscribe)──► alternative
//!              └───────reads (p2c over peak-EWMA latency, lag-aware)──► leader + alternative
//! ```
//!
//! Each step is a method of [`Demo`], so the tour can grow (a gateway in front of both) by adding
//! steps rather than rewriting a script.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use tandem_client::Channel;
use tandem_cluster::{ClusterConfig, Role};
use tandem_gateway::config::StaticCluster;
use tandem_node::Member;
use tandem_proto::v1 as pb;
use tandem_proto::v1::gateway_client::GatewayClient;
use tandem_proto::v1::tandem_client::TandemClient;
use tokio_util::sync::CancellationToken;

use crate::cli::cluster::shutdown_signal;
use crate::cli::collection::{describe_text, index_name, metric_name};
use crate::cli::info::role_name;
use crate::cli::search::hits_text;
use crate::cli::{LogFormat, RpcResult, connect, fmt_payload, fmt_ts, init_tracing};
use crate::config::{MEMBER_DRAIN, member_error};

const COLLECTION: &str = "demo";
const CATEGORIES: [&str; 5] = ["books", "music", "games", "garden", "toys"];
const STEPS: usize = 12;
/// The filter of the filtered search; the upsert step makes the probe row pass it.
const FILTER: &str = r#"category == "books" and price < 20"#;
const LEADER_ID: &str = "leader";
const ALTERNATIVE_ID: &str = "alternative";
/// How long the demo waits for the alternative to catch up before calling it a failure.
const CATCH_UP: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Sample rows to insert.
    #[arg(long, default_value_t = 20_000)]
    pub rows: usize,
    /// Vector dimension of the sample rows.
    #[arg(long, default_value_t = 64)]
    pub dim: u32,
    /// Stop this many seconds after the walkthrough (0 = right after it); without it, serve
    /// until Ctrl-C.
    #[arg(long, value_name = "SECS")]
    pub exit_after: Option<u64>,
    /// Keep the data here (in `leader/` and `alternative/`) instead of in a temporary directory
    /// that is deleted on exit.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the leading cluster listens (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub listen: String,
    /// Where the alternative cluster listens (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub alternative_listen: String,
    /// Where the gateway listens (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub gateway_listen: String,
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    if !(1..=10_000_000).contains(&a.rows) {
        bail!("--rows {} is out of range 1..=10000000", a.rows);
    }
    if !(1..=tandem_cluster::schema::MAX_DIM).contains(&a.dim) {
        bail!("--dim {} is out of range 1..={}", a.dim, tandem_cluster::schema::MAX_DIM);
    }
    // Warnings only: the walkthrough's own output is the point.
    init_tracing("warn", LogFormat::Text);
    let mut demo = Demo::start(&a).await?;
    let result = demo.walkthrough().await;
    if result.is_ok() {
        demo.serve(a.exit_after).await?;
    }
    demo.stop().await?;
    result
}

/// Deterministic sample rows: Gaussian clusters in `dim` dimensions, each row with a category
/// (mostly its cluster's) and a price.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub dim: usize,
    pub ids: Vec<i64>,
    pub vectors: Vec<f32>,
    pub categories: Vec<&'static str>,
    pub prices: Vec<f64>,
}

impl Sample {
    pub fn generate(rows: usize, dim: usize, seed: u64) -> Sample {
        let mut rng = StdRng::seed_from_u64(seed);
        let unit = Normal::new(0.0f32, 1.0).expect("valid normal");
        let spread = Normal::new(0.0f32, 0.25).expect("valid normal");
        let centers: Vec<Vec<f32>> = (0..8).map(|_| (0..dim).map(|_| unit.sample(&mut rng)).collect()).collect();
        let mut s = Sample {
            dim,
            ids: Vec::with_capacity(rows),
            vectors: Vec::with_capacity(rows * dim),
            categories: Vec::with_capacity(rows),
            prices: Vec::with_capacity(rows),
        };
        for id in 0..rows {
            let c = rng.random_range(0..centers.len());
            s.ids.push(id as i64);
            s.vectors.extend(centers[c].iter().map(|x| x + spread.sample(&mut rng)));
            // Nearby rows mostly share a category, so filtered results look plausible.
            let cat = if rng.random_bool(0.8) { c % CATEGORIES.len() } else { rng.random_range(0..CATEGORIES.len()) };
            s.categories.push(CATEGORIES[cat]);
            s.prices.push(f64::from(rng.random_range(100u32..10_000)) / 100.0);
        }
        s
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn vector(&self, row: usize) -> &[f32] {
        &self.vectors[row * self.dim..(row + 1) * self.dim]
    }

    pub fn payload(&self, row: usize) -> pb::Payload {
        payload(self.categories[row], self.prices[row])
    }
}

fn payload(category: &str, price: f64) -> pb::Payload {
    use pb::value::Kind;
    let mut fields = HashMap::new();
    fields.insert("category".to_string(), pb::Value { kind: Some(Kind::StringValue(category.to_string())) });
    fields.insert("price".to_string(), pb::Value { kind: Some(Kind::DoubleValue(price)) });
    pb::Payload { fields }
}

/// The demo's state between steps.
pub struct Demo {
    lead_cluster: Option<Member>,
    alt_cluster: Option<Member>,
    gateway_running: Option<tandem_gateway::Running>,
    pub gateway_endpoint: String,
    /// The application's endpoint: the same API as a cluster, plus Topology.
    pub gateway: TandemClient<Channel>,
    /// Deleted when the demo ends, unless --data-dir was given.
    _tmp: Option<tempfile::TempDir>,
    pub leader_endpoint: String,
    pub alternative_endpoint: String,
    /// Writes go to the leader...
    pub leader: TandemClient<Channel>,
    /// ...and reads, mostly, to the alternative.
    pub alternative: TandemClient<Channel>,
    sample: Sample,
    /// The newest session token a reply returned: reads that pass it see our own writes, on
    /// either cluster (tokens of the leader and of its alternatives share one timeline).
    token: String,
    step: usize,
}

impl Demo {
    /// Step 1: a leading and an alternative cluster on embedded defaults, in this process.
    pub async fn start(a: &DemoArgs) -> anyhow::Result<Demo> {
        println!("tandem demo: a guided tour of a leading and an alternative cluster, through the public gRPC API");
        heading(1, "start a leading cluster, an alternative that follows it, and the gateway (built-in defaults)");
        let (data_dir, tmp) = match &a.data_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new().prefix("tandem-demo-").tempdir().context("cannot create a temporary data directory")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        // The direct transport is the default: the alternative streams the leader's WAL over
        // gRPC, no broker needed.
        let lead_cfg = ClusterConfig {
            cluster_id: LEADER_ID.into(),
            listen: a.listen.clone(),
            data_dir: data_dir.join("leader"),
            ..ClusterConfig::default()
        };
        let lead = Member::start(lead_cfg).await.map_err(member_error)?;
        let leader_endpoint = lead.endpoint();
        let mut alt_cfg = ClusterConfig {
            cluster_id: ALTERNATIVE_ID.into(),
            listen: a.alternative_listen.clone(),
            data_dir: data_dir.join("alternative"),
            role: Role::Alternative,
            ..ClusterConfig::default()
        };
        alt_cfg.replication.leader = leader_endpoint.clone();
        let transport = alt_cfg.replication.transport;
        let alt = match Member::start(alt_cfg).await {
            Ok(m) => m,
            Err(e) => {
                let _ = lead.stop(MEMBER_DRAIN).await;
                return Err(member_error(e));
            }
        };
        let alternative_endpoint = alt.endpoint();
        println!("    leader       cluster {LEADER_ID:<12} (leading)      {leader_endpoint}");
        println!(
            "    alternative  cluster {ALTERNATIVE_ID:<12} (alternative)  {alternative_endpoint}  follows the leader ({transport} transport)"
        );
        // The gateway knows both clusters from a static list here; in a deployment clusters can
        // register in etcd instead (`[discovery] etcd`) and gateways watch it.
        let mut gw_cfg = tandem_gateway::GatewayConfig {
            listen: a.gateway_listen.clone(),
            clusters: vec![
                StaticCluster { id: LEADER_ID.into(), endpoint: leader_endpoint.clone(), datacenter: String::new() },
                StaticCluster { id: ALTERNATIVE_ID.into(), endpoint: alternative_endpoint.clone(), datacenter: String::new() },
            ],
            ..tandem_gateway::GatewayConfig::default()
        };
        // Round robin so the tour shows both clusters serving one reader; the default, p2c over
        // peak-EWMA latency, sends a lone sequential reader to whichever cluster answers faster.
        gw_cfg.routing.policy = tandem_gateway::config::Policy::RoundRobin;
        let membership = tandem_discovery::static_list(gw_cfg.registrations());
        let gw = match tandem_gateway::start(gw_cfg, membership).await {
            Ok(g) => g,
            Err(e) => {
                let _ = alt.stop(MEMBER_DRAIN).await;
                let _ = lead.stop(MEMBER_DRAIN).await;
                return Err(e.into());
            }
        };
        let gateway_endpoint = format!("http://{}", gw.addr);
        println!("    gateway      {:<33} {gateway_endpoint}  writes to the leader, reads over both", "");
        println!("    data dir     {}{}", data_dir.display(), if tmp.is_some() { " (temporary)" } else { "" });
        let mut demo = Demo {
            lead_cluster: Some(lead),
            alt_cluster: Some(alt),
            gateway_running: Some(gw),
            gateway: connect(&gateway_endpoint).await?,
            gateway_endpoint,
            _tmp: tmp,
            leader: connect(&leader_endpoint).await?,
            alternative: connect(&alternative_endpoint).await?,
            leader_endpoint,
            alternative_endpoint,
            sample: Sample { dim: 0, ids: Vec::new(), vectors: Vec::new(), categories: Vec::new(), prices: Vec::new() },
            token: String::new(),
            step: 1,
        };
        let started = Instant::now();
        demo.sample = tokio::task::spawn_blocking({
            let (rows, dim) = (a.rows, a.dim as usize);
            move || Sample::generate(rows, dim, 42)
        })
        .await?;
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "sample generated");
        Ok(demo)
    }

    /// Every step after the start, in order.
    pub async fn walkthrough(&mut self) -> anyhow::Result<()> {
        self.create_collection().await?;
        self.insert_and_watch().await?;
        self.flush().await?;
        let probe = 42.min(self.sample.len() - 1);
        self.search(probe).await?;
        self.filtered_search(probe).await?;
        self.upsert_and_read_back(probe).await?;
        self.delete_and_get(probe).await?;
        self.refused_write(probe).await?;
        self.reads_through_the_gateway(probe).await?;
        self.session_through_the_gateway().await?;
        self.cluster_info().await
    }

    fn next_step(&mut self, title: &str) {
        self.step += 1;
        heading(self.step, title);
    }

    fn keep_token(&mut self, token: String) {
        if !token.is_empty() {
            self.token = token;
        }
    }

    fn session(&self) -> pb::ReadOptions {
        pb::ReadOptions { consistency: pb::ConsistencyLevel::Session as i32, session_token: self.token.clone(), staleness_ms: 0 }
    }

    pub async fn create_collection(&mut self) -> anyhow::Result<()> {
        self.next_step(&format!("create collection {COLLECTION:?} on the leader; it appears on the alternative"));
        let schema = pb::CollectionSchema {
            name: COLLECTION.into(),
            dim: self.sample.dim as u32,
            metric: pb::Metric::L2 as i32,
            index: Some(pb::IndexSpec { kind: Some(pb::index_spec::Kind::Hnsw(pb::HnswIndex { m: 16, ef_construction: 200 })), metric: 0 }),
            shards: 2,
            fields: vec![
                pb::FieldSchema { name: "category".into(), r#type: pb::ScalarType::String as i32, ..Default::default() },
                pb::FieldSchema { name: "price".into(), r#type: pb::ScalarType::Double as i32, ..Default::default() },
            ],
            ..Default::default()
        };
        // A reused --data-dir still holds the previous run's collection.
        let existing = self.leader.list_collections(pb::ListCollectionsRequest {}).await.rpc()?;
        if existing.names.iter().any(|n| n == COLLECTION) {
            println!("    dropping the {COLLECTION:?} collection a previous run left in the data dir");
            let req = pb::DropCollectionRequest { name: COLLECTION.into() };
            self.leader.drop_collection(req).await.rpc()?;
        }
        let started = Instant::now();
        let r = self.leader.create_collection(pb::CreateCollectionRequest { schema: Some(schema) }).await.rpc()?;
        self.keep_token(r.session_token);
        let info = r.collection.unwrap_or_default();
        let s = info.schema.unwrap_or_default();
        println!("    dim {}, metric {}, index {}, {} shards", s.dim, metric_name(s.metric), index_name(s.index.as_ref()), s.shards);
        println!("    payload fields: category (string), price (double)");
        // The alternative applies the leader's DDL log in order; a previous run's incarnation
        // (another id) may still be there for a moment.
        loop {
            let req = pb::DescribeCollectionRequest { name: COLLECTION.into() };
            if let Ok(d) = self.alternative.describe_collection(req).await
                && d.into_inner().collection.is_some_and(|c| c.collection_id == info.collection_id)
            {
                break;
            }
            if started.elapsed() > CATCH_UP {
                bail!("the alternative has not created collection {COLLECTION:?} after {CATCH_UP:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!("    on the alternative {} ms later (replicated from the leader's DDL log)", started.elapsed().as_millis());
        Ok(())
    }

    pub async fn insert_and_watch(&mut self) -> anyhow::Result<()> {
        let n = self.sample.len();
        self.next_step(&format!("insert {n} sample rows on the leader and watch them appear on the alternative"));
        let watching = CancellationToken::new();
        let watcher = tokio::spawn(watch_alternative(self.alternative.clone(), watching.clone()));
        let started = Instant::now();
        let dim = self.sample.dim;
        let result = async {
            for start in (0..n).step_by(1000) {
                let end = (start + 1000).min(n);
                let req = pb::InsertRequest {
                    ack: 0,
                    collection: COLLECTION.into(),
                    ids: self.sample.ids[start..end].to_vec(),
                    vectors: self.sample.vectors[start * dim..end * dim].to_vec(),
                    payloads: (start..end).map(|i| self.sample.payload(i)).collect(),
                };
                let r = self.leader.insert(req).await.rpc()?;
                self.keep_token(r.session_token);
            }
            anyhow::Ok(())
        }
        .await;
        let secs = started.elapsed().as_secs_f64();
        // A SESSION read passing the last insert's token waits until the alternative has
        // applied that insert (and so every one before it).
        let caught_up = Instant::now();
        let count = match result {
            Ok(()) => {
                let req = pb::CountRequest { collection: COLLECTION.into(), filter: String::new(), read: Some(self.session()) };
                self.alternative.count(req).await.rpc()
            }
            Err(e) => Err(e),
        };
        watching.cancel();
        let _ = watcher.await;
        let count = count?;
        self.keep_token(count.session_token);
        println!("    leader: {n} rows in {} requests, {secs:.2} s ({:.0} rows/s)", n.div_ceil(1000), n as f64 / secs.max(1e-6));
        println!(
            "    alternative: a SESSION count with the last insert's token answers {} rows, {} ms after that insert's ack",
            count.count,
            caught_up.elapsed().as_millis()
        );
        if let Some(s) = alternative_status(&mut self.alternative).await? {
            println!("    alternative: {} rows, lag {} ms, replication {:?}", s.rows, s.lag_ms, s.replication);
        }
        println!("    (lag_ms: how far the alternative's serviceable time trails the leader's clock; an idle");
        println!("     leader sends a time tick per shard every replication.tick_ms = 50 ms to advance it)");
        println!("    e.g. row 0: {}", fmt_payload(Some(&self.sample.payload(0))));
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.next_step("flush the leader: seal its growing segments and build their HNSW indexes");
        let started = Instant::now();
        let r = self.leader.flush(pb::FlushRequest { collection: COLLECTION.into() }).await.rpc()?;
        self.keep_token(r.session_token);
        println!("    sealed {} segments and indexed them in {:.2} s", r.sealed_segments, started.elapsed().as_secs_f64());
        println!("    (segments are each cluster's own business: the alternative seals and indexes its");
        println!("     segments as they fill up; only the data and the DDL are replicated)");
        Ok(())
    }

    async fn search_with(&mut self, query: &[f32], filter: &str) -> anyhow::Result<pb::Hits> {
        let req = pb::SearchRequest {
            collection: COLLECTION.into(),
            vectors: query.to_vec(),
            top_k: 5,
            filter: filter.into(),
            output_fields: vec!["*".into()],
            params: None,
            read: Some(self.session()),
        };
        let r = self.alternative.search(req).await.rpc()?;
        self.keep_token(r.session_token);
        Ok(r.results.into_iter().next().unwrap_or_default())
    }

    pub async fn search(&mut self, probe: usize) -> anyhow::Result<()> {
        self.next_step("search the alternative: the 5 nearest neighbours (L2 distance, smaller is closer)");
        println!("    query: the vector of row {probe}, so row {probe} itself comes first at distance 0");
        println!("    (a SESSION read passing our newest token: it sees every write we made on the leader)");
        let query = self.sample.vector(probe).to_vec();
        let hits = self.search_with(&query, "").await?;
        println!("{}", indent(&hits_text(0, &hits)));
        Ok(())
    }

    pub async fn filtered_search(&mut self, probe: usize) -> anyhow::Result<()> {
        let filter = FILTER;
        self.next_step("filtered search on the alternative: the 5 nearest rows that pass a payload filter");
        println!("    filter: {filter}");
        let query = self.sample.vector(probe).to_vec();
        let hits = self.search_with(&query, filter).await?;
        println!("{}", indent(&hits_text(0, &hits)));
        Ok(())
    }

    /// A Get on the alternative, SESSION with the newest token.
    async fn get(&mut self, id: i64) -> anyhow::Result<Option<pb::Entity>> {
        let req = pb::GetRequest {
            collection: COLLECTION.into(),
            ids: vec![id],
            output_fields: vec!["*".into()],
            include_vectors: false,
            read: Some(self.session()),
        };
        let r = self.alternative.get(req).await.rpc()?;
        self.keep_token(r.session_token);
        Ok(r.entities.into_iter().next())
    }

    pub async fn upsert_and_read_back(&mut self, probe: usize) -> anyhow::Result<()> {
        let id = self.sample.ids[probe];
        self.next_step(&format!("upsert row {id} on the leader, then read it on the alternative with the write's session token"));
        let before = self.get(id).await?;
        println!(
            "    alternative, before:  id {id}  {}",
            before.as_ref().map_or("(not found)".into(), |e| fmt_payload(e.payload.as_ref()))
        );
        let req = pb::UpsertRequest {
            ack: 0,
            collection: COLLECTION.into(),
            ids: vec![id],
            vectors: self.sample.vector(probe).to_vec(),
            payloads: vec![payload("books", 9.99)],
        };
        let r = self.leader.upsert(req).await.rpc()?;
        self.keep_token(r.session_token.clone());
        println!("    leader, upsert:       category=\"books\" price=9.99 -> write ts {}, session token {}", r.ts, r.session_token);
        let acked = Instant::now();
        let after = self.get(id).await?;
        let waited = acked.elapsed();
        println!(
            "    alternative, after:   id {id}  {}   (SESSION read, answered {:.1} ms after the leader's ack)",
            after.as_ref().map_or("(not found)".into(), |e| fmt_payload(e.payload.as_ref())),
            waited.as_secs_f64() * 1e3
        );
        println!("    (a SESSION read passing the token waits until this replica has applied the write, so it");
        println!("     never misses it; the reply's token is at least as new, for the next read on any replica)");
        let query = self.sample.vector(probe).to_vec();
        let hits = self.search_with(&query, FILTER).await?;
        if let Some(top) = hits.hits.first() {
            println!("    the filtered search of step 6 now ranks id {} first, at distance {:.6}", top.id, top.distance);
        }
        Ok(())
    }

    pub async fn delete_and_get(&mut self, probe: usize) -> anyhow::Result<()> {
        let id = self.sample.ids[probe];
        self.next_step(&format!("delete row {id} on the leader, then get it on the alternative"));
        let req = pb::DeleteRequest { ack: 0, collection: COLLECTION.into(), ids: vec![id], filter: String::new() };
        let r = self.leader.delete(req).await.rpc()?;
        self.keep_token(r.session_token);
        println!("    leader: deleted {} row", r.count);
        match self.get(id).await? {
            None => println!("    alternative: get id {id}: not found"),
            Some(e) => println!("    alternative: get id {id}: still there ({}), which is unexpected", fmt_payload(e.payload.as_ref())),
        }
        let req = pb::CountRequest { collection: COLLECTION.into(), filter: String::new(), read: Some(self.session()) };
        let count = self.alternative.count(req).await.rpc()?;
        self.keep_token(count.session_token);
        println!("    alternative: rows left: {}", count.count);
        Ok(())
    }

    pub async fn refused_write(&mut self, probe: usize) -> anyhow::Result<()> {
        self.next_step("send a write to the alternative: refused, naming the leader");
        let id = self.sample.ids[probe];
        let req = pb::InsertRequest {
            ack: 0,
            collection: COLLECTION.into(),
            ids: vec![id],
            vectors: self.sample.vector(probe).to_vec(),
            payloads: vec![self.sample.payload(probe)],
        };
        let status = match self.alternative.insert(req.clone()).await {
            Ok(_) => bail!("the alternative accepted a write; alternatives must refuse them"),
            Err(s) => s,
        };
        println!("    alternative: insert id {id} -> {:?}: {}", status.code(), status.message());
        let Some(leader) = tandem_proto::wire::leader_hint(&status) else {
            bail!("the alternative's refusal carries no NotLeader reason naming the leader");
        };
        println!("    refusal (status details): NotLeader, leader {leader}");
        // What a client (or the gateway) does with the hint: send the write there.
        let r = connect(&leader).await?.insert(req).await.rpc()?;
        self.keep_token(r.session_token);
        println!("    following the hint, the same insert on {leader} succeeds (write ts {})", r.ts);
        Ok(())
    }

    /// Reads routed per cluster id, as the gateway counts them.
    async fn routed(&self) -> anyhow::Result<HashMap<String, (u64, pb::ClusterView)>> {
        let mut topo = GatewayClient::new(self.gateway_channel()?);
        let t = topo.topology(pb::TopologyRequest {}).await.rpc()?;
        Ok(t.clusters.into_iter().map(|c| (c.id.clone(), (c.reads_routed, c))).collect())
    }

    fn gateway_channel(&self) -> anyhow::Result<Channel> {
        Ok(tonic::transport::Channel::from_shared(self.gateway_endpoint.clone())?.connect_lazy().into())
    }

    /// Waits until the gateway's health checks have seen both clusters readable.
    async fn gateway_ready(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let r = self.routed().await?;
            if r.len() == 2 && r.values().all(|(_, c)| c.readable) {
                return Ok(());
            }
            if started.elapsed() > CATCH_UP {
                bail!("the gateway does not see both clusters readable after {CATCH_UP:?}: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn reads_through_the_gateway(&mut self, probe: usize) -> anyhow::Result<()> {
        const READS: usize = 200;
        self.next_step(&format!("{READS} searches through the gateway: spread over both clusters"));
        self.gateway_ready().await?;
        let before = self.routed().await?;
        let started = Instant::now();
        let query = self.sample.vector(probe).to_vec();
        for _ in 0..READS {
            let req = pb::SearchRequest {
                collection: COLLECTION.into(),
                vectors: query.clone(),
                top_k: 5,
                filter: String::new(),
                output_fields: Vec::new(),
                params: None,
                read: Some(self.session()),
            };
            let r = self.gateway.search(req).await.rpc()?;
            self.keep_token(r.session_token);
        }
        let secs = started.elapsed().as_secs_f64();
        let after = self.routed().await?;
        println!("    {READS} SESSION searches in {secs:.2} s ({:.0}/s, one at a time), served by:", READS as f64 / secs.max(1e-6));
        for id in [LEADER_ID, ALTERNATIVE_ID] {
            let (n, c) = &after[id];
            let d = n - before.get(id).map_or(0, |(b, _)| *b);
            println!("    {id:<12} {d:>4} reads   ({}, lag {} ms, {})", role_name(c.role), c.lag_ms, health_name(c.health));
        }
        println!("    (routing.policy = \"round_robin\" in this demo: in turn over the clusters that can serve the");
        println!("     read's consistency in time; a lagging or failing cluster is skipped. The default, \"p2c\",");
        println!("     takes the one of two random clusters with the lower peak-EWMA latency)");
        Ok(())
    }

    pub async fn session_through_the_gateway(&mut self) -> anyhow::Result<()> {
        const PAIRS: i64 = 20;
        self.next_step(&format!("{PAIRS} write-then-read pairs through the gateway with a `session-id` header"));
        println!("    (for clients that cannot carry session tokens: the gateway keeps the newest one per session)");
        let before = self.routed().await?;
        let session = format!("demo-{}", std::process::id());
        let mut seen = 0;
        let base = self.sample.len() as i64 + 1_000_000;
        for i in 0..PAIRS {
            let id = base + i;
            let mut w = tonic::Request::new(pb::InsertRequest {
                ack: 0,
                collection: COLLECTION.into(),
                ids: vec![id],
                vectors: self.sample.vector(0).to_vec(),
                payloads: vec![payload("toys", 1.0 + i as f64)],
            });
            w.metadata_mut().insert("session-id", session.parse()?);
            self.gateway.insert(w).await.rpc()?;
            // No token in the request: the gateway adds the session's newest one.
            let read = pb::ReadOptions { consistency: pb::ConsistencyLevel::Session as i32, ..Default::default() };
            let mut r = tonic::Request::new(pb::GetRequest {
                collection: COLLECTION.into(),
                ids: vec![id],
                output_fields: vec!["*".into()],
                include_vectors: false,
                read: Some(read),
            });
            r.metadata_mut().insert("session-id", session.parse()?);
            let got = self.gateway.get(r).await.rpc()?;
            seen += usize::from(got.entities.iter().any(|e| e.id == id));
        }
        let after = self.routed().await?;
        let on_alt = after[ALTERNATIVE_ID].0 - before.get(ALTERNATIVE_ID).map_or(0, |(b, _)| *b);
        println!("    {seen}/{PAIRS} reads saw the write just made; {on_alt} of them were served by the alternative");
        if seen != PAIRS as usize {
            bail!("a SESSION read through the gateway missed its own write");
        }
        Ok(())
    }

    pub async fn cluster_info(&mut self) -> anyhow::Result<()> {
        self.next_step("cluster info: role, rows, lag and replication state of both clusters");
        for (name, client) in [("leader", &mut self.leader), ("alternative", &mut self.alternative)] {
            let info = client.get_cluster_info(pb::GetClusterInfoRequest {}).await.rpc()?;
            let follows = if info.leader.is_empty() { String::new() } else { format!(", follows {}", info.leader) };
            println!(
                "    {name:<12} cluster {} ({}, epoch {}{follows}), version {}",
                info.cluster_id,
                role_name(info.role),
                info.epoch,
                info.version
            );
            for c in &info.collections {
                let replication = if c.replication.is_empty() { String::new() } else { format!(", replication {:?}", c.replication) };
                println!(
                    "    {:<12} {}: {} rows, serviceable {}, lag {} ms{replication}",
                    "",
                    c.name,
                    c.rows,
                    fmt_ts(c.serviceable_ts),
                    c.lag_ms
                );
            }
        }
        let c = self.alternative.describe_collection(pb::DescribeCollectionRequest { name: COLLECTION.into() }).await.rpc()?;
        println!();
        println!("    the collection on the alternative:");
        println!("{}", indent(&describe_text(&c.collection.unwrap_or_default())));
        println!();
        println!("    The serviceable ts is the newest point in time a read can see in full on a cluster;");
        println!("    the alternative's trails the leader's by its replication lag. STRONG reads on the");
        println!("    alternative ask the leader's clock and wait until the alternative has caught up to it.");
        debug_assert_eq!(self.step, STEPS);
        Ok(())
    }

    /// Keeps serving until Ctrl-C/SIGTERM, or for `exit_after` seconds.
    pub async fn serve(&self, exit_after: Option<u64>) -> anyhow::Result<()> {
        if exit_after == Some(0) {
            println!("\ndone (--exit-after 0).");
            return Ok(());
        }
        let (lead, alt, gw) = (&self.leader_endpoint, &self.alternative_endpoint, &self.gateway_endpoint);
        println!("\nThe gateway and both clusters keep serving:");
        println!("    gateway      {gw}    (point applications here)");
        println!("    leader       {lead}");
        println!("    alternative  {alt}");
        println!("In another terminal, try:");
        println!("    tandem search --endpoint {gw} --collection demo --top-k 3 --vector <{} floats>", self.sample.dim);
        println!("    tandem info --endpoint {alt}");
        println!("    tandem collection describe demo --endpoint {alt}");
        let q: Vec<String> = self.sample.vector(0).iter().map(|x| format!("{x:.3}")).collect();
        println!("    tandem search --endpoint {alt} --collection demo --consistency strong --top-k 3 --filter 'price < 10' \\");
        println!("        --vector {}", q.join(","));
        println!("    tandem collection create other --dim 4 --endpoint {lead}    # then: tandem collection list --endpoint {alt}");
        match exit_after {
            Some(secs) => {
                println!("Stopping in {secs} s (or on Ctrl-C).");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(secs)) => {}
                    s = shutdown_signal() => { s?; }
                }
            }
            None => {
                println!("Press Ctrl-C to stop.");
                shutdown_signal().await?;
            }
        }
        Ok(())
    }

    /// Stops the gateway, then both clusters gracefully, the alternative first (the temporary data directory
    /// goes with `self`).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let gw = match self.gateway_running.take() {
            Some(g) => g.stop().await.map_err(anyhow::Error::from),
            None => Ok(()),
        };
        let alt = match self.alt_cluster.take() {
            Some(m) => m.stop(MEMBER_DRAIN).await.map_err(anyhow::Error::from),
            None => Ok(()),
        };
        let lead = match self.lead_cluster.take() {
            Some(m) => m.stop(MEMBER_DRAIN).await.map_err(anyhow::Error::from),
            None => Ok(()),
        };
        gw.and(alt).and(lead)
    }
}

/// The alternative's status of the demo collection.
async fn alternative_status(c: &mut TandemClient<Channel>) -> anyhow::Result<Option<pb::CollectionStatus>> {
    let info = c.get_cluster_info(pb::GetClusterInfoRequest {}).await.rpc()?;
    Ok(info.collections.into_iter().find(|s| s.name == COLLECTION))
}

/// Prints the alternative's row count, lag and replication state whenever its count changes,
/// every 100 ms until `stop`.
async fn watch_alternative(mut c: TandemClient<Channel>, stop: CancellationToken) {
    let mut last = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if let Ok(Some(s)) = alternative_status(&mut c).await
            && last != Some(s.rows)
        {
            println!("    alternative: {:>8} rows, lag {:>4} ms, replication {:?}", s.rows, s.lag_ms, s.replication);
            last = Some(s.rows);
        }
    }
}

fn health_name(h: i32) -> &'static str {
    match pb::Health::try_from(h) {
        Ok(pb::Health::Healthy) => "healthy",
        Ok(pb::Health::Unhealthy) => "unhealthy",
        Ok(pb::Health::Unknown) | Ok(pb::Health::Unspecified) | Err(_) => "unknown",
    }
}

fn heading(n: usize, title: &str) {
    println!("\n[{n}/{STEPS}] {title}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| if l.is_empty() { String::new() } else { format!("    {l}") }).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_deterministic_and_well_formed() {
        let a = Sample::generate(500, 8, 42);
        assert_eq!(a, Sample::generate(500, 8, 42));
        assert_ne!(a.vectors, Sample::generate(500, 8, 43).vectors);
        assert_eq!(a.vectors.len(), 500 * 8);
        assert!(a.vectors.iter().all(|x| x.is_finite()));
        assert!(a.prices.iter().all(|p| (1.0..100.0).contains(p)));
        let cheap_books = (0..a.len()).filter(|&i| a.categories[i] == "books" && a.prices[i] < 20.0).count();
        assert!(cheap_books > 5, "the demo's filtered search needs matches, got {cheap_books}");
    }
}
