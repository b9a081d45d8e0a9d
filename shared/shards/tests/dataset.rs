use distill_shards::*;
use distill_store::Location;
use futures::TryStreamExt;

fn teacher() -> TeacherIdentity {
    TeacherIdentity { kind: "first_stage".into(), name: "bm25".into(), details: serde_json::Value::Null }
}

fn triple(q: usize, n: usize) -> TripleRow {
    TripleRow {
        query_id: format!("q{q}"),
        query: format!("query {q}"),
        pos_id: format!("p{q}"),
        pos_text: format!("positive passage of {q}"),
        pos_score: Some(10.0 + q as f64),
        pos_label: Some(1),
        neg_id: format!("n{q}-{n}"),
        neg_text: "x".repeat(n),
        neg_score: if n.is_multiple_of(3) { None } else { Some(n as f64 * 0.5) },
        neg_label: None,
        pos_member_scores: n.is_multiple_of(2).then(|| vec![1.5, q as f64]),
        neg_member_scores: n.is_multiple_of(2).then(|| vec![-0.5, n as f64]),
    }
}

fn opts(rows: u64) -> WriterOptions {
    WriterOptions { rows_per_shard: rows, batch_rows: 4, ..Default::default() }
}

async fn write_triples(loc: &Location, queries: std::ops::Range<usize>, stop_after: Option<usize>) -> Option<Manifest> {
    let (mut w, resume) = DatasetWriter::open(loc.clone(), Layout::Triples, teacher(), opts(7), "job1").await.unwrap();
    if resume.cursor > 0 {
        assert_eq!(resume.state, serde_json::json!({"done": resume.cursor}), "state comes back with the cursor");
    }
    for q in queries.start.max(resume.cursor as usize)..queries.end {
        w.append_triples((0..3).map(|n| triple(q, n))).unwrap();
        w.end_unit(q as u64 + 1, serde_json::json!({"done": q + 1})).await.unwrap();
        if stop_after == Some(q) {
            return None; // dropped without commit: a crash
        }
    }
    Some(w.commit(serde_json::json!({"note": "test"})).await.unwrap())
}

async fn read_all(loc: &Location) -> Vec<TripleRow> {
    let reader = DatasetReader::open(loc.clone()).await.unwrap();
    let batches: Vec<_> = reader.batches(5).try_collect().await.unwrap();
    batches.iter().flat_map(|b| TripleRow::from_batch(b).unwrap()).collect()
}

#[tokio::test]
async fn triples_round_trip_and_roll_at_unit_boundaries() {
    let loc = Location::parse("memory://shards-test/triples").unwrap();
    let m = write_triples(&loc, 0..10, None).await.unwrap();
    assert_eq!(m.rows, 30);
    // 3 rows per unit, target 7: shards close after 9 rows, the last holds the rest.
    assert_eq!(m.shards.iter().map(|s| s.rows).collect::<Vec<_>>(), [9, 9, 9, 3]);
    let rows = read_all(&loc).await;
    let want: Vec<_> = (0..10).flat_map(|q| (0..3).map(move |n| triple(q, n))).collect();
    assert_eq!(rows, want);
    assert_eq!(m.teacher, teacher());
}

#[tokio::test]
async fn resumed_writer_produces_the_uninterrupted_rows() {
    let dir = tempfile::tempdir().unwrap();
    let full = Location::parse(dir.path().join("full").to_str().unwrap()).unwrap();
    let resumed = Location::parse(dir.path().join("resumed").to_str().unwrap()).unwrap();
    let m_full = write_triples(&full, 0..10, None).await.unwrap();
    assert!(write_triples(&resumed, 0..10, Some(4)).await.is_none());
    // A half-written shard file may be left behind; the reader refuses the uncommitted dataset.
    assert!(matches!(DatasetReader::open(resumed.clone()).await, Err(ShardError::NotCommitted { .. })));
    let m_res = write_triples(&resumed, 0..10, None).await.unwrap();
    assert_eq!(read_all(&full).await, read_all(&resumed).await);
    let sums = |m: &Manifest| m.shards.iter().map(|s| (s.rows, s.sha256.clone())).collect::<Vec<_>>();
    assert_eq!(sums(&m_full), sums(&m_res), "same shards, byte for byte");
    assert!(resumed.list("_progress").await.unwrap().is_empty());
    // A committed dataset is not opened for writing again.
    let again = DatasetWriter::open(resumed.clone(), Layout::Triples, teacher(), opts(7), "job2").await;
    assert!(matches!(again, Err(ShardError::AlreadyCommitted { ref job_id, .. }) if job_id == "job1"));
}

#[tokio::test]
async fn a_resumed_writer_does_not_trust_a_recorded_shard_that_changed() {
    let dir = tempfile::tempdir().unwrap();
    let full = Location::parse(dir.path().join("full").to_str().unwrap()).unwrap();
    let resumed = Location::parse(dir.path().join("resumed").to_str().unwrap()).unwrap();
    write_triples(&full, 0..10, None).await.unwrap();
    // Three shards recorded (9 rows each), then a crash; the second shard is cut short (a disk
    // that lost the tail of an unsynced file), the third is intact but follows it.
    assert!(write_triples(&resumed, 0..10, Some(8)).await.is_none());
    let records = resumed.list("_progress").await.unwrap();
    assert_eq!(records.len(), 3, "{records:?}");
    let second: serde_json::Value = serde_json::from_slice(&resumed.get(&records[1]).await.unwrap()).unwrap();
    let path = second["shard"]["path"].as_str().unwrap();
    let bytes = resumed.get(path).await.unwrap();
    resumed.put(path, bytes.slice(..bytes.len() / 2)).await.unwrap();
    let (_, resume) = DatasetWriter::open(resumed.clone(), Layout::Triples, teacher(), opts(7), "job1").await.unwrap();
    assert_eq!(resume.cursor, 3, "only the first shard (queries 0-2) is trusted");
    assert_eq!(resumed.list("_progress").await.unwrap().len(), 1, "the records after it are dropped");
    write_triples(&resumed, 0..10, None).await.unwrap();
    assert_eq!(read_all(&full).await, read_all(&resumed).await);
}

#[tokio::test]
async fn another_jobs_partial_output_is_refused() {
    let loc = Location::parse("memory://shards-test/foreign").unwrap();
    assert!(write_triples(&loc, 0..10, Some(5)).await.is_none());
    let other = DatasetWriter::open(loc.clone(), Layout::Triples, teacher(), opts(7), "job9").await;
    let msg = other.err().unwrap().to_string();
    assert!(msg.contains("partial output of job job1"), "{msg}");
}

#[tokio::test]
async fn tampered_shard_fails_its_checksum() {
    let loc = Location::parse("memory://shards-test/tamper").unwrap();
    let m = write_triples(&loc, 0..4, None).await.unwrap();
    let mut bytes = loc.get(&m.shards[0].path).await.unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    loc.put(&m.shards[0].path, bytes.into()).await.unwrap();
    let reader = DatasetReader::open(loc.clone()).await.unwrap();
    let err = reader.batches(8).try_collect::<Vec<_>>().await.unwrap_err().to_string();
    assert!(err.contains("checksum") && err.contains(&m.shards[0].path), "{err}");
}

#[tokio::test]
async fn lists_round_trip() {
    let loc = Location::parse("memory://shards-test/lists").unwrap();
    let (mut w, _) = DatasetWriter::open(loc.clone(), Layout::Lists, teacher(), opts(2), "job1").await.unwrap();
    let rows: Vec<ListRow> = (0..5)
        .map(|q| ListRow {
            query_id: format!("q{q}"),
            query: format!("query {q}"),
            items: (0..q + 1)
                .map(|i| ListItem {
                    doc_id: format!("d{i}"),
                    text: format!("text {i}"),
                    teacher_score: -(i as f64),
                    teacher_rank: i + 1,
                    label: (i == 0).then_some(2),
                    member_scores: (q % 2 == 1).then(|| vec![i as f64, -(i as f64) * 2.0, 0.25]),
                })
                .collect(),
        })
        .collect();
    for (q, row) in rows.iter().enumerate() {
        w.append_lists([row.clone()]).unwrap();
        w.end_unit(q as u64 + 1, serde_json::Value::Null).await.unwrap();
    }
    assert!(w.append_triples([triple(0, 0)]).is_err(), "layout is enforced");
    let m = w.commit(serde_json::Value::Null).await.unwrap();
    assert_eq!(m.shards.len(), 3);
    let reader = DatasetReader::open(loc).await.unwrap();
    let batches: Vec<_> = reader.batches(2).try_collect().await.unwrap();
    let back: Vec<ListRow> = batches.iter().flat_map(|b| ListRow::from_batch(b).unwrap()).collect();
    assert_eq!(back, rows);
}

#[tokio::test]
async fn shards_roll_at_the_byte_target() {
    let loc = Location::parse("memory://shards-test/bytes").unwrap();
    let opts =
        WriterOptions { rows_per_shard: u64::MAX, bytes_per_shard: 20_000, batch_rows: 16, ..Default::default() };
    let (mut w, _) = DatasetWriter::open(loc.clone(), Layout::Triples, teacher(), opts, "job1").await.unwrap();
    for q in 0..60 {
        // Incompressible-ish text so that the byte target is what closes shards.
        w.append_triples((0..3).map(|n| TripleRow {
            neg_text: format!("{:x}", ((q * 7919 + n) as u64).wrapping_mul(0x9E3779B97F4A7C15)).repeat(40),
            ..triple(q, n)
        }))
        .unwrap();
        w.end_unit(q as u64 + 1, serde_json::Value::Null).await.unwrap();
    }
    let m = w.commit(serde_json::Value::Null).await.unwrap();
    assert!(m.shards.len() >= 3, "{} shards", m.shards.len());
    assert_eq!(m.rows, 180);
    assert!(m.shards.iter().all(|s| s.rows % 3 == 0), "closed at query boundaries");
    assert_eq!(read_all(&loc).await.len(), 180);
}

#[tokio::test]
async fn a_growing_dataset_shows_each_shard_once_closed() {
    use distill_shards::{GrowingDataset, NextShard};
    let loc = Location::parse("memory://shards-test/growing").unwrap();
    let growing = GrowingDataset::new(loc.clone());
    assert_eq!(growing.shard(0).await.unwrap(), NextShard::Pending);
    let (mut w, _) = DatasetWriter::open(loc.clone(), Layout::Triples, teacher(), opts(7), "job1").await.unwrap();
    for q in 0..4 {
        w.append_triples((0..3).map(|n| triple(q, n))).unwrap();
        w.end_unit(q as u64 + 1, serde_json::json!({})).await.unwrap();
    }
    // Shards of 7 rows close at a query boundary: 9 rows in the first, the second still open.
    let first = match growing.shard(0).await.unwrap() {
        NextShard::Ready(s) => s,
        other => panic!("shard 0 should be closed: {other:?}"),
    };
    assert_eq!(first.rows, 9);
    assert_eq!(growing.shard(1).await.unwrap(), NextShard::Pending);
    let bytes = distill_shards::reader::fetch_verified(&loc, &first).await.unwrap();
    let rows: usize = distill_shards::reader::decode(&loc, &first, bytes, Layout::Triples, 4)
        .unwrap()
        .map(|b| b.unwrap().num_rows())
        .sum();
    assert_eq!(rows as u64, first.rows);
    let manifest = w.commit(serde_json::json!({})).await.unwrap();
    assert_eq!(growing.shard(0).await.unwrap(), NextShard::Ready(manifest.shards[0].clone()));
    assert_eq!(growing.shard(1).await.unwrap(), NextShard::Ready(manifest.shards[1].clone()));
    assert_eq!(growing.shard(2).await.unwrap(), NextShard::End);
}

/// Writes part `index` of `count` of queries `0..n` (those `parts::part_of` assigns to it).
async fn write_part(loc: &Location, index: u32, count: u32, n: usize, layout: Layout) -> Manifest {
    let part = loc.child(&parts::part_dir(index, count));
    let job = format!("job-part-{index}");
    let (mut w, _) = DatasetWriter::open(part, layout, teacher(), opts(4), &job).await.unwrap();
    let mine: Vec<usize> = (0..n).filter(|q| parts::part_of(&format!("q{q}"), count) == index).collect();
    for (done, q) in mine.iter().enumerate() {
        if layout == Layout::Triples {
            w.append_triples((0..3).map(|k| triple(*q, k))).unwrap();
        }
        w.end_unit(done as u64 + 1, serde_json::Value::Null).await.unwrap();
    }
    let extra = serde_json::json!({"sampling": {"seed": 1}, "queries": mine.len(), "counters": {"skipped": index}});
    w.commit(extra).await.unwrap()
}

#[tokio::test]
async fn parts_commit_the_whole_once_every_part_has() {
    let loc = Location::parse("memory://shards-test/parts").unwrap();
    let mut committed = Vec::new();
    for index in [2, 0] {
        committed.push(write_part(&loc, index, 3, 40, Layout::Triples).await);
        assert_eq!(parts::commit_parts(&loc, 3).await.unwrap(), None, "a part is missing");
        assert!(DatasetReader::open(loc.clone()).await.is_err(), "nothing committed yet");
    }
    write_part(&loc, 1, 3, 40, Layout::Triples).await;
    let whole = parts::commit_parts(&loc, 3).await.unwrap().expect("every part is committed");
    // Again (another part finishing at once): the same manifest, not a second one.
    assert_eq!(parts::commit_parts(&loc, 3).await.unwrap().as_ref(), Some(&whole));
    assert_eq!(whole.rows, 120);
    assert_eq!(whole.job_id, "job-part-0+job-part-1+job-part-2");
    assert_eq!(whole.extra["counters"]["skipped"], 3.0);
    assert_eq!(whole.extra["queries"], 40);
    assert!(whole.shards[0].path.starts_with("_parts/00000-of-00003/part-00000-job-part-0"));
    let mut rows = read_all(&loc).await;
    let mut want: Vec<_> = (0..40).flat_map(|q| (0..3).map(move |n| triple(q, n))).collect();
    rows.sort_by(|a, b| (&a.query_id, &a.neg_id).cmp(&(&b.query_id, &b.neg_id)));
    want.sort_by(|a, b| (&a.query_id, &a.neg_id).cmp(&(&b.query_id, &b.neg_id)));
    assert_eq!(rows, want, "every query once, in one of the parts");
    assert!(committed.iter().all(|m| m.rows > 0 && m.rows < 120), "each part holds some of the queries");
}

#[tokio::test]
async fn parts_of_different_jobs_are_not_combined() {
    let loc = Location::parse("memory://shards-test/mixed-parts").unwrap();
    write_part(&loc, 0, 2, 20, Layout::Triples).await;
    write_part(&loc, 1, 2, 20, Layout::Lists).await;
    let e = parts::commit_parts(&loc, 2).await.unwrap_err();
    assert!(e.to_string().contains("_parts/00001-of-00002") && e.to_string().contains("layout"), "{e}");
}
