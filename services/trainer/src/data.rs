//! The training data stream: committed datasets read shard by shard (one shard of read-ahead),
//! rows turned into score groups, shuffled through a bounded buffer, cut into micro-batches and
//! tokenized on a producer thread, so the training thread only runs the model.
//!
//! The order is a pure function of (datasets, seed, epoch): the shuffle buffer's generator is
//! seeded per epoch, so a position `(epoch, groups consumed)` is all a checkpoint needs to resume
//! the same stream (the epoch is replayed and the consumed groups skipped).

use crate::objectives::DatasetFields;
use crate::Error;
use candle_core::{Device, Tensor};
use distill_models::tokenize::PairTokenizer;
use distill_shards::{DatasetReader, Layout, ListRow, TripleRow};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;

/// One query's group of passages; slot 0 is the positive where the objective needs one.
#[derive(Debug, Clone)]
pub struct Group {
    pub query: String,
    pub passages: Vec<String>,
    pub labels: Vec<f32>,
    pub teacher_scores: Vec<f32>,
    pub teacher_ranks: Vec<f32>,
}

/// A tokenized micro-batch of `groups` groups of `width` slots (CPU tensors).
pub struct Batch {
    pub groups: usize,
    pub width: usize,
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    pub attention_mask: Tensor,
    /// [groups, width]: 1 real, 0 padding.
    pub mask: Tensor,
    pub labels: Tensor,
    pub teacher_scores: Option<Tensor>,
    pub teacher_ranks: Option<Tensor>,
    /// Position after this batch.
    pub epoch: u64,
    pub consumed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub struct Position {
    pub epoch: u64,
    /// Groups of this epoch already trained on.
    pub consumed: u64,
}

/// What the datasets hold, read from their first rows, and how many groups an epoch has.
pub struct DataSummary {
    pub fields: DatasetFields,
    pub rows: u64,
}

pub async fn open_datasets(uris: &[String]) -> Result<Vec<DatasetReader>, Error> {
    if uris.is_empty() {
        return Err(Error::InvalidArgument("datasets: at least one committed dataset URI is required".into()));
    }
    let mut readers = Vec::with_capacity(uris.len());
    for uri in uris {
        let r = DatasetReader::open_uri(uri).await.map_err(|e| Error::InvalidArgument(format!("datasets: {e}")))?;
        readers.push(r);
    }
    let layout = readers[0].manifest().layout;
    if let Some(other) = readers.iter().find(|r| r.manifest().layout != layout) {
        return Err(Error::InvalidArgument(format!(
            "datasets: {} is {} but {} is {}",
            uris[0],
            layout.name(),
            other.location().uri(),
            other.manifest().layout.name()
        )));
    }
    Ok(readers)
}

/// The fields the datasets offer, judged from the first batch of rows of each.
pub async fn summarize(readers: &[DatasetReader]) -> Result<DataSummary, Error> {
    let lists = readers[0].manifest().layout == Layout::Lists;
    let mut fields = DatasetFields { lists, labels: !lists, teacher_scores: true, teacher_ranks: lists };
    let mut rows = 0;
    for r in readers {
        rows += r.manifest().rows;
        let Some(batch) = r.batches(256).next().await else {
            continue;
        };
        let batch = batch?;
        if lists {
            let rows =
                ListRow::from_batch(&batch).map_err(|e| Error::InvalidInput(format!("{}: {e}", r.location().uri())))?;
            fields.labels |= rows.iter().any(|r| r.items.iter().any(|i| i.label.is_some()));
        } else {
            let rows = TripleRow::from_batch(&batch)
                .map_err(|e| Error::InvalidInput(format!("{}: {e}", r.location().uri())))?;
            fields.teacher_scores &= rows.iter().all(|t| t.pos_score.is_some() && t.neg_score.is_some());
        }
    }
    Ok(DataSummary { fields, rows })
}

/// How rows become groups.
#[derive(Debug, Clone, Copy)]
pub struct GroupOptions {
    pub group_size: usize,
    /// Lists: the positive (slot 0) is the first labelled-relevant item; lists without one are
    /// skipped. Otherwise slot 0 is the teacher's first.
    pub positive_from_labels: bool,
}

fn triple_group(t: TripleRow) -> Group {
    let scores = match (t.pos_score, t.neg_score) {
        (Some(p), Some(n)) => vec![p as f32, n as f32],
        _ => vec![],
    };
    let ranks = if scores.len() == 2 {
        if scores[0] >= scores[1] {
            vec![1.0, 2.0]
        } else {
            vec![2.0, 1.0]
        }
    } else {
        vec![]
    };
    Group {
        query: t.query,
        passages: vec![t.pos_text, t.neg_text],
        labels: vec![t.pos_label.unwrap_or(1).max(1) as f32, t.neg_label.unwrap_or(0) as f32],
        teacher_scores: scores,
        teacher_ranks: ranks,
    }
}

fn list_group(mut l: ListRow, opts: GroupOptions) -> Option<Group> {
    l.items.sort_by_key(|i| i.teacher_rank);
    let first = if opts.positive_from_labels { l.items.iter().position(|i| i.label.unwrap_or(0) > 0)? } else { 0 };
    let pos = l.items.remove(first);
    let items: Vec<_> = std::iter::once(pos).chain(l.items).take(opts.group_size.max(2)).collect();
    Some(Group {
        query: l.query,
        passages: items.iter().map(|i| i.text.clone()).collect(),
        labels: items.iter().map(|i| i.label.unwrap_or(0) as f32).collect(),
        teacher_scores: items.iter().map(|i| i.teacher_score as f32).collect(),
        teacher_ranks: items.iter().map(|i| i.teacher_rank as f32).collect(),
    })
}

/// Stream settings.
#[derive(Debug, Clone, Copy)]
pub struct StreamOptions {
    pub batch_size: usize,
    pub shuffle_buffer: usize,
    pub seed: u64,
    pub groups: GroupOptions,
    /// Stop after this many epochs (None: forever).
    pub epochs: Option<u64>,
}

fn epoch_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x5851_F42D_4C95_7F2D))
}

/// Runs the producer on its own thread: it sends tokenized batches (at most `capacity` waiting)
/// starting at `start`, until the epochs end, the receiver goes away, or an error (sent last).
pub fn spawn_producer(
    readers: Vec<DatasetReader>,
    tokenizer: PairTokenizer,
    opts: StreamOptions,
    start: Position,
    capacity: usize,
) -> std::sync::mpsc::Receiver<Result<Batch, Error>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
    let handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("distill-data".into())
        .spawn(move || {
            if let Err(e) = produce(&handle, &readers, &tokenizer, opts, start, &tx) {
                let _ = tx.send(Err(e));
            }
        })
        .expect("spawn data thread");
    rx
}

struct Closed;

fn produce(
    handle: &tokio::runtime::Handle,
    readers: &[DatasetReader],
    tokenizer: &PairTokenizer,
    opts: StreamOptions,
    start: Position,
    tx: &std::sync::mpsc::SyncSender<Result<Batch, Error>>,
) -> Result<(), Error> {
    let mut epoch = start.epoch;
    let mut skip = start.consumed;
    loop {
        if opts.epochs.is_some_and(|n| epoch >= n) {
            return Ok(());
        }
        let mut rng = epoch_rng(opts.seed, epoch);
        let mut buffer: Vec<Group> = Vec::with_capacity(opts.shuffle_buffer.max(1));
        let mut pending: VecDeque<Group> = VecDeque::new();
        let mut consumed = 0u64;
        let mut emitted_any = false;
        // Emits groups in order; the first `skip` are dropped (already trained on).
        let emit = |g: Group, pending: &mut VecDeque<Group>, consumed: &mut u64| -> Result<(), Closed> {
            *consumed += 1;
            if *consumed <= skip {
                return Ok(());
            }
            pending.push_back(g);
            if pending.len() == opts.batch_size {
                let groups: Vec<Group> = pending.drain(..).collect();
                let batch = tokenize(tokenizer, &groups, epoch, *consumed).map_err(|e| {
                    let _ = tx.send(Err(e));
                    Closed
                })?;
                tx.send(Ok(batch)).map_err(|_| Closed)?;
            }
            Ok(())
        };
        for reader in readers {
            let uri = reader.location().uri().to_string();
            let mut batches = reader.batches(512);
            while let Some(rb) = handle.block_on(batches.next()) {
                let rb = rb?;
                let groups: Vec<Group> = match reader.manifest().layout {
                    Layout::Triples => TripleRow::from_batch(&rb)
                        .map_err(|e| Error::InvalidInput(format!("{uri}: {e}")))?
                        .into_iter()
                        .map(triple_group)
                        .collect(),
                    Layout::Lists => ListRow::from_batch(&rb)
                        .map_err(|e| Error::InvalidInput(format!("{uri}: {e}")))?
                        .into_iter()
                        .filter_map(|l| list_group(l, opts.groups))
                        .collect(),
                };
                for g in groups {
                    emitted_any = true;
                    if buffer.len() < opts.shuffle_buffer.max(1) {
                        buffer.push(g);
                        continue;
                    }
                    let j = rng.random_range(0..buffer.len());
                    let out = std::mem::replace(&mut buffer[j], g);
                    if emit(out, &mut pending, &mut consumed).is_err() {
                        return Ok(());
                    }
                }
            }
        }
        while !buffer.is_empty() {
            let j = rng.random_range(0..buffer.len());
            let out = buffer.swap_remove(j);
            if emit(out, &mut pending, &mut consumed).is_err() {
                return Ok(());
            }
        }
        if !emitted_any {
            return Err(Error::InvalidInput("the datasets hold no usable groups".into()));
        }
        // A partial last batch is dropped, as drop_last does.
        epoch += 1;
        skip = 0;
    }
}

fn tokenize(tokenizer: &PairTokenizer, groups: &[Group], epoch: u64, consumed: u64) -> Result<Batch, Error> {
    let width = groups.iter().map(|g| g.passages.len()).max().unwrap_or(0);
    let cpu = Device::Cpu;
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(groups.len() * width);
    let (mut mask, mut labels, mut scores, mut ranks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let has_scores = groups.iter().all(|g| g.teacher_scores.len() == g.passages.len());
    let has_ranks = groups.iter().all(|g| g.teacher_ranks.len() == g.passages.len());
    for g in groups {
        for k in 0..width {
            let real = k < g.passages.len();
            // Padding slots repeat the first passage (masked out of every loss).
            pairs.push((g.query.as_str(), g.passages[if real { k } else { 0 }].as_str()));
            mask.push(real as u8 as f32);
            labels.push(if real { g.labels[k] } else { 0.0 });
            scores.push(if real && has_scores { g.teacher_scores[k] } else { 0.0 });
            ranks.push(if real && has_ranks { g.teacher_ranks[k] } else { 0.0 });
        }
    }
    let enc = tokenizer.batch(&pairs, &cpu)?;
    let shape = (groups.len(), width);
    Ok(Batch {
        groups: groups.len(),
        width,
        input_ids: enc.input_ids,
        token_type_ids: enc.token_type_ids,
        attention_mask: enc.attention_mask,
        mask: Tensor::from_vec(mask, shape, &cpu)?,
        labels: Tensor::from_vec(labels, shape, &cpu)?,
        teacher_scores: if has_scores { Some(Tensor::from_vec(scores, shape, &cpu)?) } else { None },
        teacher_ranks: if has_ranks { Some(Tensor::from_vec(ranks, shape, &cpu)?) } else { None },
        epoch,
        consumed,
    })
}
