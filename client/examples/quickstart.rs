//! `cargo run -p tandem-client --example quickstart [ENDPOINT]` against a running cluster or
//! gateway (default http://127.0.0.1:19530, e.g. `tandem cluster` or `tandem demo`).
//! Creates a collection `quickstart`, writes, reads its own writes, and drops it again.

use std::time::Duration;

use tandem_client::{Client, CollectionSpec, Consistency, FieldType, Index, Metric, Row};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::args().nth(1).unwrap_or_else(|| "http://127.0.0.1:19530".into());
    let client = Client::builder(&endpoint).timeout(Duration::from_secs(10)).connect().await?;

    let spec = CollectionSpec::new("quickstart", 3)
        .metric(Metric::Cosine)
        .index(Index::Hnsw { m: 16, ef_construction: 200 })
        .field("title", FieldType::String)
        .field("price", FieldType::Double);
    client.create_collection(spec).await?;

    let rows = vec![
        Row::new(1, [1.0, 0.0, 0.0]).with("title", "red pen").with("price", 1.5),
        Row::new(2, [0.0, 1.0, 0.0]).with("title", "blue book").with("price", 12.0),
        Row::new(3, [0.7, 0.7, 0.0]).with("title", "purple mug").with("price", 8.0),
    ];
    let w = client.insert("quickstart", rows).await?;
    println!("inserted {} rows at ts {} (session {})", w.count, w.ts, w.session_token);

    // SESSION (the default): sees the insert above, whichever replica answers.
    let hits = client.search("quickstart").vector([0.9, 0.1, 0.0]).top_k(2).filter("price < 10").output_fields(["*"]).await?;
    for h in &hits[0] {
        println!("hit id {} score {:.3} {:?}", h.id, h.distance, h.payload);
    }
    let n = client.count("quickstart").consistency(Consistency::Strong).await?;
    println!("{n} rows; session token to hand on: {:?}", client.session_token());

    client.drop_collection("quickstart").await?;
    Ok(())
}
