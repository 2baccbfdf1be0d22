//! `tandem insert`: streams a vector file (npy, fvecs, JSON lines) into a collection in batches.
//!
//! A reader thread parses the file a batch ahead of the network, so parsing and sending overlap
//! and memory stays at a few batches whatever the file's size.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use indicatif::{ProgressBar, ProgressStyle};
use tandem_client::{Client, Rows};

use super::{ConnectArgs, client};
use crate::readers::{Batch, Format, VectorFile};

#[derive(Debug, clap::Args)]
pub struct InsertArgs {
    /// The collection to write to.
    #[arg(long)]
    pub collection: String,
    /// The vector file: .npy (float32, 2-D), .fvecs or JSON lines.
    #[arg(long)]
    pub file: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// Rows per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// The id of the file's first row; rows without an id get start-id + their row index.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub start_id: i64,
    /// Replace rows whose id exists instead of failing on them.
    #[arg(long)]
    pub upsert: bool,
    /// Requests in flight at once. More can be faster when the server fsyncs each write; must be
    /// 1 with --upsert, whose order matters when an id repeats.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Seal and index the collection's growing segments afterwards, and wait for it.
    #[arg(long)]
    pub flush: bool,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

pub async fn run(a: InsertArgs) -> anyhow::Result<()> {
    if !(1..=100_000).contains(&a.batch) {
        bail!("--batch {} is out of range 1..=100000", a.batch);
    }
    if a.concurrency == 0 || a.concurrency > 64 {
        bail!("--concurrency {} is out of range 1..=64", a.concurrency);
    }
    if a.upsert && a.concurrency > 1 {
        bail!("--concurrency {} with --upsert could apply two upserts of one id out of order: use 1", a.concurrency);
    }
    let client = client(&a.conn.endpoint).await?;
    let dim = client.describe_collection(&a.collection).await?.spec.dim as usize;

    let (path, format, start_id) = (a.file.clone(), a.format, a.start_id);
    let file = tokio::task::spawn_blocking(move || VectorFile::open(&path, format, start_id)).await??;
    if let Some(d) = file.dim().filter(|d| *d != dim) {
        bail!("{} holds vectors of dimension {d}, but collection {:?} has dim {dim}", a.file.display(), a.collection);
    }
    let bar = progress_bar(file.total_rows());
    let mut batches = spawn_reader(file, a.batch)?;

    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut done = 0u64;
    let mut eof = false;
    let result: anyhow::Result<()> = async {
        loop {
            while !eof && inflight.len() < a.concurrency {
                match batches.recv().await {
                    Some(Ok(b)) => {
                        // JSON lines reveal their dimension only as they are read.
                        if b.vectors.len() != b.len() * dim {
                            bail!(
                                "{} holds vectors of dimension {}, but collection {:?} has dim {dim}",
                                a.file.display(),
                                b.vectors.len() / b.len().max(1),
                                a.collection
                            );
                        }
                        inflight.push(write(client.clone(), a.collection.clone(), a.upsert, b));
                    }
                    Some(Err(e)) => return Err(e),
                    None => eof = true,
                }
            }
            match inflight.next().await {
                Some(n) => {
                    let n = n?;
                    done += n;
                    bar.inc(n);
                }
                None => return Ok(()),
            }
        }
    }
    .await;
    bar.finish_and_clear();
    if let Err(e) = result {
        if done > 0 {
            eprintln!("note: {done} rows were written before the error");
        }
        return Err(e);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} {done} rows from {} into {:?} in {secs:.2} s ({:.0} rows/s)",
        if a.upsert { "upserted" } else { "inserted" },
        a.file.display(),
        a.collection,
        done as f64 / secs.max(1e-6)
    );
    if a.flush {
        let started = Instant::now();
        let sealed = client.flush(&a.collection).await?;
        println!("flushed {sealed} segments (sealed and indexed) in {:.2} s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Clones of the client share its connection, so concurrent batches are multiplexed on it.
async fn write(client: Client, collection: String, upsert: bool, b: Batch) -> anyhow::Result<u64> {
    let n = b.len() as u64;
    let rows = Rows::columns_pb(b.ids, b.vectors, b.payloads);
    if upsert {
        client.upsert(&collection, rows).await?;
    } else {
        client.insert(&collection, rows).await?;
    }
    Ok(n)
}

/// Reads batches on a thread of its own (file reads and parsing block), a few ahead of the
/// sender. Dropping the receiver stops it.
fn spawn_reader(mut file: VectorFile, batch: usize) -> anyhow::Result<tokio::sync::mpsc::Receiver<anyhow::Result<Batch>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::Builder::new()
        .name("tandem-reader".into())
        .spawn(move || {
            loop {
                let next = file.next_batch(batch);
                let last = !matches!(next, Ok(Some(_)));
                if let Some(item) = next.transpose()
                    && tx.blocking_send(item).is_err()
                {
                    return;
                }
                if last {
                    return;
                }
            }
        })
        .context("cannot start the file reader thread")?;
    Ok(rx)
}

/// A progress bar on stderr, hidden when stdout is not a terminal (scripts, pipes, tests).
pub fn progress_bar(total: Option<u64>) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{bar:40.cyan/blue} {human_pos}/{human_len} rows  {per_sec}  eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {human_pos} rows  {per_sec}  {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
