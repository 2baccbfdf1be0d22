//! `tandem demo`: a guided tour on built-in defaults, with nothing to configure.
//!
//! It starts a cluster node in this process, then does what an application would, through the
//! public gRPC API (the same [`connect`] every client uses): create a collection, insert sample
//! rows, flush, search, search with a filter, upsert and read the new value back with a session
//! token, delete, and show the cluster's state. Then it keeps serving so other `tandem` commands
//! can be tried against it.
//!
//! Each step is a method of [`Demo`], so the tour can grow (a leading and an alternative
//! cluster behind a gateway) by adding steps rather than rewriting a script.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use tandem_cluster::ClusterConfig;
use tandem_cluster::server::{self, Running};
use tandem_proto::v1 as pb;
use tandem_proto::v1::tandem_client::TandemClient;
use tonic::transport::Channel;

use crate::cli::cluster::shutdown_signal;
use crate::cli::collection::{describe_text, index_name, metric_name};
use crate::cli::search::hits_text;
use crate::cli::{LogFormat, RpcResult, connect, fmt_payload, fmt_ts, init_tracing};

const COLLECTION: &str = "demo";
const CATEGORIES: [&str; 5] = ["books", "music", "games", "garden", "toys"];
const STEPS: usize = 9;
/// The filter of the filtered search; the upsert step makes the probe row pass it.
const FILTER: &str = r#"category == "books" and price < 20"#;

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
    /// Keep the data here instead of in a temporary directory that is deleted on exit.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the demo cluster listens (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub listen: String,
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
    running: Option<Running>,
    /// Deleted when the demo ends, unless --data-dir was given.
    _tmp: Option<tempfile::TempDir>,
    pub endpoint: String,
    pub client: TandemClient<Channel>,
    sample: Sample,
    /// The newest session token a reply returned: reads that pass it see our own writes.
    token: String,
    step: usize,
}

impl Demo {
    /// Step 1: a cluster node on embedded defaults, in this process.
    pub async fn start(a: &DemoArgs) -> anyhow::Result<Demo> {
        println!("tandem demo: a guided tour of one cluster node, through the public gRPC API");
        heading(1, "start a cluster node (built-in defaults, no config file)");
        let (data_dir, tmp) = match &a.data_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new().prefix("tandem-demo-").tempdir().context("cannot create a temporary data directory")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let cfg = ClusterConfig { listen: a.listen.clone(), data_dir: data_dir.clone(), ..ClusterConfig::default() };
        if let Err(problems) = cfg.validate() {
            return Err(crate::config::InvalidConfig { problems }.into());
        }
        let running = server::start(cfg).await?;
        let endpoint = format!("http://{}", running.addr);
        println!("    cluster    local (leading)");
        println!("    endpoint   {endpoint}");
        println!("    data dir   {}{}", data_dir.display(), if tmp.is_some() { " (temporary)" } else { "" });
        let client = connect(&endpoint).await?;
        let started = Instant::now();
        let sample = tokio::task::spawn_blocking({
            let (rows, dim) = (a.rows, a.dim as usize);
            move || Sample::generate(rows, dim, 42)
        })
        .await?;
        tracing::debug!(ms = started.elapsed().as_millis() as u64, "sample generated");
        Ok(Demo { running: Some(running), _tmp: tmp, endpoint, client, sample, token: String::new(), step: 1 })
    }

    /// Every step after the start, in order.
    pub async fn walkthrough(&mut self) -> anyhow::Result<()> {
        self.create_collection().await?;
        self.insert().await?;
        self.flush().await?;
        let probe = 42.min(self.sample.len() - 1);
        self.search(probe).await?;
        self.filtered_search(probe).await?;
        self.upsert_and_read_back(probe).await?;
        self.delete_and_get(probe).await?;
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
        self.next_step(&format!("create collection {COLLECTION:?}"));
        let schema = pb::CollectionSchema {
            name: COLLECTION.into(),
            dim: self.sample.dim as u32,
            metric: pb::Metric::L2 as i32,
            index: Some(pb::IndexSpec { kind: Some(pb::index_spec::Kind::Hnsw(pb::HnswIndex { m: 16, ef_construction: 200 })) }),
            shards: 2,
            fields: vec![
                pb::FieldSchema { name: "category".into(), r#type: pb::ScalarType::String as i32 },
                pb::FieldSchema { name: "price".into(), r#type: pb::ScalarType::Double as i32 },
            ],
        };
        // A reused --data-dir still holds the previous run's collection.
        let existing = self.client.list_collections(pb::ListCollectionsRequest {}).await.rpc()?;
        if existing.names.iter().any(|n| n == COLLECTION) {
            println!("    dropping the {COLLECTION:?} collection a previous run left in the data dir");
            let req = pb::DropCollectionRequest { name: COLLECTION.into() };
            self.client.drop_collection(req).await.rpc()?;
        }
        let r = self.client.create_collection(pb::CreateCollectionRequest { schema: Some(schema) }).await.rpc()?;
        self.keep_token(r.session_token);
        let s = r.collection.and_then(|c| c.schema).unwrap_or_default();
        println!("    dim {}, metric {}, index {}, {} shards", s.dim, metric_name(s.metric), index_name(s.index.as_ref()), s.shards);
        println!("    payload fields: category (string), price (double)");
        Ok(())
    }

    pub async fn insert(&mut self) -> anyhow::Result<()> {
        let n = self.sample.len();
        self.next_step(&format!("insert {n} sample rows (Gaussian clusters, seed 42)"));
        let started = Instant::now();
        let dim = self.sample.dim;
        for start in (0..n).step_by(1000) {
            let end = (start + 1000).min(n);
            let req = pb::InsertRequest {
                collection: COLLECTION.into(),
                ids: self.sample.ids[start..end].to_vec(),
                vectors: self.sample.vectors[start * dim..end * dim].to_vec(),
                payloads: (start..end).map(|i| self.sample.payload(i)).collect(),
            };
            let r = self.client.insert(req).await.rpc()?;
            self.keep_token(r.session_token);
        }
        let secs = started.elapsed().as_secs_f64();
        println!("    {n} rows in {} requests, {secs:.2} s ({:.0} rows/s)", n.div_ceil(1000), n as f64 / secs.max(1e-6));
        println!("    e.g. row 0: {}", fmt_payload(Some(&self.sample.payload(0))));
        println!("    new rows land in growing segments, searched exactly until sealed");
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.next_step("flush: seal the growing segments and build their HNSW indexes");
        let started = Instant::now();
        let r = self.client.flush(pb::FlushRequest { collection: COLLECTION.into() }).await.rpc()?;
        self.keep_token(r.session_token);
        println!("    sealed {} segments and indexed them in {:.2} s", r.sealed_segments, started.elapsed().as_secs_f64());
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
        let r = self.client.search(req).await.rpc()?;
        self.keep_token(r.session_token);
        Ok(r.results.into_iter().next().unwrap_or_default())
    }

    pub async fn search(&mut self, probe: usize) -> anyhow::Result<()> {
        self.next_step("search: the 5 nearest neighbours (L2 distance, smaller is closer)");
        println!("    query: the vector of row {probe}, so row {probe} itself comes first at distance 0");
        let query = self.sample.vector(probe).to_vec();
        let hits = self.search_with(&query, "").await?;
        println!("{}", indent(&hits_text(0, &hits)));
        Ok(())
    }

    pub async fn filtered_search(&mut self, probe: usize) -> anyhow::Result<()> {
        let filter = FILTER;
        self.next_step("filtered search: the 5 nearest rows that pass a payload filter");
        println!("    filter: {filter}");
        let query = self.sample.vector(probe).to_vec();
        let hits = self.search_with(&query, filter).await?;
        println!("{}", indent(&hits_text(0, &hits)));
        Ok(())
    }

    async fn get(&mut self, id: i64) -> anyhow::Result<Option<pb::Entity>> {
        let req = pb::GetRequest {
            collection: COLLECTION.into(),
            ids: vec![id],
            output_fields: vec!["*".into()],
            include_vectors: false,
            read: Some(self.session()),
        };
        let r = self.client.get(req).await.rpc()?;
        self.keep_token(r.session_token);
        Ok(r.entities.into_iter().next())
    }

    pub async fn upsert_and_read_back(&mut self, probe: usize) -> anyhow::Result<()> {
        let id = self.sample.ids[probe];
        self.next_step(&format!("upsert row {id}, then read it back with a session token"));
        let before = self.get(id).await?;
        println!("    before:  id {id}  {}", before.as_ref().map_or("(not found)".into(), |e| fmt_payload(e.payload.as_ref())));
        let req = pb::UpsertRequest {
            collection: COLLECTION.into(),
            ids: vec![id],
            vectors: self.sample.vector(probe).to_vec(),
            payloads: vec![payload("books", 9.99)],
        };
        let r = self.client.upsert(req).await.rpc()?;
        self.keep_token(r.session_token.clone());
        println!("    upsert:  category=\"books\" price=9.99 -> write ts {}, session token {}", r.ts, r.session_token);
        let after = self.get(id).await?;
        println!("    after:   id {id}  {}", after.as_ref().map_or("(not found)".into(), |e| fmt_payload(e.payload.as_ref())));
        println!("    (a SESSION read passing the token is guaranteed to see the write, on any replica)");
        let query = self.sample.vector(probe).to_vec();
        let hits = self.search_with(&query, FILTER).await?;
        if let Some(top) = hits.hits.first() {
            println!("    the filtered search of step 6 now ranks id {} first, at distance {:.6}", top.id, top.distance);
        }
        Ok(())
    }

    pub async fn delete_and_get(&mut self, probe: usize) -> anyhow::Result<()> {
        let id = self.sample.ids[probe];
        self.next_step(&format!("delete row {id}, then get it"));
        let r =
            self.client.delete(pb::DeleteRequest { collection: COLLECTION.into(), ids: vec![id], filter: String::new() }).await.rpc()?;
        self.keep_token(r.session_token);
        println!("    deleted {} row", r.count);
        let found = self.get(id).await?;
        match found {
            None => println!("    get id {id}: not found"),
            Some(e) => println!("    get id {id}: still there ({}), which is unexpected", fmt_payload(e.payload.as_ref())),
        }
        let req = pb::CountRequest { collection: COLLECTION.into(), filter: String::new(), read: Some(self.session()) };
        let count = self.client.count(req).await.rpc()?;
        self.keep_token(count.session_token);
        println!("    rows left: {}", count.count);
        Ok(())
    }

    pub async fn cluster_info(&mut self) -> anyhow::Result<()> {
        self.next_step("cluster info: rows, segments and the serviceable timestamp");
        let info = self.client.get_cluster_info(pb::GetClusterInfoRequest {}).await.rpc()?;
        println!(
            "    cluster {} ({}, epoch {}), version {}",
            info.cluster_id,
            crate::cli::info::role_name(info.role),
            info.epoch,
            info.version
        );
        println!("    now     {} (ts {})", fmt_ts(info.current_ts), info.current_ts);
        let c = self.client.describe_collection(pb::DescribeCollectionRequest { name: COLLECTION.into() }).await.rpc()?;
        println!();
        println!("{}", indent(&describe_text(&c.collection.unwrap_or_default())));
        println!();
        println!("    The serviceable ts is the newest point in time a read can see in full on this cluster;");
        println!("    an alternative (replica) cluster trails its leader's by its replication lag.");
        debug_assert_eq!(self.step, STEPS);
        Ok(())
    }

    /// Keeps serving until Ctrl-C/SIGTERM, or for `exit_after` seconds.
    pub async fn serve(&self, exit_after: Option<u64>) -> anyhow::Result<()> {
        if exit_after == Some(0) {
            println!("\ndone (--exit-after 0).");
            return Ok(());
        }
        let ep = &self.endpoint;
        println!("\nThe cluster keeps serving at {ep}. In another terminal, try:");
        println!("    tandem info --endpoint {ep}");
        println!("    tandem collection describe demo --endpoint {ep}");
        let q: Vec<String> = self.sample.vector(0).iter().map(|x| format!("{x:.3}")).collect();
        println!("    tandem search --endpoint {ep} --collection demo --top-k 3 --filter 'price < 10' \\");
        println!("        --vector {}", q.join(","));
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

    /// Stops the cluster gracefully (the temporary data directory goes with `self`).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(r) = self.running.take() {
            r.stop().await?;
        }
        Ok(())
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
